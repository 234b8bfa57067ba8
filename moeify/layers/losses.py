"""Router losses, computed in fp32 inside each MoE layer and collected by `moeify.aux_loss`.

Every loss is a mean over the tokens that count: all of them, or those a padding mask keeps
(`keep_T`, moeify.layers.tokens). Means divide by max(count, 1), so a layer that receives no token
(or only padding) gives 0 — a finite loss still attached to the router's graph — never 0/0 = NaN.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def token_count(num_tokens: int, keep_T: Tensor | None) -> Tensor | int:
    """How many tokens count, at least 1 (the denominator of every mean). A tensor under a mask:
    reading the count back to the host would wait for the device."""
    if keep_T is None:
        return max(num_tokens, 1)
    return keep_T.sum().clamp_min(1)


def token_sum(values_T: Tensor, keep_T: Tensor | None) -> Tensor:
    """Sum over the tokens that count, along dim 0 (values_T is [T] or [T, ...])."""
    if keep_T is None:
        return values_T.sum(0)
    keep = keep_T.to(values_T.dtype)
    return (values_T * keep.reshape(-1, *([1] * (values_T.dim() - 1)))).sum(0)


def balance_loss(
    probs_TE: Tensor,
    tokens_per_expert_E: Tensor,
    top_k: int,
    keep_T: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Switch/GShard load balancing: E * sum_e f_e * P_e, where f_e is the share of the counted
    tokens' K assignments that went to expert e and P_e its mean router probability over them.
    Equals 1 when balanced. `tokens_per_expert_E` counts the same tokens `keep_T` keeps.

    With a process `group` (expert parallelism) f_e and P_e are those of the global batch, all
    ranks' tokens together: one all-reduce of the counts (no gradient flows through counts), and
    each rank's loss is G * E * sum_e f_e * (this rank's probability sum / global tokens), so that
    the mean over the G ranks (what data parallelism averages) is the global batch's loss and its
    gradient, whatever each rank's share of the tokens (an empty rank included)."""
    num_experts = probs_TE.shape[1]
    if group is None:
        count = token_count(probs_TE.shape[0], keep_T)
        share_E = tokens_per_expert_E.float() / (count * top_k)
        return num_experts * (share_E * (token_sum(probs_TE, keep_T) / count)).sum()
    local = keep_T.sum() if keep_T is not None else torch.tensor(probs_TE.shape[0])
    totals = torch.cat([tokens_per_expert_E, local.to(tokens_per_expert_E).reshape(1)])
    dist.all_reduce(totals, group=group)
    count = totals[-1].clamp_min(1).float()
    share_E = totals[:-1].float() / (count * top_k)
    ranks = dist.get_world_size(group)
    return num_experts * ranks * (share_E * (token_sum(probs_TE, keep_T) / count)).sum()


def z_loss(logits_TE: Tensor, keep_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean squared log-partition; keeps logits small so fp32 routing stays stable."""
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    return token_sum(lse_T.square(), keep_T) / token_count(lse_T.shape[0], keep_T)


def entropy(probs_TE: Tensor) -> Tensor:
    """Per-token routing entropy H(p_t) in nats, [T]."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)


def entropy_bonus(entropy_T: Tensor, num_experts: int, keep_T: Tensor | None = None) -> Tensor:
    """Minus the mean per-token routing entropy, normalised by log E (in [-1, 0]): minimising it
    spreads each token's probability over experts, against collapse onto one."""
    if num_experts == 1:
        return entropy_T.sum() * 0.0  # 0, still on the router's graph
    mean = token_sum(entropy_T, keep_T) / token_count(entropy_T.shape[0], keep_T)
    return -mean / math.log(num_experts)
