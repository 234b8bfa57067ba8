"""The registries: FFN classes → layouts, classes that must be skipped → reasons, models →
where their conditioning comes from. Keyed by the fully qualified class (`module.QualName`),
never the bare name: several libraries and models define a class called `FeedForward`.

Discovery does not need them (moeify.surgery.discover finds FFNs by dataflow); an entry is an
override (a class that must be skipped, an FFN dataflow cannot see) and a fast path (no trace).
Register with `register_ffn`, `register_skip`, `register_conditioning`; duplicates are refused.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moeify.architectures.layouts import FFNLayout
from moeify.registry import Registry

# A resolver looks at an instance and returns its layout, or a string: the reason to skip it.
Resolver = Callable[[nn.Module], "FFNLayout | str"]


@dataclass(frozen=True)
class Conditioning:
    """Where a model's conditioning comes from: the forward argument and the config attribute
    holding its feature size."""

    arg: str
    dim_attr: str


_FFN: Registry[str, FFNLayout | Resolver] = Registry("FFN class", duplicate="an FFN class")
_SKIP: Registry[str, str] = Registry("skipped class", duplicate="a skipped class")
_CONDITIONING: Registry[str, Conditioning] = Registry("conditioning entry", duplicate="a conditioning entry for")


def qualified_name(cls: type | str) -> str:
    """`package.module.QualName` of a class, or the string given, checked to be qualified."""
    if isinstance(cls, type):
        return f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(cls, str) or "." not in cls:
        raise ValueError(
            f"register a class by the class itself or its fully qualified name ('package.module.ClassName'), "
            f"got {cls!r}: a bare name would also match unrelated classes that happen to share it"
        )
    return cls


def class_key(module: nn.Module) -> str:
    return qualified_name(type(module))


def register_ffn(cls: type | str, layout: FFNLayout | Resolver) -> None:
    """Teach moeify an FFN class: a layout (data), or a resolver for classes built from options."""
    _FFN.register(qualified_name(cls), layout)


def register_skip(cls: type | str, reason: str) -> None:
    """Name a class that must never be converted, with the reason users will read."""
    _SKIP.register(qualified_name(cls), reason)


def register_conditioning(model_cls: type | str, arg: str, dim_attr: str) -> None:
    """Tell the cross-attention router where a model's conditioning comes from."""
    _CONDITIONING.register(qualified_name(model_cls), Conditioning(arg, dim_attr))


def registered_ffn_classes() -> tuple[str, ...]:
    return tuple(_FFN.names())


def conditioning_for(model: nn.Module) -> Conditioning | None:
    for cls in type(model).__mro__:
        found = _CONDITIONING.get(qualified_name(cls))
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# Classification of one module

# Anchored at the end: the MoE *block* (MixtralSparseMoeBlock, DeepseekV3MoE), not every class of
# a MoE model (Qwen2MoeModel, Qwen2MoeDecoderLayer, the dense Qwen2MoeMLP of `mlp_only_layers`).
_MOE_NAME = re.compile(r"(moe|mixtureofexperts|sparse\w*block|switch\w*(mlp|ff))$", re.IGNORECASE)


@dataclass(frozen=True)
class Classified:
    layout: FFNLayout | None  # None: skip
    source: str  # "registry" | "moe"
    reason: str = ""


def required_positional_args(module: nn.Module) -> list[str]:
    """Names of the forward's required arguments (an FFN takes exactly one: the hidden states)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ["<unknown>"]
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def looks_like_moe(module: nn.Module) -> bool:
    """A Mixture-of-Experts block already: never converted, and never traced into (its experts
    would look like FFNs)."""
    children = dict(module.named_children())
    return bool(_MOE_NAME.search(type(module).__name__)) or (
        "experts" in children and any(k in children for k in ("gate", "router"))
    )


def classify(module: nn.Module) -> Classified | None:
    """What the registries and the MoE check say of one module; None: ask the dataflow."""
    key = class_key(module)
    if key in _SKIP:
        return Classified(None, "registry", _SKIP[key])
    entry = _FFN.get(key)
    if entry is not None:
        layout = entry(module) if callable(entry) and not isinstance(entry, FFNLayout) else entry
        if isinstance(layout, str):
            return Classified(None, "registry", layout)
        return Classified(layout, "registry")
    if looks_like_moe(module):
        return Classified(None, "moe", "already a Mixture-of-Experts block")
    return None
