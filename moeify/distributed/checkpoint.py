"""Checkpoints of a model that is sharded over ranks (expert parallelism, FSDP2).

- `save_sharded` / `load_sharded`: `torch.distributed.checkpoint` (DCP). Every rank writes its own
  shards, nobody gathers a whole expert; a checkpoint loads into any other layout of the same
  model (ep_size 2 -> 4, 2 -> 1, FSDP2 or not) and into one process without a process group,
  since DCP stores global shapes and offsets and reshards on load. Optimizer state included.
  Written crash-safe (moeify.atomic): a save that fails or is killed leaves the old checkpoint.
  Beside DCP's files, `moeify_sharded.json` holds the conversion recipes (checked on load) and the
  routing control's state: JSON, nothing is unpickled.
- `full_state_dict`: the model's state dict with every DTensor gathered (a collective), for
  `moeify.save_pretrained`, whose single-process format needs whole tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from moeify.atomic import as_directory, staged_for_ranks
from moeify.control.routing import routing_control
from moeify.layers.inventory import conversion_recipes, unwrap

RECORD = "moeify_sharded.json"
FORMAT = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with each DTensor gathered whole (`full_tensor`, a collective: call on
    every rank). Tensors that share storage (tied weights) still share it, as in one process."""
    gathered: dict[int, Tensor] = {}
    out = {}
    for name, value in unwrap(model).state_dict().items():
        if isinstance(value, DTensor):
            if id(value) not in gathered:
                whole = value.full_tensor()
                # FSDP2 pads uneven shards (1 shared expert over 2 ranks): the gathered tensor can be a
                # view into a larger buffer, which safetensors refuses to write ("None is covering the
                # entire storage").
                if whole.untyped_storage().nbytes() != whole.numel() * whole.element_size():
                    whole = whole.clone()
                gathered[id(value)] = whole
            value = gathered[id(value)]
        out[name] = value
    return out


def save_sharded(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Save `model` (and `optimizer`) with torch.distributed.checkpoint into `directory`, each rank
    its own shards. Call on every rank (or in one process). Returns the directory."""
    caller = "moeify.distributed.save_sharded"
    target = as_directory(directory, caller)
    model = unwrap(model)
    record = {"format": FORMAT, "recipes": conversion_recipes(model, caller)}
    routing = getattr(model.moeify_state, "routing", None)
    if routing is not None:
        record["routing"] = routing.state_dict()
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    state = {"model": model_state, **({"optimizer": optim_state} if optimizer is not None else {})}
    is_main = not _distributed() or dist.get_rank() == 0
    with staged_for_ranks(target, is_main=is_main, barrier=_barrier, tag="dcp") as staging:
        dcp.save(state, checkpoint_id=staging, no_dist=not _distributed())
        if is_main:
            (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return target


def load_sharded(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a `save_sharded` checkpoint into `model` (and `optimizer`) in place, whatever the layout
    it was saved from: another ep_size, FSDP2 or not, several processes or one. Checked first: the
    directory is such a checkpoint, written for a model converted with the same recipes."""
    caller = "moeify.distributed.load_sharded"
    source = as_directory(directory, caller)
    model = unwrap(model)
    record_path = source / RECORD
    if not record_path.is_file():
        raise FileNotFoundError(f"{caller}: {source} is not a moeify sharded checkpoint (no {RECORD})")
    record = json.loads(record_path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{caller}: {record_path} has format {record.get('format')!r}; this moeify reads {FORMAT}")
    if record["recipes"] != conversion_recipes(model, caller):
        raise ValueError(
            f"{caller}: {source} was written for a model converted with other recipes:\n"
            f"  checkpoint: {json.dumps(record['recipes'], sort_keys=True)}\n"
            f"  this model: {json.dumps(conversion_recipes(model, caller), sort_keys=True)}\n"
            "convert the model with the checkpoint's recipe first"
        )
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, **({"optimizer": optim_state} if optimizer is not None else {})}
    dcp.load(state, checkpoint_id=source, no_dist=not _distributed())
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))
    if "routing" in record:
        routing_control(model).load_state_dict(record["routing"])


__all__ = ["full_state_dict", "load_sharded", "save_sharded"]
