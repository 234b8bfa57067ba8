"""Router losses, computed in fp32 inside each MoE layer and collected by `moeify.aux_loss`.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def balance_loss(probs_TE: Tensor, tokens_per_expert_E: Tensor, top_k: int) -> Tensor:
    """Switch/GShard load balancing: E * sum_e f_e * P_e, where f_e is the share of the T*K
    assignments that went to expert e and P_e its mean router probability. Equals 1 when balanced."""
    num_tokens, num_experts = probs_TE.shape
    share_E = tokens_per_expert_E.float() / max(num_tokens * top_k, 1)
    return num_experts * (share_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean squared log-partition; keeps logits small so fp32 routing stays stable."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def entropy(probs_TE: Tensor) -> Tensor:
    """Per-token routing entropy H(p_t) in nats, [T]."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)


def entropy_bonus(entropy_T: Tensor, num_experts: int) -> Tensor:
    """Minus the mean per-token routing entropy, normalised by log E (in [-1, 0]): minimising it
    spreads each token's probability over experts, against collapse onto one."""
    if num_experts == 1:
        return entropy_T.new_zeros(())
    return -entropy_T.mean() / math.log(num_experts)
