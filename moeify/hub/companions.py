"""The files a user needs beside the weights: tokenizer, chat template, special tokens, and the
processor / feature-extractor / image-processor configs. Every directory moeify writes
(`save_pretrained`, `export`, `push_to_hub`) carries them, so that `AutoTokenizer.from_pretrained(dir)`
and `transformers.pipeline(task, model=dir)` work on it as is.

Where they come from, first match wins:
  1. objects passed as `tokenizer=` / `processor=` (anything with `save_pretrained(directory)`),
     written by their own `save_pretrained`; passing one replaces the files found beside the source
  2. the directory the model was loaded from: the moeify checkpoint (`moeify.from_pretrained`), else
     `config._name_or_path` (transformers and diffusers record it) when it is a local directory, or
     a Hub repo id whose snapshot is in the local Hub cache (read offline, nothing is downloaded)
Found files are copied by name (the list below, plus the vocabulary files of the `tokenizer_class`
that tokenizer_config.json names); weights and model configs never are. Tokenizers do not depend
on the architecture, so the files travel unchanged into a native export of another family.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import nn

# Vocabulary files of the common tokenizer classes (transformers' per-class `vocab_files_names`;
# tokenizer_config.json's `tokenizer_class` adds its own at copy time).
VOCABULARY_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
)
PATTERNS = ("*.tiktoken",)
# What a model's own save writes: never taken from a tokenizer's or processor's save_pretrained.
_MODEL_FILES = ("config.json", "generation_config.json", "README.md")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".index.json")

# The moeify checkpoint each loaded model came from (moeify.from_pretrained): its saved companions.
_loaded_from: weakref.WeakKeyDictionary[nn.Module, Path] = weakref.WeakKeyDictionary()


@runtime_checkable
class Saveable(Protocol):
    """A tokenizer, processor, feature extractor or image processor: it writes its own files."""

    def save_pretrained(self, save_directory: str, *args: object, **kwargs: object) -> object: ...


@functools.cache
def _transformers_names() -> tuple[frozenset[str], str]:
    """transformers' own file-name constants (imported on first use: transformers is slow to import)."""
    from transformers.tokenization_utils_base import (
        ADDED_TOKENS_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        TOKENIZER_CONFIG_FILE,
    )
    from transformers.utils import (
        CHAT_TEMPLATE_DIR,
        CHAT_TEMPLATE_FILE,
        FEATURE_EXTRACTOR_NAME,
        IMAGE_PROCESSOR_NAME,
        LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
        PROCESSOR_NAME,
        VIDEO_PROCESSOR_NAME,
    )

    names = {
        TOKENIZER_CONFIG_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        ADDED_TOKENS_FILE,
        CHAT_TEMPLATE_FILE,
        LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
        PROCESSOR_NAME,
        FEATURE_EXTRACTOR_NAME,
        IMAGE_PROCESSOR_NAME,
        VIDEO_PROCESSOR_NAME,
        *VOCABULARY_FILES,
    }
    return frozenset(names), CHAT_TEMPLATE_DIR


def is_companion(name: str) -> bool:
    """Whether a top-level file or folder name is one of the known companion files."""
    names, template_dir = _transformers_names()
    return name in names or name == template_dir or any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def download_patterns() -> list[str]:
    """`allow_patterns` for `huggingface_hub.snapshot_download` that fetch the companion files."""
    names, template_dir = _transformers_names()
    return [*sorted(names), *PATTERNS, f"{template_dir}/*"]


def check_savers(caller: str, *, tokenizer: object = None, processor: object = None) -> None:
    """TypeError unless each of `tokenizer` / `processor` is None or an object with `save_pretrained`
    that is not a model (whose save would write weights and a config.json)."""
    for keyword, value in (("tokenizer", tokenizer), ("processor", processor)):
        if value is None or (isinstance(value, Saveable) and not isinstance(value, nn.Module)):
            continue
        what = "a model" if isinstance(value, nn.Module) else f"{type(value).__name__} {value!r:.80}"
        hint = ""
        if isinstance(value, str):
            loader = "AutoTokenizer" if keyword == "tokenizer" else "AutoProcessor"
            hint = f"; load it first: {keyword}=transformers.{loader}.from_pretrained({value!r})"
        raise TypeError(
            f"{caller}: {keyword}= takes a tokenizer, processor, feature extractor or image processor (an object "
            f"with save_pretrained(directory)), got {what}{hint}"
        )


def remember_source(model: nn.Module, directory: Path) -> None:
    """Record that `model` was loaded from the moeify checkpoint `directory` (moeify.from_pretrained)."""
    _loaded_from[model] = Path(directory)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local Hub cache's snapshot of `repo_id` (no network), if it holds one."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except (HFValidationError, ValueError, OSError):
        return None
    return Path(found).parent if isinstance(found, str) else None


def _candidates(model: nn.Module) -> list[Path]:
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
    candidates = [_loaded_from.get(model)]
    if isinstance(name, str) and name:
        path = Path(name).expanduser()
        cached = None if path.exists() else _cached_snapshot(name, getattr(config, "_commit_hash", None))
        candidates.append(path if path.exists() else cached)
    return [c for c in candidates if c is not None and c.is_dir()]


def source_directory(model: nn.Module) -> Path | None:
    """The directory whose companion files `model`'s saves carry (None: none found)."""
    return next((c for c in _candidates(model) if companion_files(c)), None)


def _class_vocabulary(directory: Path) -> set[str]:
    """The vocabulary file names of the tokenizer class tokenizer_config.json names (e.g. LUKE's
    entity_vocab.json), where transformers has that class."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        import transformers

        cls = getattr(transformers, str(config.get("tokenizer_class")), None)
        found = getattr(cls, "vocab_files_names", None) or {}
    except (OSError, ValueError, AttributeError, ImportError):
        return set()
    return {n for n in found.values() if isinstance(n, str) and "/" not in n and not _is_model_file(n)}


def companion_files(directory: Path) -> list[str]:
    """The companion files and folders `directory` holds, by name, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    known = _class_vocabulary(directory)
    return sorted(p.name for p in directory.iterdir() if is_companion(p.name) or (p.name in known and p.is_file()))


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or name.endswith(_WEIGHT_SUFFIXES) or name.startswith("moeify_")


def _copy(source: Path, destination: Path, names: list[str]) -> list[str]:
    """Copy `names` from `source`; a name the destination already has (the model's own) is skipped."""
    _, template_dir = _transformers_names()
    copied = []
    for name in names:
        path, target = source / name, destination / name
        if target.exists() or _is_model_file(name):
            continue
        if path.is_dir():
            if name != template_dir:
                continue  # a processor's sub-model (an audio tokenizer's weights): not a companion
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        copied.append(name)
    return copied


def write_companions(
    model: nn.Module, directory: Path, *, tokenizer: Saveable | None = None, processor: Saveable | None = None
) -> list[str]:
    """Write the companion files into `directory` (a staging directory the model's own files are
    already in: those are never replaced). `tokenizer` / `processor` are saved with their own
    `save_pretrained` (the tokenizer last: it wins over the processor's); without them, the files
    found beside the model's source are copied. Returns the names written, sorted."""
    directory = Path(directory)
    savers = [obj for obj in (processor, tokenizer) if obj is not None]
    if not savers:
        source = source_directory(model)
        return sorted(_copy(source, directory, companion_files(source))) if source is not None else []
    with tempfile.TemporaryDirectory(prefix="moeify-companions-") as scratch:
        for saver in savers:
            saver.save_pretrained(scratch)
        return sorted(_copy(Path(scratch), directory, sorted(p.name for p in Path(scratch).iterdir())))


__all__ = [
    "Saveable",
    "check_savers",
    "companion_files",
    "download_patterns",
    "is_companion",
    "remember_source",
    "source_directory",
    "write_companions",
]
