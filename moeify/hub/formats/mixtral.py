"""Mixtral (`MixtralForCausalLM`): E routed experts in every layer, no shared expert, one sliding
window for all layers, top-k weights always renormalised."""

from __future__ import annotations

from typing import Any

from moeify.hub.formats.base import ExportFormat, ExportSource, register_export_format
from moeify.layers.moe import MoeLayer


@register_export_format("mixtral")
class Mixtral(ExportFormat):
    shared_expert = False
    dense_layers = False

    def refusal(self, name: str, layer: MoeLayer) -> str | None:
        if not layer.normalize_topk:
            return (
                f"{name} weighs the chosen experts by their raw probabilities (normalize_topk=False) and Mixtral "
                "always renormalises them; use format='qwen2_moe' / 'qwen3_moe' (norm_topk_prob=False)"
            )
        return None

    def config_fields(self, source: ExportSource) -> dict[str, Any]:
        return {
            "num_local_experts": source.shape.num_experts,
            "intermediate_size": source.shape.intermediate_size,  # fine-grained experts (granularity G): I / G
            "router_jitter_noise": 0.0,
            "sliding_window": source.window,
        }
