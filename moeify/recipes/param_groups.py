"""Optimizer parameter groups for an upcycled model: what the conversion created trains apart from
what it copied.

Upcycling starts from pretrained weights everywhere but two places: the routers are random (Law 3)
and the shared experts start at zero (Law 2; then a 1e-4 noise by default). The copied parameters
(the routed experts, cloned from the dense FFN, and everything outside the FFNs) want the small
learning rate of continued pretraining; the new ones may want a larger one and their own warm-up,
and the routers no weight decay: decaying a router's weights toward zero shrinks its logits and
flattens its scores toward uniform, undecided routing (what `moeify.monitors.entropy` reports as
soft saturation, the failure "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers"
reports for linear routers).

    groups = moeify.param_groups(model, lr=1e-5, router_lr=1e-3, router_warmup=100, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups)
    scheduler = moeify.warmup_schedule(optimizer)  # step it once per optimizer step

Parameters are grouped by the module that holds them, so peft wrappers (a router's
`modules_to_save` copy, LoRA factors on shared experts) and expert-parallel DTensor shards land in
the group of the part they adapt or shard, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from moeify.checks import in_range
from moeify.layers.inventory import require_moe_layers

GROUP_NAMES = ("copied", "routers", "shared_experts")


def _check_number(name: str, value: object, interval: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    in_range(name, value, interval)  # "(0, inf)": inf fails too, a learning rate must be finite


def _check_steps(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (optimizer steps), got {type(value).__name__}")
    in_range(name, value, ">= 0", unit="steps")


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    router_lr: float | None = None,
    shared_lr: float | None = None,
    weight_decay: float = 0.0,
    router_weight_decay: float = 0.0,
    shared_weight_decay: float | None = None,
    router_warmup: int = 0,
    shared_warmup: int = 0,
    copied_warmup: int = 0,
) -> list[dict]:
    """torch optimizer param groups for a converted model (module docstring): "routers" (every
    parameter under a MoE layer's `.router`), "shared_experts" (under `.shared_experts`) and
    "copied" (everything else: routed experts, attention, embeddings, norms, adapters of those).

    Each group is a dict with "params", "lr", "weight_decay", "name" and "warmup_steps" (read by
    `warmup_schedule`); empty groups are left out. Only trainable parameters (`requires_grad`) are
    taken, each once (tied weights included). `router_lr` and `shared_lr` default to `lr`,
    `shared_weight_decay` to `weight_decay`; routers get no weight decay unless asked.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups takes an nn.Module, got {type(model).__name__}")
    router_lr = lr if router_lr is None else router_lr
    shared_lr = lr if shared_lr is None else shared_lr
    shared_weight_decay = weight_decay if shared_weight_decay is None else shared_weight_decay
    for name, value in (("lr", lr), ("router_lr", router_lr), ("shared_lr", shared_lr)):
        _check_number(name, value, "(0, inf)")
    for name, value in (
        ("weight_decay", weight_decay),
        ("router_weight_decay", router_weight_decay),
        ("shared_weight_decay", shared_weight_decay),
    ):
        _check_number(name, value, "[0, inf)")
    for name, value in (
        ("router_warmup", router_warmup),
        ("shared_warmup", shared_warmup),
        ("copied_warmup", copied_warmup),
    ):
        _check_steps(name, value)
    layers = require_moe_layers(model, "param_groups")

    # By identity, not by name: peft and FSDP/EP wrappers rename parameters but keep the modules.
    router_ids = {id(p) for _, layer in layers for p in layer.router.parameters()}
    shared_ids = {
        id(p) for _, layer in layers if layer.shared_experts is not None for p in layer.shared_experts.parameters()
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for _, param in model.named_parameters():  # deduplicates tied parameters
        if not param.requires_grad:
            continue
        group = "routers" if id(param) in router_ids else "shared_experts" if id(param) in shared_ids else "copied"
        members[group].append(param)
    if not any(members.values()):
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameter (requires_grad)")
    settings = {
        "copied": (lr, weight_decay, copied_warmup),
        "routers": (router_lr, router_weight_decay, router_warmup),
        "shared_experts": (shared_lr, shared_weight_decay, shared_warmup),
    }
    return [
        {
            "params": members[name],
            "lr": float(settings[name][0]),
            "weight_decay": float(settings[name][1]),
            "name": name,
            "warmup_steps": settings[name][2],
        }
        for name in GROUP_NAMES
        if members[name]
    ]


def _linear_warmup(steps: int) -> Callable[[int], float]:
    # Scheduler step s (0 at construction) runs at (s + 1) / (steps + 1) of the group's lr: the
    # first update is already non-zero, and step `steps` reaches the full rate.
    return lambda step: min(1.0, (step + 1) / (steps + 1))


def warmup_schedule(optimizer: Optimizer) -> LambdaLR:
    """A LambdaLR giving each param group a linear warm-up over its "warmup_steps" (from
    `param_groups`; a group without the key, or with 0, runs at its lr from the start): the lr
    factor at scheduler step s is min(1, (s + 1) / (w + 1)). Step it once per optimizer step.
    Works on the optimizer `moeify.guard_bf16` returns (its groups are the model's own)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"warmup_schedule takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    steps = []
    for i, group in enumerate(optimizer.param_groups):
        value = group.get("warmup_steps", 0)
        name = f"param group {group.get('name', i)!r} warmup_steps"
        _check_steps(name, value)
        steps.append(value)
    return LambdaLR(optimizer, [_linear_warmup(w) for w in steps])


__all__ = ["GROUP_NAMES", "param_groups", "warmup_schedule"]
