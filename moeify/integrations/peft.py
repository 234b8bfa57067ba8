"""peft glue: adapters on converted models, the common training recipes, a trainable summary.

    model = moeify.moeify(model, num_experts=8, top_k=2, shared_expert_init="zero_out")
    moeify.save_pretrained(model, "base")                  # the frozen base, before get_peft_model
    model = get_peft_model(model, moeify.lora_config(model, recipe="routers+lora", r=8))
    print_trainable_parameters(model)                       # routers / routed / shared / other
    loss = model(**batch).loss + moeify.aux_loss(model)
    model.save_pretrained("adapter")                        # peft's own files
    model = PeftModel.from_pretrained(moeify.from_pretrained("base"), "adapter")

How each part of a MoE layer is adapted:
- routers: trained in full, as peft `modules_to_save` (a trainable copy, saved with the adapter).
- packed experts (`PackedExperts`: `w_in` [E, I or 2I, D], `w_out` [E, D, I]): peft's
  `target_parameters`. Its `ParamWrapper` reads a 3-D parameter as [E, out, in] (our layout and
  transformers' MoE layout, peft >= 0.19), holds `lora_A` [E*r, in] and `lora_B` [out, E*r], and
  adds `(alpha / r) * B_e @ A_e` to expert e's slice only, with A_e = lora_A rows e*r..e*r+r-1 and
  B_e = lora_B columns e, e+E, e+2E...: every expert its own rank-r adapter (checked against a
  hand-computed LoRA in tests/test_peft.py). Gated layouts keep [gate; up] stacked in `w_in`, so
  gate and up share one rank-r adapter per expert, as with transformers' `gate_up_proj`. peft's
  limits there: lora_dropout=0, no DoRA, no lora_bias, and LoRA only (no other method has
  parameter targets).
- generic experts (`ModuleExperts`, copies of a module): the nn.Linear inside each copy, by name,
  so LoRA or any peft method that targets nn.Linear works (`moe_targets` lists the names).
- shared experts: the same two ways. With the "noise" init both projections start near zero and a
  LoRA on them has almost no gradient; convert with shared_expert_init="zero_out" for LoRA recipes.

One adapter cannot hold LoRA on packed experts and on transformers `Conv1D` layers (GPT-2's
attention): peft turns fan_in_fan_out on for those, which its parameter LoRA refuses, so "full" is
refused there with the reason. The homogenization monitor reads adapted experts as W + ΔW
(`adapted_expert_weights`), so it sees the experts diverge through their adapters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

try:
    import peft
    from peft import LoraConfig
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.constants import DUMMY_TARGET_MODULES
except ImportError as error:  # pragma: no cover - peft is a core dependency
    raise ImportError("moeify.integrations.peft needs peft: pip install 'peft>=0.19'") from error

from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.inventory import is_peft_module, moe_layers, peft_module_name, require_moe_layers
from moeify.monitors.homogenization import register_expert_weight_reader

RECIPES = {
    "routers+shared": "routers and shared experts trained in full (modules_to_save), no LoRA, the rest frozen",
    "routers+lora": "routers trained in full, LoRA on routed (one adapter per expert) and shared experts, "
    "the rest frozen",
    "full": "routers trained in full, LoRA on routed and shared experts and on every linear layer outside the MoE "
    "layers but the output head (attention, FFNs left dense), the rest frozen",
}
GROUPS = ("routers", "routed_experts", "shared_experts", "other")
_PART_GROUPS = {"router": "routers", "experts": "routed_experts", "shared_experts": "shared_experts"}
# peft's LoRA on a parameter adds B·A to the weight itself, which rules these out (peft raises).
_PACKED_LIMITS = {"lora_dropout": 0.0, "use_dora": False, "lora_bias": False, "fan_in_fan_out": False}
_RECIPE_KEYS = ("target_modules", "target_parameters", "modules_to_save")
PACKED_MIN_PEFT = (0, 19)  # peft < 0.19 reads a 3-D parameter as [E, in, out]


@dataclass
class MoeTargets:
    """Names (relative to the converted model) of what a peft config can target in it."""

    routers: list[str] = field(default_factory=list)  # router modules (for modules_to_save)
    shared: list[str] = field(default_factory=list)  # shared-expert modules (for modules_to_save)
    routed_modules: list[str] = field(default_factory=list)  # nn.Linear inside generic routed experts
    routed_parameters: list[str] = field(default_factory=list)  # 3-D packed routed weights
    shared_modules: list[str] = field(default_factory=list)
    shared_parameters: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)  # linear layers outside the MoE layers, output head excluded


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _expert_targets(prefix: str, experts: nn.Module) -> tuple[list[str], list[str]]:
    """(module names, parameter names) that give each expert of `experts` its own adapter."""
    if isinstance(experts, PackedExperts):
        return [], [f"{prefix}.w_in", f"{prefix}.w_out"]
    if isinstance(experts, ModuleExperts):
        linear = _linear_types()
        return [f"{prefix}.{name}" for name, m in experts.named_modules() if isinstance(m, linear)], []
    raise TypeError(
        f"{prefix} is a {type(experts).__name__}, not moeify's PackedExperts / ModuleExperts: build the peft config "
        "before get_peft_model wraps the model"
    )


def moe_targets(model: nn.Module) -> MoeTargets:
    """Every router, expert and dense linear layer of a converted model, by name, for peft configs."""
    _check_plain(model)
    layers = require_moe_layers(model)
    targets = MoeTargets()
    for name, layer in layers:
        targets.routers.append(f"{name}.router")
        modules, params = _expert_targets(f"{name}.experts", layer.experts)
        targets.routed_modules += modules
        targets.routed_parameters += params
        if layer.shared_experts is not None:
            targets.shared.append(f"{name}.shared_experts")
            modules, params = _expert_targets(f"{name}.shared_experts", layer.shared_experts)
            targets.shared_modules += modules
            targets.shared_parameters += params
    inside = tuple(f"{name}." for name, _ in layers)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = _linear_types()
    targets.dense = [
        name
        for name, module in model.named_modules()
        if isinstance(module, linear) and module is not head and not name.startswith(inside)
    ]
    return targets


def _check_plain(model: nn.Module) -> None:
    wrapped = peft_module_name(model)
    if wrapped is not None:
        raise ValueError(
            f"{type(model).__name__} already holds peft modules ({wrapped or 'the model itself'}): build the config "
            "from the converted model before get_peft_model, and reuse it (peft_model.add_adapter(name, config))"
        )


def _check_packed(lora_kwargs: dict[str, Any]) -> None:
    version = tuple(int(part) for part in peft.__version__.split(".")[:2])
    if version < PACKED_MIN_PEFT:
        raise ImportError(
            f"LoRA on packed experts needs peft >= 0.19, which reads 3-D expert weights as [E, out, in] "
            f"(peft {peft.__version__} reads [E, in, out]): pip install -U 'peft>=0.19'"
        )
    for key, allowed in _PACKED_LIMITS.items():
        if key in lora_kwargs and lora_kwargs[key] != allowed:
            raise ValueError(
                f"{key}={lora_kwargs[key]!r} cannot apply to packed experts: peft's LoRA on a 3-D expert weight "
                f"(target_parameters) adds B·A to the weight itself, so it takes only {key}={allowed!r}"
            )


def _check_no_conv1d(model: nn.Module, modules: list[str]) -> None:
    from transformers.pytorch_utils import Conv1D

    conv1d = [name for name in modules if isinstance(model.get_submodule(name), Conv1D)]
    if conv1d:
        raise ValueError(
            f"LoRA cannot cover both {conv1d[0]} (a transformers Conv1D, {len(conv1d)} in all) and the packed experts "
            "in one adapter: peft switches fan_in_fan_out on for Conv1D layers, and its LoRA on 3-D expert weights "
            "refuses fan_in_fan_out. Use recipe='routers+lora', or build a LoraConfig from moe_targets(model) "
            "without the Conv1D layers."
        )


def _warn_noise_shared(model: nn.Module, targets: MoeTargets) -> None:
    state = getattr(model, "moeify_state", None)
    if targets.shared and state is not None and state.config.shared_expert_init == "noise":
        # Measured on the tiny Llama of tests/test_peft.py: shared LoRA-B gradients ~1e-6 against
        # ~5e-2 for the routed experts' (both projections start at std 1e-4).
        warnings.warn(
            "LoRA on shared experts converted with shared_expert_init='noise' barely trains: both of their "
            "projections start near zero, so the low-rank updates get almost no gradient. Convert with "
            "shared_expert_init='zero_out', or train the shared experts in full (recipe='routers+shared').",
            stacklevel=3,
        )


def lora_config(model: nn.Module, recipe: str = "routers+lora", **lora_kwargs: Any) -> LoraConfig:
    """A `peft.LoraConfig` for a converted model, by recipe (see `RECIPES`):

    - "routers+shared": routers and shared experts trained in full (`modules_to_save`), no LoRA.
    - "routers+lora": routers trained in full; LoRA on the routed experts (each expert its own
      adapter) and on the shared experts; everything else frozen.
    - "full": "routers+lora" plus LoRA on every linear layer outside the MoE layers except the
      output head (as peft's "all-linear"): attention, and any FFN left dense.

    `lora_kwargs` go to `LoraConfig` (r, lora_alpha, init_lora_weights, ...); the recipe sets
    `target_modules`, `target_parameters` and `modules_to_save` (build your own config from
    `moe_targets(model)` to choose them). Call it before `get_peft_model`, on the converted model.
    """
    if recipe not in RECIPES:
        listed = "; ".join(f"{name!r}: {text}" for name, text in RECIPES.items())
        raise ValueError(f"unknown recipe {recipe!r}; the recipes are {listed}")
    given = [key for key in _RECIPE_KEYS if key in lora_kwargs]
    if given:
        raise ValueError(
            f"the recipe sets {', '.join(given)}; to choose them yourself build a LoraConfig from "
            "moeify.integrations.peft.moe_targets(model)"
        )
    targets = moe_targets(model)
    if recipe == "routers+shared":
        # peft has no adapter-free config; DUMMY_TARGET_MODULES is its own marker for "no LoRA
        # layer" (X-LoRA uses it), and modules_to_save still works with it.
        saved = targets.routers + targets.shared
        return LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=saved, **lora_kwargs)
    _warn_noise_shared(model, targets)
    modules = targets.routed_modules + targets.shared_modules + (targets.dense if recipe == "full" else [])
    parameters = targets.routed_parameters + targets.shared_parameters
    if parameters:
        _check_packed(lora_kwargs)
        _check_no_conv1d(model, modules)
    return LoraConfig(
        target_modules=modules, target_parameters=parameters or None, modules_to_save=targets.routers, **lora_kwargs
    )


def _with_deltas(layer: Any, weight: Tensor) -> Tensor:
    """`weight` plus the delta of every active adapter a peft layer holds, as its forward applies them."""
    if layer.merged or layer.disable_adapters or not hasattr(layer, "get_delta_weight"):
        return weight.detach()  # merged: already in the weight; IA3-style scalings have no delta weight
    present = layer._get_available_adapters()
    deltas = [layer.get_delta_weight(name).detach() for name in layer.active_adapters if name in present]
    return weight.detach() + sum(deltas) if deltas else weight.detach()


def _effective_parameters(module: nn.Module) -> list[Tensor]:
    """A module's parameters, in order, with each peft-adapted weight read as W + ΔW and the
    adapters' own factors left out."""
    if isinstance(module, BaseTunerLayer):
        base = module.get_base_layer()
        return [_with_deltas(module, base.weight)] + ([base.bias.detach()] if base.bias is not None else [])
    own = [p.detach() for p in module.parameters(recurse=False)]
    return own + [t for child in module.children() for t in _effective_parameters(child)]


def adapted_expert_weights(experts: nn.Module) -> list[Tensor | list[Tensor]]:
    """What `moeify.monitors.homogenization.expert_weights` reads, for experts holding peft adapters:
    per parameter, the E experts' weights as the forward sees them (W + ΔW of the active adapters)."""
    deltas: dict[str, Tensor] = {}
    while isinstance(experts, ParamWrapper):  # LoRA on packed weights: one wrapper per parameter
        param = experts.get_param()
        deltas[experts.parameter_name] = _with_deltas(experts, param) - param.detach()
        experts = experts.base_layer
    if isinstance(experts, PackedExperts):
        params = [
            (n, getattr(experts, n)) for n in ("w_in", "b_in", "w_out", "b_out") if getattr(experts, n) is not None
        ]
        return [(p.detach() + deltas.get(n, 0)).reshape(experts.num_experts, -1) for n, p in params]
    if isinstance(experts, ModuleExperts):
        per_expert = [[t.reshape(-1) for t in _effective_parameters(e)] for e in experts.experts]
        return [list(group) for group in zip(*per_expert)]
    raise TypeError(f"expected moeify experts under peft adapters, got {type(experts).__name__}")


def _holds_adapters(experts: nn.Module) -> bool:
    return any(is_peft_module(m) for m in experts.modules())


register_expert_weight_reader(_holds_adapters, adapted_expert_weights)


def _group_of(name: str, layer_names: set[str]) -> str:
    """routers / routed_experts / shared_experts / other, from a parameter's name."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in layer_names:
            return _PART_GROUPS.get(parts[end], "other")
    return "other"


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameter counts per group (routers, routed_experts, shared_experts,
    other) and over the whole model ("all"), for a converted model with or without peft. Adapter
    weights count in the group they adapt; a `modules_to_save` part counts twice (its frozen
    original and its trained copy), as in peft's `print_trainable_parameters`."""
    layer_names = {name for name, _ in moe_layers(model)}
    summary = {group: {"trainable": 0, "total": 0} for group in (*GROUPS, "all")}
    for name, param in model.named_parameters():
        count = param.numel()
        for group in (_group_of(name, layer_names), "all"):
            summary[group]["total"] += count
            summary[group]["trainable"] += count if param.requires_grad else 0
    return summary


def format_summary(summary: dict[str, dict[str, int]]) -> str:
    """peft's `print_trainable_parameters` line, then the trainable / total count of each group."""
    total = summary["all"]
    percent = 100 * total["trainable"] / max(total["total"], 1)
    parts = [f"{g.replace('_', ' ')} {summary[g]['trainable']:,}/{summary[g]['total']:,}" for g in GROUPS]
    return (
        f"trainable params: {total['trainable']:,} || all params: {total['total']:,} || trainable%: {percent:.4f}"
        f" || {' · '.join(parts)}"
    )


def print_trainable_parameters(model: nn.Module) -> None:
    print(format_summary(trainable_summary(model)))


__all__ = [
    "GROUPS",
    "RECIPES",
    "MoeTargets",
    "adapted_expert_weights",
    "format_summary",
    "lora_config",
    "moe_targets",
    "print_trainable_parameters",
    "trainable_summary",
]
