"""`moeify.from_pretrained(directory_or_repo_id)`: rebuild, re-convert, then load strictly.

The peft pattern (a plain transformers v5 `from_pretrained` would re-initialise the dense FFNs): the
dense base model is rebuilt from its saved config with its parameters on the meta device
(`accelerate.init_empty_weights`, which keeps buffers such as rotary `inv_freq` real), the
conversion recipes are re-applied with `verify=False` (conversion is deterministic given the
recipe), and the weights are assigned strictly: every key of the files must be a key of the rebuilt
model and the other way round, or nothing is read and the error names the keys. Only safetensors
files are ever opened.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeify.atomic import as_directory, recover
from moeify.config import MoeifyConfig
from moeify.control.routing import routing_control
from moeify.convert import MoeifyState, moeify
from moeify.hub.checks import (
    CheckpointError,
    check_keys,
    read_json,
    read_record,
    shown_names,
    verify_checksums,
    weight_files,
)
from moeify.hub.companions import download_patterns, remember_source
from moeify.hub.save import GENERATION_CONFIG, MOEIFY_CONFIG
from moeify.layers.inventory import moe_layers
from moeify.surgery import ConversionError


def resolve(directory_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: Any = None) -> Path:
    """A local directory as is; anything else is taken as a Hub repo id and its JSON and
    safetensors files and its tokenizer / processor files (nothing else) are downloaded."""
    path = as_directory(directory_or_repo_id, "moeify.from_pretrained")
    recover(path)  # a save killed between its two renames leaves the old checkpoint beside the path
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; moeify.from_pretrained reads the directory moeify.save_pretrained wrote"
            )
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = str(directory_or_repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise CheckpointError(f"{repo_id}: no such directory (and not a Hub repo id)") from None
    patterns = ["*.json", "*.safetensors", *(p for p in download_patterns() if not p.endswith(".json"))]
    try:
        local = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
    except Exception as error:
        raise CheckpointError(
            f"{repo_id} is not a local directory, and downloading it from the Hub failed: {type(error).__name__}: {error}"
        ) from error
    return Path(local)


def _build_transformers(directory: Path, base: dict[str, Any]) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = read_json(directory / str(base.get("config_file")), "the base model's config")
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"transformers {transformers.__version__} does not know model type {model_type!r} of this checkpoint's "
            "base model: upgrade transformers, or pass base_model= (the dense model, on the meta device if you like)"
        )
    config = CONFIG_MAPPING[model_type].from_dict(data)
    cls = getattr(transformers, base["class_name"], None)
    build = cls._from_config if cls is not None else getattr(transformers, str(base.get("auto_class")), None)
    if build is None:
        raise CheckpointError(
            f"transformers {transformers.__version__} has no class {base['class_name']}: pass base_model="
        )
    if cls is None:
        build = build.from_config
    kwargs = {"attn_implementation": base["attn_implementation"]} if base.get("attn_implementation") else {}
    with init_empty_weights():
        model = build(config, **kwargs)
    if (directory / GENERATION_CONFIG).is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _build_diffusers(directory: Path, base: dict[str, Any]) -> nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, base["class_name"], None)
    if cls is None:
        raise CheckpointError(f"diffusers {diffusers.__version__} has no class {base['class_name']}: pass base_model=")
    config = read_json(directory / str(base.get("config_file")), "the base model's config")
    with init_empty_weights():
        return cls.from_config(config)


def build_base(directory: Path, record: dict[str, Any], base_model: nn.Module | None) -> nn.Module:
    """The dense skeleton the recipes are re-applied to."""
    base = record.get("base") or {}
    if base_model is not None:
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be a torch.nn.Module, got {type(base_model).__name__}")
        if moe_layers(base_model):
            raise CheckpointError(
                "base_model is already converted by moeify; pass the dense model (the recipe is re-applied to it)"
            )
        return base_model
    library = base.get("library")
    if library not in ("transformers", "diffusers", "torch"):
        raise CheckpointError(
            f"{directory / MOEIFY_CONFIG}: the record names no base model library ('base': {record.get('base')!r}); "
            "it is damaged. Pass base_model= (the dense model) to load it anyway"
        )
    if library == "transformers":
        return _build_transformers(directory, base)
    if library == "diffusers":
        return _build_diffusers(directory, base)
    name = f"{base.get('module')}.{base.get('class_name')}"
    raise CheckpointError(
        f"{directory} was saved from a plain torch module ({name}), which moeify cannot rebuild from a config: "
        f"pass base_model= a dense instance of it (its parameters may be on the meta device, e.g. built under "
        "accelerate.init_empty_weights())"
    )


def _restore_captured(model: nn.Module, record: dict[str, Any]) -> None:
    """FFNs the conversion found on example inputs: the rebuilt model has no inputs to trace, so
    the record says where they are and what they compute (plain data; moeify.surgery.record)."""
    from moeify.surgery.find import Recorded
    from moeify.surgery.record import layout_from_dict

    captured = record.get("captured") or {}
    if not captured:
        return
    try:
        found = {
            str(name): Recorded(layout_from_dict(entry["layout"]), int(entry.get("calls", 1)))
            for name, entry in captured.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"{MOEIFY_CONFIG}: its recorded FFN layouts cannot be read ({type(error).__name__}: {error})"
        ) from None
    state = MoeifyState()
    state.captured = found
    model.moeify_state = state


def reapply(model: nn.Module, record: dict[str, Any]) -> list[MoeifyConfig]:
    configs = [MoeifyConfig.from_dict(data) for data in record.get("conversions") or []]
    if not configs:
        raise CheckpointError(f"{MOEIFY_CONFIG} lists no conversion")
    _restore_captured(model, record)
    for config in configs:
        try:
            # Routers initialised from data are rebuilt random: their weights come from the file.
            moeify(model, config.replace(verify=False, router_init="random"))
        except ConversionError as error:
            raise CheckpointError(
                f"the saved recipe does not apply to the rebuilt {type(model).__name__} (is it the base model this "
                f"checkpoint was converted from?): {error}"
            ) from error
    model.moeify_state.conversions = configs  # the recipes as saved (verify included)
    # The rebuild measured nothing (verify=False, no sources): the deviation is the one saved.
    model.moeify_state.deviation = record.get("deviation")
    if record.get("routing") is not None:
        try:
            routing_control(model).load_state_dict(record["routing"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{MOEIFY_CONFIG}: its routing settings cannot be read ({type(error).__name__}: {error})"
            ) from None
    name = (record.get("base") or {}).get("name_or_path")
    config = getattr(model, "config", None)
    if name and config is not None and hasattr(config, "_name_or_path"):
        config._name_or_path = name  # the card's base_model survives a save/load round trip
    return configs


def read_tensors(path: Path, device: torch.device | str) -> dict[str, Tensor]:
    """The tensors of one safetensors file. On CPU every tensor gets an allocation of its own, as
    transformers' loading gives: safetensors hands out views of the memory-mapped file, 8-byte
    aligned (matmul kernels then take other code paths and round differently, and grouped_mm wants
    16 bytes), on 4 KB file pages (a decode step that streams the weights ran 2.5% slower on them,
    benchmarks/RESULTS.md "generate()"), which training would then copy on write page by page."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            tensors[key] = tensor.clone() if tensor.device.type == "cpu" else tensor
    return tensors


def load_weights(model: nn.Module, files: list[Path], tied: dict[str, str], device: torch.device | str) -> None:
    state: dict[str, Tensor] = {}
    for path in files:
        state.update(read_tensors(path, device))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, source in tied.items():
        # One Parameter object under both names: assign=True then re-ties them.
        if source in params and not isinstance(state[source], nn.Parameter):
            state[source] = nn.Parameter(state[source], requires_grad=params[source].requires_grad)
        state[name] = state[source]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"the weights in {files[0].parent} do not fit the rebuilt model: {error}") from None


def restore_buffers(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Non-persistent buffers are rebuilt, not loaded: give them back the dtypes they had."""
    for name, dtype_name in dtypes.items():
        prefix, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue  # a buffer this version of the library no longer has
        buffer = module._buffers.get(attr)
        dtype = getattr(torch, dtype_name, None)
        if buffer is not None and isinstance(dtype, torch.dtype) and buffer.dtype != dtype:
            module._buffers[attr] = buffer.to(dtype)


def _check_materialised(model: nn.Module) -> None:
    meta = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if meta:
        raise CheckpointError(
            f"after loading, {len(meta)} tensor(s) are still on the meta device: {shown_names(meta)}. These are "
            "buffers the checkpoint does not hold (non-persistent): build base_model under "
            "accelerate.init_empty_weights() (which keeps buffers real), not torch.device('meta')"
        )


def from_pretrained(
    directory_or_repo_id: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
    revision: str | None = None,
    token: Any = None,
) -> nn.Module:
    """Load a model saved by `moeify.save_pretrained`, from a directory or a Hub repo id.

    The base model is rebuilt from its saved config on the meta device (no memory is paid twice),
    or `base_model` (the dense model, converted in place and returned; needed for plain
    nn.Modules, and its parameters may be on the meta device) is used; the conversion
    recipes are re-applied and the weights loaded strictly (`CheckpointError`, a ValueError,
    names any missing or unexpected key). Returns the model in eval mode, its outputs
    bit-identical to the saved model's; weights keep their saved dtypes, on `device` (CPU by default).
    The checkpoint's tokenizer / processor files travel with the model's later saves and exports.
    """
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"moeify.from_pretrained: device={device!r} is not a torch device ({error})") from None
    directory = resolve(directory_or_repo_id, revision=revision, token=token)
    record = read_record(directory)
    verify_checksums(directory, record)
    files = weight_files(directory, record)
    model = build_base(directory, record, base_model)
    reapply(model, record)
    tied = record.get("tied") or {}
    check_keys(model, files, tied, record.get("dtypes"))
    load_weights(model, files, tied, device if device is not None else "cpu")
    restore_buffers(model, record.get("buffer_dtypes") or {})
    _check_materialised(model)
    if device is not None:
        model.to(device)  # the non-persistent buffers; the weights are there already
    remember_source(model, directory)  # its tokenizer / processor files travel with later saves
    return model.eval()


__all__ = ["CheckpointError", "from_pretrained"]
