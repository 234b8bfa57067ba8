"""From router logits to routes: scores, the top-k choice, and the weights of the chosen experts.

One place for the rule, shared by `MoeLayer.route` and the timestep monitor (which re-derives
routes from logits and must pick the same experts).

  scores   "softmax": p = softmax(logits / T), the Switch/GShard/Mixtral rule.
           "sigmoid": s = sigmoid(logits / T), each expert's own affinity in (0, 1)
           (DeepSeek-V3). For the router losses and the monitors, which read a distribution over
           experts, sigmoid scores are normalised to sum to 1 per token.
  choice   the K experts with the largest score + expert_bias_E. The bias is auxiliary-loss-free
           load balancing (DeepSeek-V3: "Auxiliary-Loss-Free Load Balancing Strategy for
           Mixture-of-Experts"): it shifts which experts are chosen, never the weights, and has no
           gradient; it moves after each optimizer step (moeify.control.bias).
  weights  the chosen experts' scores renormalised to sum to 1 per token: while the routed experts
           are identical clones, any weights that sum to 1 reproduce the dense FFN (Law 3), for
           either score. At K = 1 renormalising gives s / s = 1 with zero gradient, so the router
           would learn from the router losses alone; the weight there is s / stop_gradient(s):
           exactly 1 in value, the gradient of s (measured on a tiny converted Llama trained on
           its task loss alone: the largest router gradient at conversion went from 0 to 2e-3).
           `normalize=False` (MoeifyConfig.normalize_topk, Qwen-MoE's norm_topk_prob=False): the
           raw scores instead. Clones then give (sum of the chosen scores) x dense, a token-
           dependent factor in [K/E, 1] for softmax (in (0, K) for sigmoid), so no constant
           rescaling of the experts keeps the dense function; only softmax at K = E (scores summing
           to 1) does. The deviation is measured and reported, not checked.

Shape legend: T tokens, E experts, K top-k, K1 = min(K + 1, E).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORES = ("softmax", "sigmoid")


def scores(logits_TE: Tensor, temperature: float, kind: str) -> tuple[Tensor, Tensor]:
    """(scores_TE, probs_TE): the selection scores and the routing distribution (rows sum to 1).
    For "softmax" they are the same tensor."""
    scaled_TE = logits_TE / temperature if temperature != 1.0 else logits_TE
    if kind == "sigmoid":
        scores_TE = torch.sigmoid(scaled_TE)
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    probs_TE = torch.softmax(scaled_TE, dim=-1)
    return probs_TE, probs_TE


def choose(
    scores_TE: Tensor,
    probs_TE: Tensor,
    top_k: int,
    expert_bias_E: Tensor | None,
    *,
    with_top: bool = True,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(expert_idx_TK, weights_TK, top_probs_TK1). `top_probs_TK1`, the K1 largest routing
    probabilities (for the statistics: max probability, top-k margin), only `with_top`."""
    num_experts = scores_TE.shape[-1]
    k1 = min(top_k + 1, num_experts)
    plain = expert_bias_E is None and scores_TE is probs_TE
    if plain:  # softmax without a bias: one top-(K+1) serves the choice and the statistics
        top_probs_TK1, idx_TK1 = probs_TE.topk(k1 if with_top else top_k, dim=-1)
        top_scores_TK, expert_idx_TK = top_probs_TK1[:, :top_k], idx_TK1[:, :top_k]
    else:
        selection_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
        expert_idx_TK = selection_TE.topk(top_k, dim=-1).indices
        top_scores_TK = scores_TE.gather(1, expert_idx_TK)
        top_probs_TK1 = probs_TE.topk(k1, dim=-1).values if with_top else None
    if not normalize:
        return expert_idx_TK, top_scores_TK, top_probs_TK1 if with_top else None
    denominator_TK = top_scores_TK.detach() if top_k == 1 else top_scores_TK.sum(dim=-1, keepdim=True)
    if scores_TE is not probs_TE:
        # Sigmoid scores can underflow to 0 (logits < -88), and 0 / 0 is NaN. (A softmax top score
        # is >= 1 / E.)
        denominator_TK = denominator_TK.clamp_min(torch.finfo(top_scores_TK.dtype).tiny)
    weights_TK = top_scores_TK / denominator_TK
    return expert_idx_TK, weights_TK, top_probs_TK1 if with_top else None
