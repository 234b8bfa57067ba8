"""A local transformers or diffusers model directory: what it holds, and its dense model.

Told apart by config.json: transformers writes `model_type`, diffusers `_class_name`; a moeify
checkpoint has moeify_config.json. Weights are read from safetensors only (never unpickled).
Used by the `moeify` command; errors are `CheckpointError` (a ValueError) with the remedy.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from moeify.hub.load import CheckpointError
from moeify.hub.save import MOEIFY_CONFIG


def detect(path: Path) -> tuple[str, str | None]:
    """(library, class name) of a checkpoint directory: "moeify", "transformers" or "diffusers"."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: give the model directory (the one holding config.json)")
    if (path / MOEIFY_CONFIG).is_file():
        return "moeify", None
    if (path / "model_index.json").is_file():
        raise CheckpointError(
            f"{path} is a diffusers pipeline: give one of its model folders, e.g. {path / 'transformer'}"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a transformers or diffusers model directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
        return "diffusers", config["_class_name"]
    if isinstance(config, dict) and isinstance(config.get("model_type"), str):
        architectures = config.get("architectures") or [None]
        return "transformers", architectures[0]
    raise CheckpointError(f"{config_path} has neither `model_type` (transformers) nor `_class_name` (diffusers)")


def _model_class(library: str, class_name: str | None) -> type:
    module = __import__(library)
    cls = getattr(module, class_name, None) if class_name else None
    if library == "transformers" and cls is None:
        return module.AutoModel  # no (known) `architectures`: the base model
    if cls is None:
        raise CheckpointError(f"diffusers {module.__version__} has no model class {class_name}")
    return cls


def _require_safetensors(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"{path} has no .safetensors weights; moeify never unpickles (.bin/.pt can run code): "
            "convert the checkpoint to safetensors first"
        )


def load_dense(path: Path, library: str, class_name: str | None, *, empty: bool) -> nn.Module:
    """The dense model of a checkpoint directory; `empty`: built from its config on the meta
    device (no weights read), enough for a dry run."""
    from accelerate import init_empty_weights

    cls = _model_class(library, class_name)
    if library == "transformers":
        if empty:
            import transformers

            config = transformers.AutoConfig.from_pretrained(path)
            with init_empty_weights():
                model = cls.from_config(config) if hasattr(cls, "_model_mapping") else cls._from_config(config)
            # Under init_empty_weights transformers 5 leaves tied weights untied (measured: a tied
            # Llama's lm_head is its own meta tensor), and the counts would hold the embedding twice
            # (28.3M too many for SmolLM2-135M). Loading ties them; so does this.
            model.tie_weights()
            return model
        _require_safetensors(path)
        return cls.from_pretrained(path, use_safetensors=True)
    if empty:
        with init_empty_weights():
            return cls.from_config(cls.load_config(path))
    _require_safetensors(path)
    return cls.from_pretrained(path, use_safetensors=True)
