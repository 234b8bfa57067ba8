"""The registries: FFN classes → layouts, classes that must be skipped → reasons, models →
where their conditioning comes from. Plus the structural probe for classes nobody registered.

Register with `register_ffn`, `register_skip`, `register_conditioning`; duplicates are refused.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moeify.architectures.layouts import FFNLayout, get

# A resolver looks at an instance and returns its layout, or a string: the reason to skip it.
Resolver = Callable[[nn.Module], "FFNLayout | str"]


@dataclass(frozen=True)
class Conditioning:
    """Where a model's conditioning comes from: the forward argument and the config attribute
    holding its feature size."""

    arg: str
    dim_attr: str


_FFN: dict[str, FFNLayout | Resolver] = {}
_SKIP: dict[str, str] = {}
_CONDITIONING: dict[str, Conditioning] = {}


def _refuse_duplicate(table: dict, key: str, what: str) -> None:
    if key in table:
        raise ValueError(f"{what} {key!r} is already registered")


def register_ffn(class_name: str, layout: FFNLayout | Resolver) -> None:
    """Teach moeify an FFN class: a layout (data), or a resolver for classes built from options."""
    _refuse_duplicate(_FFN, class_name, "an FFN class")
    _FFN[class_name] = layout


def register_skip(class_name: str, reason: str) -> None:
    """Name a class that must never be converted, with the reason users will read."""
    _refuse_duplicate(_SKIP, class_name, "a skipped class")
    _SKIP[class_name] = reason


def register_conditioning(model_class_name: str, arg: str, dim_attr: str) -> None:
    """Tell the cross-attention router where a model's conditioning comes from."""
    _refuse_duplicate(_CONDITIONING, model_class_name, "a conditioning entry for")
    _CONDITIONING[model_class_name] = Conditioning(arg, dim_attr)


def registered_ffn_classes() -> tuple[str, ...]:
    return tuple(sorted(_FFN))


def conditioning_for(model: nn.Module) -> Conditioning | None:
    for cls in type(model).__mro__:
        if cls.__name__ in _CONDITIONING:
            return _CONDITIONING[cls.__name__]
    return None


# ---------------------------------------------------------------------------------------------
# Classification of one module

# Anchored at the end: the MoE *block* (MixtralSparseMoeBlock, DeepseekV3MoE), not every class of
# a MoE model (Qwen2MoeModel, Qwen2MoeDecoderLayer, the dense Qwen2MoeMLP of `mlp_only_layers`).
_MOE_NAME = re.compile(r"(moe|mixtureofexperts|sparse\w*block|switch\w*(mlp|ff))$", re.IGNORECASE)

# The probe: projection names seen across the ecosystem, as (gate, up, down) for gated FFNs,
# (gate_up, down) for fused gated, (in, out) for plain MLPs.
PROBE_GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("wi_0", "wi_1", "wo"))
PROBE_FUSED = (("gate_up_proj", "down_proj"),)
PROBE_MLP = (
    ("fc1", "fc2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("wi", "wo"),
    ("up_proj", "down_proj"),
    ("w1", "w2"),
    ("fc_in", "fc_out"),
    ("lin1", "lin2"),
)


@dataclass(frozen=True)
class Classified:
    layout: FFNLayout | None  # None: skip
    source: str  # "registry" | "probe"
    reason: str = ""


def required_positional_args(module: nn.Module) -> list[str]:
    """Names of the forward's required arguments (an FFN takes exactly one: the hidden states)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ["<unknown>"]
    return [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def looks_like_moe(module: nn.Module) -> bool:
    children = dict(module.named_children())
    return bool(_MOE_NAME.search(type(module).__name__)) or (
        "experts" in children and any(k in children for k in ("gate", "router"))
    )


def _is_projection(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None)
    return module is not None and getattr(weight, "dim", lambda: 0)() == 2 and not isinstance(module, nn.Embedding)


def _activation_child(module: nn.Module, taken: set[str]) -> str | None:
    """The one parameter-free, non-dropout child: the activation."""
    names = [
        name
        for name, child in module.named_children()
        if name not in taken
        and not isinstance(child, (nn.Dropout, nn.Identity))
        and not any(True for _ in child.parameters())
    ]
    return names[0] if len(names) == 1 else None


def _dropout_child(module: nn.Module) -> str | None:
    names = [name for name, child in module.named_children() if isinstance(child, nn.Dropout)]
    return names[0] if len(names) == 1 else None


def probe(module: nn.Module) -> FFNLayout | None:
    """Recognise an unregistered FFN by the names and shapes of its children. Whatever the probe
    guesses is then checked numerically by the identity check at conversion."""
    children = dict(module.named_children())
    candidates: list[tuple[str, tuple[str, ...]]] = (
        [("gated", names) for names in PROBE_GATED]
        + [("fused_gated", names) for names in PROBE_FUSED]
        + [("mlp", names) for names in PROBE_MLP]
    )
    for kind, names in candidates:
        if not all(_is_projection(children.get(n)) for n in names):
            continue
        act = _activation_child(module, set(names))
        if act is None:
            continue
        dropout = _dropout_child(module)
        if kind == "gated":
            gate, up, down = names
            return FFNLayout("gated", proj_in=up, proj_gate=gate, proj_out=down, act=act, mid_dropout=dropout)
        return FFNLayout(kind, proj_in=names[0], proj_out=names[-1], act=act, mid_dropout=dropout)
    return None


def classify(module: nn.Module) -> Classified | None:
    """Registry first, then the MoE check, then the structural probe; None when it is no FFN."""
    name = type(module).__name__
    if name in _SKIP:
        return Classified(None, "registry", _SKIP[name])
    entry = _FFN.get(name)
    if entry is not None:
        layout = entry(module) if callable(entry) and not isinstance(entry, FFNLayout) else entry
        if isinstance(layout, str):
            return Classified(None, "registry", layout)
        return Classified(layout, "registry")
    if looks_like_moe(module):
        return Classified(None, "probe", "already a Mixture-of-Experts block")
    layout = probe(module)
    if layout is None:
        return None
    required = required_positional_args(get(module, layout.install_at))
    if len(required) != 1:
        return Classified(
            None,
            "probe",
            f"looks like an FFN but its forward takes {required}: moeify replaces FFNs called with the hidden states alone",
        )
    return Classified(layout, "probe")
