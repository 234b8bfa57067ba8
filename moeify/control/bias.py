"""Auxiliary-loss-free load balancing: the per-expert selection bias of every MoE layer, moved once
per optimizer step from the routing counts of that step.

DeepSeek-V3 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"; torchtitan's
`_update_expert_bias`): an expert that received fewer than the mean number of assignments gets its
bias raised by `balance_bias_rate`, one that received more gets it lowered; the deltas are
centred (only differences between experts change a choice). The counts are the layer's own
`bias_counts` (training forwards since the last update), so the monitor runner, which reads and
resets `tokens_per_expert`, is independent of it. One concat, one all-reduce under
torch.distributed (every rank moves the bias identically), no host sync.
"""

from __future__ import annotations

import torch

from moeify.layers.moe import MoeLayer
from moeify.layers.stats import sum_over_ranks


@torch.no_grad()
def update_expert_bias(layers: list[MoeLayer]) -> None:
    """One update of every layer that has a bias; its counts start again from zero."""
    biased = [layer for layer in layers if layer.expert_bias is not None]
    if not biased:
        return
    counts_flat = torch.cat([layer.bias_counts for layer in biased])
    sum_over_ranks(counts_flat)
    offset = 0
    for layer in biased:
        counts_E = counts_flat[offset : offset + layer.num_experts].float()
        offset += layer.num_experts
        if layer.balance_bias_rate > 0:
            delta_E = layer.balance_bias_rate * torch.sign(counts_E.mean() - counts_E)
            layer.expert_bias.add_(delta_E - delta_E.mean())
        layer.bias_counts.zero_()
