"""What the native MoE formats of `moeify.export` can hold (as data), and whether a converted
model fits one: every refusal of an export is raised here, before anything is built or written.

Shape legend: D model dim, I expert intermediate dim, E experts, S shared experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from moeify.convert import moe_layers
from moeify.layers.experts import PackedExperts
from moeify.layers.moe import MoeLayer
from moeify.layers.routers.linear import LinearRouter

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class ExportError(ValueError):
    """The model cannot be written exactly in the requested native format; the message says why."""


@dataclass(frozen=True)
class ExportFormat:
    """What one native MoE family can hold, as data."""

    experts_field: str  # the config field holding E
    shared_expert: bool  # Qwen2-MoE's sigmoid-gated shared expert
    dense_layers: bool  # `mlp_only_layers`: some layers may stay dense
    bias_field: str | None  # the config flag that gives attention projections a bias


FORMATS: dict[str, ExportFormat] = {  # by model_type
    "mixtral": ExportFormat("num_local_experts", shared_expert=False, dense_layers=False, bias_field=None),
    "qwen2_moe": ExportFormat("num_experts", shared_expert=True, dense_layers=True, bias_field="qkv_bias"),
    "qwen3_moe": ExportFormat("num_experts", shared_expert=False, dense_layers=True, bias_field="attention_bias"),
}
# Decoders whose blocks are pre-norm RMSNorm + rotary attention + SwiGLU MLP at `model.layers.N.mlp`,
# with the same parameter names as the targets. Other parts (q/k norms, biases) are matched by name.
BASES = ("llama", "mistral", "qwen2", "qwen3")
_SITE = re.compile(r"model\.layers\.(\d+)\.mlp")


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


def refuse(fmt: str, reason: str) -> ExportError:
    return ExportError(f"moeify.export(format={fmt!r}): {reason}")


def check_model(model: nn.Module, fmt: str) -> dict[int, MoeLayer]:
    """The base family and the MoE layers by block index; refuses what is not a supported moeify LM."""
    if fmt not in FORMATS:
        raise ExportError(f"moeify.export: unknown format {fmt!r}; supported formats: {sorted(FORMATS)}")
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


def is_zero(tensors: list[Tensor | None]) -> bool:
    return all(t is None or not bool(t.detach().count_nonzero()) for t in tensors)


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


def _layer_shape(fmt: str, name: str, layer: MoeLayer, hidden_act: str) -> MoeShape:
    from transformers.activations import ACT2FN

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
    if not layer.normalize_topk and fmt == "mixtral":
        raise refuse(
            fmt,
            f"{name} weighs the chosen experts by their raw probabilities (normalize_topk=False) and Mixtral always "
            "renormalises them; use format='qwen2_moe' / 'qwen3_moe' (norm_topk_prob=False)",
        )
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


def check_shapes(fmt: str, base_config: PretrainedConfig, layers: dict[int, MoeLayer]) -> tuple[MoeShape, list[int]]:
    """One MoeShape for all layers, and the block indices left dense."""
    distinct = {
        _layer_shape(fmt, f"model.layers.{i}.mlp", layer, base_config.hidden_act) for i, layer in layers.items()
    }
    if len(distinct) > 1:
        raise refuse(
            fmt, f"the MoE layers differ ({sorted(distinct, key=str)}); the native formats have one shape per model"
        )
    shape = distinct.pop()
    dense = [i for i in range(base_config.num_hidden_layers) if i not in layers]
    target = FORMATS[fmt]
    if dense and not target.dense_layers:
        raise refuse(
            fmt,
            f"layers {dense} were left dense and {fmt} has only MoE layers; convert every layer, or use "
            "format='qwen2_moe' / 'qwen3_moe' (their mlp_only_layers hold dense layers)",
        )
    if shape.num_shared and not target.shared_expert:
        nonzero = [i for i, layer in layers.items() if not is_zero(layer.shared_experts.output_parameters())]
        if nonzero:
            raise refuse(
                fmt,
                f"layers {nonzero} have {shape.num_shared} shared expert(s) with nonzero weights and {fmt} has no "
                "shared expert; use a format with one (qwen2_moe), or convert with num_shared_experts=0",
            )
    return shape, dense
