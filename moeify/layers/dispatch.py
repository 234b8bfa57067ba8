"""Token dispatch for packed experts: sort assignments by expert, one grouped product per
projection, scatter back weighted.

Shape legend (as in torchtitan): T tokens, D model dim, I expert intermediate dim,
E experts, K top-k, A = T*K assignments.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sort_by_expert(expert_idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Order the T*K (token, expert) assignments by expert.

    Returns the assignment order `order_A` (indices into the flattened T*K assignments), the
    token `token_A` and expert `expert_A` of each sorted assignment, and `tokens_per_expert_E`
    (int64, on device). Nothing here reads a value back to the host.
    """
    top_k = expert_idx_TK.shape[-1]
    flat_A = expert_idx_TK.reshape(-1)
    # stable: tokens keep their order inside an expert, so results do not depend on sort ties.
    order_A = torch.argsort(flat_A, stable=True)
    tokens_per_expert_E = torch.bincount(flat_A, minlength=num_experts)
    return order_A, order_A // top_k, flat_A[order_A], tokens_per_expert_E


def _grouped_mm_ok(x: Tensor, weight_EOI: Tensor) -> bool:
    """torch._grouped_mm runs without a host sync; use it where this build supports the case.

    On CPU (torch >= 2.8) it is a C++ loop of mm for any float dtype; it wants 16-byte aligned
    rows. On CUDA it needs bf16 and sm90+ (Hopper); everything else takes the per-expert loop.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight_EOI.dtype:
        return False
    size = x.element_size()
    if (weight_EOI.shape[-1] * size) % 16 or (weight_EOI.shape[-2] * size) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def grouped_linear(
    x_AI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, expert_A: Tensor, tokens_per_expert_E: Tensor
) -> Tensor:
    """y[a] = x[a] @ weight[e(a)].T + bias[e(a)] for assignments already sorted by expert.

    `weight_EOI` is stored nn.Linear-style ([E, out, in]) so that expert e's slice equals the
    dense FFN's weight bit for bit.
    """
    if _grouped_mm_ok(x_AI, weight_EOI):
        offsets_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        y_AO = torch._grouped_mm(x_AI, weight_EOI.transpose(-2, -1), offs=offsets_E)
    else:
        # One host sync for the split sizes. unbind(0) once: indexing weight[e] in the loop would
        # make each expert's backward zero-fill a full [E, out, in] gradient (../NOTES: 1.3-5x).
        sizes = tokens_per_expert_E.tolist()
        y_AO = torch.cat([chunk @ w_OI.T for chunk, w_OI in zip(x_AI.split(sizes), weight_EOI.unbind(0))])
    if bias_EO is not None:
        # index_select: its backward is a row-wise index_add_ into [E, O]; bias[expert_A]'s is an
        # element-wise scatter over all A*O entries (2.5x slower on CPU at 4096 tokens, DiT sizes).
        # In place: the product is a fresh tensor its backward does not save, and a second [A, O]
        # buffer costs its first-touch page faults (150 MB at DiT sizes: ~10% of the CPU forward).
        y_AO = y_AO.add_(bias_EO.to(y_AO.dtype).index_select(0, expert_A))
    return y_AO
