"""What a model holds, by module: its moeify MoE layers, its parameter counts, its peft wrappers,
and the model itself inside torch.compile / DDP / FSDP2 wrappers.

Read by every part that works on a converted model (monitors, control, hub, distributed,
integrations), so it sits with the layers and imports nothing above them.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from moeify.layers.moe import MoeLayer


def moe_layers(model: nn.Module) -> list[tuple[str, MoeLayer]]:
    """Every moeify MoE layer of a model, with its module name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoeLayer)]


def require_moe_layers(model: nn.Module, where: str = "") -> list[tuple[str, MoeLayer]]:
    """`moe_layers(model)`, or a ValueError saying to convert it first (prefixed with `where`)."""
    layers = moe_layers(model)
    if not layers:
        raise no_moe_layers(model, where)
    return layers


def no_moe_layers(model: nn.Module, where: str = "") -> ValueError:
    """The error for a model that should have been converted and was not."""
    prefix = f"{where}: " if where else ""
    return ValueError(f"{prefix}{type(model).__name__} has no moeify MoE layers: call moeify(model) first")


def conversion_recipes(model: nn.Module, where: str = "") -> list[dict[str, Any]]:
    """The recipes `model` was converted with (`model.moeify_state.conversions`, as dicts): what a
    checkpoint records and checks on load. A ValueError, prefixed with `where`, if it was not."""
    state = getattr(model, "moeify_state", None)
    if state is None or not state.conversions:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}this {type(model).__name__} was not converted by moeify: call moeify(model) first")
    return [config.to_dict() for config in state.conversions]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, those a token runs through (everything outside the MoE layers; per MoE
    layer its router and shared experts, and top_k of its E routed experts), and those of the
    dense model it was converted from (the routed experts are clones of its FFN: one per layer;
    with granularity G, G experts are its slices, each with the whole output bias)."""
    total = sum(p.numel() for p in model.parameters())
    active = dense = total
    for _, layer in moe_layers(model):
        in_layer = sum(p.numel() for p in layer.parameters())
        routed = sum(p.numel() for p in layer.experts.parameters())
        per_expert = routed // layer.num_experts
        active -= routed - layer.top_k * per_expert
        dense_ffn = per_expert
        if layer.granularity > 1:  # packed slices, each holding the whole output bias
            b_out = layer.experts.b_out
            dense_ffn = layer.granularity * per_expert - (layer.granularity - 1) * (
                0 if b_out is None else b_out.shape[-1]
            )
        dense -= in_layer - dense_ffn
    return {"total": total, "active_per_token": active, "dense": dense}


def human(count: int) -> str:
    """A parameter count as text: 1.24B, 135.00M, 4.10K, 512."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def is_peft_module(module: nn.Module) -> bool:
    """True for a module whose class comes from peft (a tuner layer, a wrapper, a PeftModel). Read
    from the class's module name, so peft (~3 s to import) is never imported to ask."""
    return type(module).__module__.split(".")[0] == "peft"


def peft_module_name(model: nn.Module) -> str | None:
    """The name of the first peft module in `model` ("" for the model itself), or None."""
    return next((name for name, module in model.named_modules() if is_peft_module(module)), None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DistributedDataParallel's wrappers (their state dict
    keys carry a prefix that the rebuilt model does not have)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_class(model: nn.Module) -> type:
    """The model's own class. FSDP2's `fully_shard` swaps it for a dynamic subclass
    `FSDP<Name>(FSDPModule, <Name>)`, which a saved checkpoint must not name."""
    cls = type(model)
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        return next(base for base in cls.__bases__ if not issubclass(base, fsdp_module))
    return cls
