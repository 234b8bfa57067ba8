"""Qwen2-MoE and Qwen3-MoE (`Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`): E routed experts,
`mlp_only_layers` for layers left dense, `norm_topk_prob` for raw or renormalised top-k weights.
Qwen2-MoE adds one sigmoid-gated shared expert and a window per layer (`layer_types`); Qwen3-MoE
has per-head q/k norms (so only Qwen3 bases fit it) and one window for all layers.

Shape legend: D model dim, I expert intermediate dim, E experts, S shared experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moeify.hub.formats.base import ExportFormat, ExportSource, register_export_format
from moeify.layers.moe import MoeLayer


class _QwenMoe(ExportFormat):
    """What both Qwen MoE formats write."""

    dense_layers = True
    bias_field = ""  # the config flag that gives the attention projections a bias

    def config_fields(self, source: ExportSource) -> dict[str, Any]:
        shape = source.shape
        return {
            "num_experts": shape.num_experts,
            "moe_intermediate_size": shape.intermediate_size,
            "norm_topk_prob": shape.normalize_topk,
            # Every layer sparse except the dense ones, which keep the base's MLP width.
            "decoder_sparse_step": 1,
            "mlp_only_layers": source.dense_layers,
            "intermediate_size": source.config.intermediate_size,
            "use_sliding_window": source.window is not None,
            "sliding_window": source.window or 4096,
            self.bias_field: source.attention_bias,
        }


@register_export_format("qwen3_moe")
class Qwen3Moe(_QwenMoe):
    shared_expert = False
    bias_field = "attention_bias"


@register_export_format("qwen2_moe")
class Qwen2Moe(_QwenMoe):
    """moeify's S shared experts are Qwen2-MoE's one shared expert of width S·I (a sum of S MLPs is
    one wider MLP); its gate sigmoid(shared_expert_gate(x)) is exactly 1/2 with a zero weight, and
    the shared down_proj is doubled (x2, x1/2: exact in binary floating point)."""

    shared_expert = True
    bias_field = "qkv_bias"

    def config_fields(self, source: ExportSource) -> dict[str, Any]:
        shape = source.shape
        return super().config_fields(source) | {
            "shared_expert_intermediate_size": max(shape.num_shared, 1) * shape.shared_intermediate_size,
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in source.windows],
        }

    def moe_tensors(self, prefix: str, layer: MoeLayer, dtype: torch.dtype) -> dict[str, Tensor]:
        # No shared experts: one zero expert of width I, which adds exactly 0.
        experts = layer.experts if layer.shared_experts is None else layer.shared_experts
        w_in_SID, w_out_SDI = experts.w_in.detach(), experts.w_out.detach()
        if layer.shared_experts is None:
            w_in_SID, w_out_SDI = torch.zeros_like(w_in_SID[:1]), torch.zeros_like(w_out_SDI[:1])
        gate_SID, up_SID = w_in_SID.chunk(2, dim=1)
        hidden = w_in_SID.shape[-1]
        return super().moe_tensors(prefix, layer, dtype) | {
            f"{prefix}.shared_expert.gate_proj.weight": gate_SID.reshape(-1, hidden).to(dtype),
            f"{prefix}.shared_expert.up_proj.weight": up_SID.reshape(-1, hidden).to(dtype),
            # sigmoid(0 · x) = 1/2 exactly; the doubled down_proj cancels it exactly.
            f"{prefix}.shared_expert.down_proj.weight": (2 * torch.cat(w_out_SDI.unbind(0), dim=-1)).to(dtype),
            f"{prefix}.shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype, device=w_in_SID.device),
        }
