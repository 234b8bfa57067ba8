"""`MoeLayer`: router + routed experts + shared experts, installed in place of one dense FFN.

It keeps the FFN's call signature (`forward(hidden_states, *args, **kwargs) -> Tensor` of the
same shape), so the block around it runs unchanged.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeify.layers import losses, stats
from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.routers.base import Router

Experts = PackedExperts | ModuleExperts


class MoeLayer(nn.Module):
    """Token-choice top-k MoE. The top-k weights are renormalised to sum to 1, so while the
    routed experts are identical clones the layer reproduces the dense FFN exactly (Law 3)."""

    def __init__(
        self,
        *,
        router: Router,
        experts: Experts,
        shared_experts: Experts | None = None,
        top_k: int,
        temperature: float = 1.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        entropy_loss_weight: float = 0.0,
        calls_per_forward: int = 1,
    ) -> None:
        super().__init__()
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        # > 1: one layer serving several depths (ALBERT's shared block); its counts add every run.
        self.calls_per_forward = calls_per_forward
        self.num_experts, self.top_k, self.temperature = experts.num_experts, top_k, temperature
        self.loss_weights = {"balance": balance_loss_weight, "z_loss": z_loss_weight, "entropy": entropy_loss_weight}
        # Routing counts build up on the device across forwards and are read (and reset) by the
        # monitors once per optimizer step: no host sync here. int64: bf16 counts miscount above 256.
        # On the experts' device (a model converted on the GPU counts on the GPU); on CPU for a meta
        # model: these buffers are never in a checkpoint, so loading must find them real.
        device = next(experts.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer(
            "tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.int64, device=device), persistent=False
        )
        # Further statistics (moeify.layers.stats) only while monitors are attached.
        self.collect_stats = False
        self.register_buffer("stat_sums", torch.zeros(len(stats.STATS), device=device), persistent=False)
        self.register_buffer("stat_prob_sum", torch.zeros(self.num_experts, device=device), persistent=False)
        self.last_losses: dict[str, Tensor] = {}

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's own signature
        # The statistics stay fp32 across `.to(torch.bfloat16)` / `.half()`, as the routers do
        # (Fp32Module): bf16 sums lose their tail after a few hundred tokens (issue 4).
        fp32_buffers = {id(self.stat_sums), id(self.stat_prob_sum)}

        def keep_stats_fp32(t: Tensor) -> Tensor:
            out = fn(t)
            if id(t) in fp32_buffers and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_stats_fp32, recurse)

    def extra_repr(self) -> str:
        shared = self.shared_experts.num_experts if self.shared_experts is not None else 0
        runs = f", calls_per_forward={self.calls_per_forward}" if self.calls_per_forward > 1 else ""
        return f"num_experts={self.num_experts}, top_k={self.top_k}, shared={shared}, temperature={self.temperature}{runs}"

    def route(self, x_TD: Tensor, batch_shape: torch.Size) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """fp32 routing: logits_TE, probs_TE, the top-(k+1) probabilities, expert_idx_TK and the
        renormalised weights_TK. The (k+1)-th probability gives the top-k boundary margin."""
        logits_TE = self.router(x_TD, batch_shape)
        probs_TE = torch.softmax(logits_TE / self.temperature if self.temperature != 1.0 else logits_TE, dim=-1)
        top_probs_TK1, top_idx_TK1 = probs_TE.topk(min(self.top_k + 1, self.num_experts), dim=-1)
        top_probs_TK, expert_idx_TK = top_probs_TK1[:, : self.top_k], top_idx_TK1[:, : self.top_k]
        weights_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        return logits_TE, probs_TE, top_probs_TK1, expert_idx_TK, weights_TK

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:  # noqa: ANN002,ANN003 - FFN signature
        batch_shape = hidden_states.shape[:-1]
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits_TE, probs_TE, top_probs_TK1, expert_idx_TK, weights_TK = self.route(x_TD, batch_shape)
        routed_TD, tokens_per_expert_E = self.experts(x_TD, expert_idx_TK, weights_TK)
        shared_TD = self.shared_experts(x_TD).to(routed_TD.dtype) if self.shared_experts is not None else None
        y_TD = routed_TD if shared_TD is None else routed_TD + shared_TD
        entropy_T = losses.entropy(probs_TE)
        layer_losses = {
            "balance": losses.balance_loss(probs_TE, tokens_per_expert_E, self.top_k),
            "z_loss": losses.z_loss(logits_TE),
            "entropy": losses.entropy_bonus(entropy_T, self.num_experts),
        }
        # Gradient checkpointing re-runs this forward inside backward. The recompute must save the
        # same tensors (so the losses are computed), but must neither count its tokens again nor
        # replace the losses the current backward is using.
        if torch._C._current_graph_task_id() == -1:
            self.tokens_per_expert.add_(tokens_per_expert_E)
            self.last_losses = layer_losses
            if self.collect_stats:
                stats.accumulate(
                    self.stat_sums, self.stat_prob_sum, probs_TE, entropy_T, top_probs_TK1, self.top_k, routed_TD, shared_TD
                )
        return y_TD.reshape(*batch_shape, y_TD.shape[-1])

    def reset_stats(self) -> None:
        """Zero the accumulated routing statistics (the monitor runner does this after each read)."""
        self.tokens_per_expert.zero_()
        self.stat_sums.zero_()
        self.stat_prob_sum.zero_()

    def aux_loss(self) -> Tensor | None:
        """The weighted sum of this layer's router losses from its last forward (None before any)."""
        if not self.last_losses:
            return None
        return sum(self.loss_weights[name] * value for name, value in self.last_losses.items())
