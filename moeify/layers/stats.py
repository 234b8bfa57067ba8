"""Routing statistics that a MoE layer adds up on the device during forward, for the monitors.

Nothing here reads a value back to the host: the monitor runner gathers every layer's buffers
once per optimizer step (one concat, one all-reduce, one copy to the host) and resets them.

`sums` is one fp32 vector, indexed by `STATS`:
  tokens          tokens routed (T)
  entropy         sum over tokens of the routing entropy H(p_t) (nats)
  max_prob        sum over tokens of max_e p_te (near 1: saturated one-hot routing)
  margin          sum over tokens of p_(k) - p_(k+1): how far the k-th choice is from the boundary
  routed_norm     sum over tokens of ||routed output_t||
  shared_norm     sum over tokens of ||shared output_t|| (shared-expert maturity)
`prob_sum[e]` is sum over tokens of p_te; `tokens_per_expert[e]` counts top-k assignments (int64).
Under a padding mask (`keep_T`) every sum runs over the kept tokens only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moeify.layers.losses import token_sum

STATS = ("tokens", "entropy", "max_prob", "margin", "routed_norm", "shared_norm")
INDEX = {name: i for i, name in enumerate(STATS)}


@torch.no_grad()
def accumulate(
    sums: Tensor,
    prob_sum_E: Tensor,
    probs_TE: Tensor,
    entropy_T: Tensor,
    top_probs_TK1: Tensor,
    top_k: int,
    routed_TD: Tensor,
    shared_TD: Tensor | None,
    keep_T: Tensor | None = None,
) -> None:
    """Add one forward's statistics into the layer's buffers (all on the device)."""
    zero = probs_TE.new_zeros(())
    margin_T = top_probs_TK1[:, top_k - 1] - top_probs_TK1[:, top_k] if top_probs_TK1.shape[1] > top_k else None
    tokens = probs_TE.new_tensor(float(probs_TE.shape[0])) if keep_T is None else keep_T.sum().to(probs_TE.dtype)
    update = torch.stack(
        [
            tokens,
            token_sum(entropy_T, keep_T),
            token_sum(top_probs_TK1[:, 0], keep_T),
            token_sum(margin_T, keep_T) if margin_T is not None else zero,
            token_sum(routed_TD.float().norm(dim=-1), keep_T),
            token_sum(shared_TD.float().norm(dim=-1), keep_T) if shared_TD is not None else zero,
        ]
    )
    sums.add_(update)
    prob_sum_E.add_(token_sum(probs_TE, keep_T))


def sum_over_ranks(*tensors: Tensor) -> None:
    """Add each tensor up over the ranks of the default process group, in place, one all-reduce
    each; nothing happens on a single process. Counts stay int64 (fp32 holds integers exactly
    only below 2**24, which a long window on many ranks passes)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
