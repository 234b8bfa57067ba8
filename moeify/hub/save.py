"""`moeify.save_pretrained(model, directory)`: a converted model as a self-contained directory.

The peft pattern: the directory holds the recipe and the weights, and `moeify.from_pretrained`
rebuilds the dense base model from its config, re-applies the recipe, then loads the weights
strictly. What a moeify directory holds:

  moeify_config.json        format version,
                            moeify version, the conversion recipes in order, the base model's
                            library / class / config file, tied tensors, dtypes of buffers
  base_config.json          the base model's own config, as its library writes it (transformers,
                            diffusers); generation_config.json too for a transformers model with one
  moeify_model.safetensors  the weights, safetensors only; above `max_shard_size`:
                            moeify_model-0000i-of-0000n.safetensors + moeify_model.safetensors.index.json
  config.json               a guard for plain loaders (see `GUARD_NAME`)
  tokenizer.json, ...       the tokenizer / chat template / processor files (moeify.hub.companions),
                            outside the checksums: they may be replaced without touching the model

Plain `AutoModel.from_pretrained(directory)` must not build a dense model with random FFNs from
these files (transformers v5 re-initialises the weights it cannot place;
test_plain_loaders_fail_loudly). The weights are not named `model.safetensors` /
`diffusion_pytorch_model.safetensors`, so no plain loader finds them, and config.json's `model_type`
(transformers) and `_class_name` (diffusers' AutoModel) are a name no library knows, which their
"does not recognize this architecture" errors quote: it says what to use instead.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moeify._version import __version__
from moeify.atomic import as_directory, staged_directory
from moeify.hub.companions import Saveable, check_savers, is_companion, write_companions
from moeify.layers.inventory import model_class, peft_module_name, unwrap

# 2: the record may hold "captured", FFNs found on example inputs (moeify.surgery.record). A
# checkpoint without them is still written as format 1, which older moeify versions read.
FORMAT_VERSION = 2
MOEIFY_CONFIG = "moeify_config.json"
BASE_CONFIG = "base_config.json"
GENERATION_CONFIG = "generation_config.json"
GUARD_CONFIG = "config.json"
WEIGHTS_PATTERN = "moeify_model{suffix}.safetensors"
WEIGHTS = WEIGHTS_PATTERN.format(suffix="")
WEIGHTS_INDEX = WEIGHTS + ".index.json"
# Quoted by transformers ("has model type `...` but Transformers does not recognize this
# architecture") and by diffusers' AutoModel ("`diffusers` has no class `...`").
GUARD_NAME = "moeify (a moeify checkpoint: load it with moeify.from_pretrained)"


def library_of(model: nn.Module) -> str:
    """The library that built the model: "transformers", "diffusers" or "torch" (a library not
    imported yet cannot have built it, so none is imported here)."""
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    diffusers = sys.modules.get("diffusers")
    if diffusers is not None and isinstance(model, diffusers.ModelMixin):
        return "diffusers"
    return "torch"


def _auto_class(model: nn.Module) -> str | None:
    """The transformers Auto class whose `from_config` builds this model's class (None if none does)."""
    import transformers

    preferred = ["AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM"]
    others = sorted(n for n in dir(transformers) if n.startswith("AutoModelFor") and n not in preferred)
    for name in preferred + others:
        mapping = getattr(getattr(transformers, name, None), "_model_mapping", None)
        try:
            if mapping is not None and mapping[type(model.config)] is model_class(model):
                return name
        except (KeyError, ValueError, TypeError, AttributeError, ImportError):
            continue
    return None


def _base_description(model: nn.Module) -> dict[str, Any]:
    library = library_of(model)
    cls = model_class(model)
    base: dict[str, Any] = {"library": library, "class_name": cls.__name__, "module": cls.__module__}
    if library == "transformers":
        base["model_type"] = model.config.model_type
        base["auto_class"] = _auto_class(model)
        # Not part of the serialised config, and eager vs sdpa attention round differently.
        base["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if library in ("transformers", "diffusers"):
        base["config_file"] = BASE_CONFIG
        # Where the dense model came from (a Hub id or a path): the model card's `base_model`.
        # transformers' config serialisation drops it, so it is recorded here.
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        base["name_or_path"] = name if isinstance(name, str) and name else None
    return base


def _write_base_configs(model: nn.Module, directory: Path, library: str) -> None:
    if library == "transformers":
        (directory / BASE_CONFIG).write_text(model.config.to_json_string())
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(directory)
    elif library == "diffusers":
        (directory / BASE_CONFIG).write_text(model.to_json_string())


def split_shared(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses tensors that share storage. Names of the same tensor (a tied lm_head)
    are stored once, with `tied` = {dropped name: stored name} to re-tie them on load; distinct
    tensors over one storage (overlapping views) are each stored as their own copy."""
    kept: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.is_meta:
            raise ValueError(
                f"moeify.save_pretrained: {name} is on the meta device (no values); load the weights first"
            )
        if tensor.numel() == 0:  # empty tensors all share data_ptr 0
            kept[name] = tensor
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in views:
            tied[name] = views[view]
            continue
        views[view] = name
        storages.setdefault(storage, []).append(name)
        kept[name] = tensor
    for names in storages.values():
        for name in names[1:]:
            kept[name] = kept[name].clone()
    return kept, tied


def buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Dtypes of the floating-point non-persistent buffers (rotary `inv_freq`, routing statistics):
    not saved but rebuilt on load, then cast back (`model.to(bf16)` casts them too)."""
    dtypes = {}
    for prefix, module in model.named_modules():
        # sorted: a set's order follows string hashing, which changes with every process
        # (PYTHONHASHSEED), and the record must be the same bytes whichever process writes it.
        for name in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_floating_point():
                dtypes[f"{prefix}.{name}" if prefix else name] = str(buffer.dtype).removeprefix("torch.")
    return dtypes


def _is_guard(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("model_type") == GUARD_NAME
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _captured(state: Any) -> dict[str, Any]:
    """The FFNs found on example inputs, as JSON (loading has no inputs to find them again)."""
    from moeify.surgery.record import layout_to_dict

    return {
        name: {"layout": layout_to_dict(found.layout), "calls": found.calls}
        for name, found in sorted(getattr(state, "captured", {}).items())
    }


def _check_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"moeify.save_pretrained: {directory} exists and is not a directory")
    guard = directory / GUARD_CONFIG
    if guard.is_file() and not _is_guard(guard):
        # Do not overwrite someone's dense checkpoint (its config.json) with the guard.
        raise ValueError(
            f"moeify.save_pretrained: {directory} already holds a checkpoint that is not moeify's "
            f"({GUARD_CONFIG}); save to a new directory"
        )


def _check_no_peft(model: nn.Module) -> None:
    """A peft-wrapped model's state dict holds adapters under peft's names, which moeify.from_pretrained
    cannot rebuild: refuse it rather than write a checkpoint that does not load."""
    found = peft_module_name(model)
    if found is not None:
        raise ValueError(
            f"moeify.save_pretrained: this {type(model).__name__} holds peft adapters (at {found or 'the root'}). "
            "Save the adapters with peft (peft_model.save_pretrained(dir)) over the base saved before get_peft_model "
            "(reload: PeftModel.from_pretrained(moeify.from_pretrained(base_dir), dir)), or merge them into the "
            "weights first: moeify.save_pretrained(peft_model.merge_and_unload(), dir)"
        )


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def file_checksum(path: Path) -> str:
    """CRC32 of a file's bytes, as 8 hex digits (read in 16 MiB chunks)."""
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def record_checksum(record: dict[str, Any]) -> str:
    """CRC32 of the record's content without its own checksum (canonical JSON)."""
    content = {key: value for key, value in record.items() if key != "record_checksum"}
    return f"{zlib.crc32(json.dumps(content, sort_keys=True).encode()):08x}"


def _owned(name: str) -> bool:
    """The files of a moeify checkpoint (a save replaces them all; any other file is the user's)."""
    return name in (MOEIFY_CONFIG, GUARD_CONFIG, BASE_CONFIG, GENERATION_CONFIG) or name.startswith("moeify_model")


def _shard_size(max_shard_size: int | str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise ValueError(
            f"moeify.save_pretrained: max_shard_size must be bytes or a size such as '5GB', got {max_shard_size!r}"
        )
    try:
        size = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    except ValueError as error:
        raise ValueError(f"moeify.save_pretrained: max_shard_size={max_shard_size!r} is not a size ({error})") from None
    if size <= 0:
        raise ValueError(f"moeify.save_pretrained: max_shard_size must be positive, got {max_shard_size!r}")
    return size


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer: Saveable | None = None,
    processor: Saveable | None = None,
) -> Path:
    """Save a moeify-converted model to `directory` (created if needed); returns its path.

    Writes the conversion recipes (`moeify_config.json`), the base model's own config for
    transformers / diffusers models, and the weights as safetensors, sharded with an index above
    `max_shard_size` (bytes, or a string such as "5GB"). Reload with `moeify.from_pretrained`.

    The tokenizer, chat template and processor files travel with it (moeify.hub.companions), so
    `AutoTokenizer.from_pretrained(directory)` works: `tokenizer` / `processor` (anything with
    `save_pretrained`: a tokenizer, processor, feature extractor or image processor) are saved
    into it; without them, the files found beside the model's source checkpoint are copied.

    Crash-safe (moeify.atomic): every argument is checked first, the checkpoint is written
    beside `directory` and swapped in whole, so a save that fails or is killed leaves the
    checkpoint that was there loadable. Other files in `directory` (a model card) are kept, and
    its tokenizer / processor files too unless this save brings its own.

    A model sharded over ranks (moeify.distributed expert parallelism, FSDP2): call it on every
    rank; the tensors are gathered whole and rank 0 writes the files one process would write
    (for checkpoints that stay sharded, see `moeify.distributed.save_sharded`).
    """
    model = unwrap(model)
    state = getattr(model, "moeify_state", None)
    if state is None or not state.conversions:
        raise ValueError(
            f"moeify.save_pretrained saves moeify-converted models, and this {type(model).__name__} was not "
            "converted (no model.moeify_state): call moeify(model, ...) first, or save it with its own library"
        )
    _check_no_peft(model)
    check_savers("moeify.save_pretrained", tokenizer=tokenizer, processor=processor)
    directory = as_directory(directory, "moeify.save_pretrained")
    shard_size = _shard_size(max_shard_size)
    state_dict = model.state_dict()
    if not any(isinstance(value, DTensor) for value in state_dict.values()):
        _check_directory(directory)
        return _write(model, state, directory, state_dict, shard_size, tokenizer, processor)
    # Sharded over ranks (expert parallelism, FSDP2): every rank takes part in gathering the
    # tensors whole, rank 0 writes the files one process would, and its outcome reaches all ranks.
    from moeify.distributed.checkpoint import full_state_dict

    state_dict = full_state_dict(model)
    failure = None
    if dist.get_rank() == 0:
        try:
            _check_directory(directory)
            _write(model, state, directory, state_dict, shard_size, tokenizer, processor)
        except Exception as error:  # raised below on rank 0, reported to the others
            failure = error
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(outcome, src=0)  # a string, pickled by this process: not untrusted
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"moeify.save_pretrained failed on rank 0: {outcome[0]}")
    return directory


def _write(
    model: nn.Module,
    state: Any,
    directory: Path,
    state_dict: dict[str, Tensor],
    shard_size: int,
    tokenizer: Saveable | None,
    processor: Saveable | None,
) -> Path:
    from huggingface_hub import save_torch_state_dict

    captured = _captured(state)
    version = FORMAT_VERSION if captured else 1
    tensors, tied = split_shared(state_dict)
    library = library_of(model)
    companions: list[str] = []

    def owned(name: str) -> bool:
        # A save that brings companion files replaces the old set whole (no stale tokenizer.model
        # beside a new tokenizer.json); one that brings none keeps what the user put there.
        return _owned(name) or (bool(companions) and is_companion(name))

    with staged_directory(directory, owned=owned) as staging:
        guard = {"model_type": GUARD_NAME, "_class_name": GUARD_NAME, "moeify": {"format_version": version}}
        (staging / GUARD_CONFIG).write_text(json.dumps(guard, indent=2) + "\n")
        _write_base_configs(model, staging, library)
        save_torch_state_dict(
            tensors,
            staging,
            filename_pattern=WEIGHTS_PATTERN,
            max_shard_size=shard_size,
            # One key: safetensors writes its metadata map in hash order, random per process, so two
            # keys would make two saves of one model differ in bytes (and checksums). The version is
            # in moeify_config.json.
            metadata={"format": "pt"},
        )
        sharded = (staging / WEIGHTS_INDEX).is_file()
        checksums = {path.name: file_checksum(path) for path in sorted(staging.iterdir()) if path.is_file()}
        record = {
            "format": "moeify",
            "format_version": version,
            "moeify_version": __version__,
            "conversions": [config.to_dict() for config in state.conversions],
            "base": _base_description(model),
            "weights": WEIGHTS_INDEX if sharded else WEIGHTS,
            "tied": tied,
            "buffer_dtypes": buffer_dtypes(model),
            # Each tensor's dtype as written (safetensors' codes): loading compares the files' headers.
            "dtypes": {key: _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)) for key, t in tensors.items()},
            **({"captured": captured} if captured else {}),
            # How far a recipe that departs from the dense model was from it at conversion (the card's table).
            **({"deviation": state.deviation} if getattr(state, "deviation", None) else {}),
            # Routing settings changed live or scheduled (moeify.set_routing), the steps counted.
            **({"routing": state.routing.state_dict()} if getattr(state, "routing", None) is not None else {}),
            # CRC32 of every other file and of this record: a flipped byte is refused on load, not
            # loaded as a silently different model (safetensors has no checksum of its own).
            "checksums": checksums,
        }
        record["record_checksum"] = record_checksum(record)
        (staging / MOEIFY_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        companions += write_companions(model, staging, tokenizer=tokenizer, processor=processor)
    return directory


__all__ = ["FORMAT_VERSION", "GUARD_NAME", "MOEIFY_CONFIG", "file_checksum", "record_checksum", "save_pretrained"]
