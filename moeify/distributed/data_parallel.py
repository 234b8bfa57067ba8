"""DDP for a converted model: what DDP must leave alone.

- The MoE layers' non-persistent buffers are per-rank routing accumulators, summed by the monitor
  runner's all-reduce; DDP's buffer broadcast (`broadcast_buffers=True`, its default) would copy
  rank 0's over every rank's at each forward (measured: wrong statistics under gradient
  accumulation, tests/test_distributed.py).
- Expert-parallel experts (moeify.distributed.apply_expert_parallel) are DTensors that each rank
  holds a different shard of; their gradients are complete after the exchange's backward, and DDP
  neither supports DTensor parameters nor should average them.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moeify.distributed.expert_parallel import expert_parameters
from moeify.layers.inventory import moe_layers


def _ignore(model: nn.Module, names: list[str]) -> None:
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    ignored += [name for name in names if name not in ignored]
    # torch's documented workaround until DDP has a public API (pytorch/pytorch#43690).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)


def keep_stats_local(model: nn.Module) -> list[str]:
    """Exclude the MoE layers' non-persistent buffers from DDP's buffer broadcast. Call before DDP
    wraps `model`; returns the buffer names DDP now ignores."""
    names = [
        f"{name}.{buffer}" for name, layer in moe_layers(model) for buffer in sorted(layer._non_persistent_buffers_set)
    ]
    _ignore(model, names)
    return names


def keep_experts_local(model: nn.Module) -> list[str]:
    """Exclude expert-parallel experts from DDP's gradient averaging. Returns their names."""
    experts = {id(p) for p in expert_parameters(model)}
    names = [name for name, p in model.named_parameters() if id(p) in experts]
    _ignore(model, names)
    return names


def data_parallel(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """`DistributedDataParallel(model, **ddp_kwargs)` for a converted model, expert-parallel or
    not: the routing accumulators stay per rank, the sharded experts stay out of DDP."""
    keep_stats_local(model)
    keep_experts_local(model)
    return DistributedDataParallel(model, **ddp_kwargs)
