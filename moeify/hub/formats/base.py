"""The export-format registry: a format name → the handler that writes it (moeify.hub.export_formats
documents how to add one). As torchao's `register_quantize_module_handler` maps a config type to
its transform, `register_export_format(name)` maps a format name to its handler, and
`moeify.export` only ever talks to the handler; unlike torchao's, a second registration of a name
is refused instead of silently replacing the first.

Shape legend: D model dim, I expert intermediate dim, E experts, S shared experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from moeify.registry import Registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from moeify.layers.moe import MoeLayer


class ExportError(ValueError):
    """The model cannot be written exactly in the requested native format; the message says why."""


def refuse(fmt: str, reason: str) -> ExportError:
    return ExportError(f"moeify.export(format={fmt!r}): {reason}")


def is_zero(tensors: list[Tensor | None]) -> bool:
    return all(t is None or not bool(t.detach().count_nonzero()) for t in tensors)


@dataclass(frozen=True)
class MoeShape:
    """What every MoE layer must share: the native formats have one of each per model."""

    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared: int
    temperature: float
    normalize_topk: bool = True  # the formats' norm_topk_prob (Mixtral always renormalises)
    shared_intermediate_size: int = 0  # a shared expert's width: the whole FFN's, also when routed ones are slices


@dataclass(frozen=True)
class ExportSource:
    """What a handler reads of the converted model, checked by moeify.export before any handler runs."""

    config: PretrainedConfig  # the base model's (a Llama / Mistral / Qwen2 / Qwen3 config)
    shape: MoeShape
    dense_layers: list[int]  # block indices left dense
    windows: list[int | None]  # each layer's sliding window (None: full attention)
    window: int | None  # the one sliding window the layers use (None: none does)
    attention_bias: bool  # the q/k/v projections have biases


class ExportFormat:
    """One native transformers MoE family: what it can hold (class attributes, and `refusal`), its
    config fields (`config_fields`) and its tensor names (`moe_tensors`). Subclass it and decorate
    the subclass with `@register_export_format(name)`; `name` is set then."""

    name: str = ""
    model_type: ClassVar[str | None] = None  # the transformers model_type written; None: the format's name
    shared_expert: ClassVar[bool] = False  # has a place for moeify's shared experts
    dense_layers: ClassVar[bool] = False  # some layers may stay dense (e.g. `mlp_only_layers`)

    def refusal(self, name: str, layer: MoeLayer) -> str | None:
        """Why the MoE layer `name` cannot be written exactly in this format, or None. Runs after
        the refusals every format shares (moeify.hub.export_formats)."""
        return None

    def config_fields(self, source: ExportSource) -> dict[str, Any]:
        """The format's own config fields: the number of experts, expert width, sliding window, ...
        The fields every format shares (hidden_size, num_experts_per_tok, dtype, ...) are added by
        moeify.export."""
        raise NotImplementedError(f"{type(self).__name__} must define config_fields")

    def moe_tensors(self, prefix: str, layer: MoeLayer, dtype: torch.dtype) -> dict[str, Tensor]:
        """The native tensors of the MoE layer at `prefix` (`model.layers.N.mlp`), by full name.
        This default is the layout Mixtral, Qwen2-MoE and Qwen3-MoE share."""
        # softmax(W x / T) = softmax((W / T) x) exactly when T is a power of two (checked before).
        return {
            f"{prefix}.gate.weight": (layer.router.gate.weight.detach() / layer.temperature).to(dtype),
            f"{prefix}.experts.gate_up_proj": layer.experts.w_in.detach().to(dtype),  # [E, 2I, D]: [gate; up]
            f"{prefix}.experts.down_proj": layer.experts.w_out.detach().to(dtype),  # [E, D, I]
        }

    def refuse(self, reason: str) -> ExportError:
        return refuse(self.name, reason)


_FORMATS: Registry[str, ExportFormat] = Registry(
    "format", duplicate="an export format named", listing="supported formats", error=ExportError, where="moeify.export"
)


def register_export_format(name: str) -> Callable[[type[ExportFormat]], type[ExportFormat]]:
    """A class decorator: `moeify.export(model, directory, format=name)` (and `moeify export
    --format name`) write with an instance of the decorated ExportFormat subclass. A name already
    registered is refused."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an export format name is an identifier such as 'qwen3_moe', got {name!r}")
    _FORMATS.refuse_duplicate(name)

    def decorator(cls: type[ExportFormat]) -> type[ExportFormat]:
        if not (isinstance(cls, type) and issubclass(cls, ExportFormat)):
            raise TypeError(f"register_export_format({name!r}) decorates an ExportFormat subclass, got {cls!r}")
        handler = cls()
        handler.name = name
        _FORMATS.register(name, handler)  # refuses a name registered between the call and the decoration
        return cls  # unchanged: the class stays usable (and subclassable) by its own name

    return decorator


def export_format(name: str) -> ExportFormat:
    """The registered handler of format `name`; ExportError naming the registered ones otherwise."""
    return _FORMATS[name]


def export_format_names() -> tuple[str, ...]:
    return tuple(_FORMATS.names())
