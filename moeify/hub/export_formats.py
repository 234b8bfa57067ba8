"""The export formats of `moeify.export` (a registry: moeify.hub.formats) and whether a converted
model fits one: every refusal of an export is raised here or by the format's handler, before
anything is built or written.

Adding an export format
-----------------------
One file, one handler class, one test. Subclass `ExportFormat` and decorate it with
`@register_export_format(name)` (`name` is what `moeify.export(..., format=name)` and
`moeify export --format name` take; a name already registered is a ValueError). The class declares,
in one place:

- what it can hold: `shared_expert`, `dense_layers` (the checks below refuse the rest, naming the
  formats that can hold it), and `refusal(name, layer)` for anything else it cannot hold exactly;
- its transformers config fields: `config_fields(source)` (number of experts, expert width, sliding
  window; the fields every format shares are added by moeify.export); `model_type` if the
  transformers model_type differs from the name;
- its tensor names: `moe_tensors(prefix, layer, dtype)` (the default is the Mixtral / Qwen layout);
  attention, norms and embeddings are matched by name.

moeify.export then checks the written checkpoint's logits against the moeify model's. The built-in
formats (moeify/hub/formats/mixtral.py, qwen.py) are the examples; a new built-in one is imported
in moeify/hub/formats/__init__.py, and its test parametrizes tests/test_export.py's CASES.

Shape legend: D model dim, I expert intermediate dim, E experts, S shared experts.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from torch import nn

from moeify.hub.formats import (
    ExportError,
    ExportFormat,
    ExportSource,
    MoeShape,
    export_format,
    export_format_names,
    register_export_format,
)
from moeify.hub.formats.base import is_zero, refuse
from moeify.layers.experts import PackedExperts
from moeify.layers.inventory import moe_layers
from moeify.layers.moe import MoeLayer
from moeify.layers.routers.linear import LinearRouter

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PretrainedConfig


# Decoders whose blocks are pre-norm RMSNorm + rotary attention + SwiGLU MLP at `model.layers.N.mlp`,
# with the same parameter names as the targets. Other parts (q/k norms, biases) are matched by name.
BASES = ("llama", "mistral", "qwen2", "qwen3")
_SITE = re.compile(r"model\.layers\.(\d+)\.mlp")


def _alternatives(can: Callable[[ExportFormat], bool]) -> str:
    """The registered formats that hold what another one cannot, for refusal messages."""
    names = [name for name in export_format_names() if can(export_format(name))]
    return " / ".join(f"'{name}'" for name in names) or "none registered"


def check_model(model: nn.Module, handler: ExportFormat) -> dict[int, MoeLayer]:
    """The base family and the MoE layers by block index; refuses what is not a supported moeify LM."""
    fmt = handler.name
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BASES:
        raise refuse(
            fmt,
            f"the base model {type(model).__name__} (model_type={model_type!r}) is not supported; export "
            f"writes causal LMs of the Llama family ({', '.join(BASES)}) with SwiGLU MLPs",
        )
    if not type(model).__name__.endswith("ForCausalLM"):
        raise refuse(fmt, f"export needs the causal LM (e.g. LlamaForCausalLM), not {type(model).__name__}")
    layers: dict[int, MoeLayer] = {}
    for name, layer in moe_layers(model):
        match = _SITE.fullmatch(name)
        if match is None:
            raise refuse(
                fmt, f"MoE layer {name!r} is not a decoder MLP (model.layers.N.mlp); the formats have no place for it"
            )
        layers[int(match.group(1))] = layer
    if not layers:
        raise refuse(fmt, f"{type(model).__name__} has no moeify MoE layers: call moeify(model) first")
    return layers


def _check_experts(fmt: str, name: str, experts: nn.Module, act_type: type) -> None:
    if not isinstance(experts, PackedExperts) or not experts.gated:
        kind = type(experts).__name__ if not isinstance(experts, PackedExperts) else "a non-gated (act(W x)) MLP"
        raise refuse(fmt, f"{name} holds {kind}; the native formats hold gated SwiGLU experts only")
    if type(experts.act) is not act_type:
        raise refuse(
            fmt,
            f"{name} uses activation {type(experts.act).__name__}, but the config's hidden_act gives {act_type.__name__}",
        )
    if not is_zero([experts.b_in, experts.b_out]):
        raise refuse(fmt, f"{name} has nonzero biases; the native experts have no biases")


def _layer_shape(handler: ExportFormat, name: str, layer: MoeLayer, hidden_act: str) -> MoeShape:
    from transformers.activations import ACT2FN

    fmt = handler.name
    if not isinstance(layer.router, LinearRouter):
        raise refuse(
            fmt,
            f"{name} has a {type(layer.router).__name__}; the native formats route with one linear gate "
            "(convert with router='linear')",
        )
    act_type = type(ACT2FN[hidden_act])
    _check_experts(fmt, f"{name}.experts", layer.experts, act_type)
    num_shared = 0
    if layer.shared_experts is not None:
        _check_experts(fmt, f"{name}.shared_experts", layer.shared_experts, act_type)
        num_shared = layer.shared_experts.num_experts
    if layer.router_score != "softmax":
        raise refuse(
            fmt,
            f"{name} scores experts with router_score={layer.router_score!r}; the native routers use a softmax "
            "(convert with router_score='softmax')",
        )
    if layer.expert_bias is not None and bool(layer.expert_bias.ne(0).any()):
        raise refuse(
            fmt,
            f"{name} has a nonzero expert bias (balance_bias_rate): it changes which experts are chosen, and the "
            "native routers choose by the router's probabilities alone",
        )
    reason = handler.refusal(name, layer)  # what this format alone cannot hold
    if reason is not None:
        raise refuse(fmt, reason)
    mantissa, _ = math.frexp(layer.temperature)
    if mantissa != 0.5:
        raise refuse(
            fmt,
            f"{name} has router_temperature={layer.temperature}; the native routers have no temperature and "
            "only a power of two folds exactly into the router weight",
        )
    width = layer.experts.w_out.shape[-1]  # fine-grained experts (granularity G): I / G
    shared_width = layer.shared_experts.w_out.shape[-1] if layer.shared_experts is not None else width
    return MoeShape(
        layer.num_experts, layer.top_k, width, num_shared, layer.temperature, layer.normalize_topk, shared_width
    )


def check_shapes(
    handler: ExportFormat, base_config: PretrainedConfig, layers: dict[int, MoeLayer]
) -> tuple[MoeShape, list[int]]:
    """One MoeShape for all layers, and the block indices left dense."""
    fmt = handler.name
    distinct = {
        _layer_shape(handler, f"model.layers.{i}.mlp", layer, base_config.hidden_act) for i, layer in layers.items()
    }
    if len(distinct) > 1:
        raise refuse(
            fmt, f"the MoE layers differ ({sorted(distinct, key=str)}); the native formats have one shape per model"
        )
    shape = distinct.pop()
    dense = [i for i in range(base_config.num_hidden_layers) if i not in layers]
    if dense and not handler.dense_layers:
        raise refuse(
            fmt,
            f"layers {dense} were left dense and {fmt} has only MoE layers; convert every layer, or use "
            f"format={_alternatives(lambda f: f.dense_layers)} (they hold dense layers, e.g. in mlp_only_layers)",
        )
    if shape.num_shared and not handler.shared_expert:
        nonzero = [i for i, layer in layers.items() if not is_zero(layer.shared_experts.output_parameters())]
        if nonzero:
            raise refuse(
                fmt,
                f"layers {nonzero} have {shape.num_shared} shared expert(s) with nonzero weights and {fmt} has no "
                f"shared expert; use a format with one (format={_alternatives(lambda f: f.shared_expert)}), or convert "
                "with num_shared_experts=0",
            )
    return shape, dense


__all__ = [
    "BASES",
    "ExportError",
    "ExportFormat",
    "ExportSource",
    "MoeShape",
    "check_model",
    "check_shapes",
    "export_format",
    "export_format_names",
    "register_export_format",
]
