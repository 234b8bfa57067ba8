"""The CPU path of packed experts: expert by expert, up -> activation -> down, forward and backward.

Why a second path: on a CPU the grouped product is itself a loop of `mm` (`torch._grouped_mm`
on CPU), so grouping buys nothing there, while running each projection across all experts
sends every intermediate out to memory and back ([A, 2I] is 185 MB at LLM sizes, 4096 tokens).
Going expert by expert keeps one expert's intermediate (~23 MB) in the last-level cache between
its two products, which is how transformers' eager experts run (8-14% faster forward than
projection by projection; benchmarks/RESULTS.md).

Autograd through `w.unbind(0)` would then stack E separate weight gradients into a fresh
[E, ...] tensor in backward (a second 277 MB allocation and copy per step at LLM sizes), so
`ExpertLoop` is a custom autograd Function whose backward also goes expert by expert and writes
each expert's weight gradient straight into its slice of one [E, ...] gradient.

The split sizes are read on the host: on a CPU that is a memory read, not a device sync. Other
devices take the grouped path (moeify.layers.dispatch), which never reads them.

Shape legend: A assignments sorted by expert, D model dim, H rows of the input projection
(2I when gated), I intermediate dim, O output dim, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Activation = Callable[[Tensor], Tensor]  # [n, H] -> [n, I], elementwise per token


# Below this size the grouped path's [A, H] intermediate stays in the last-level cache anyway,
# and the loop's per-expert small ops (gather, activation, scatter) only add time. Measured on
# the 2-core EPYC (32 MB L3), LLM shape, loop ÷ grouped forward / forward+backward: 1.09 / 1.07
# at 128 tokens ([A, H] 6 MB), 1.01 / 1.01 at 512 (23 MB), 1.00 / 1.02 at 1024 (46 MB),
# 0.89 / 0.92 at 4096 (185 MB); the loop keeps 39% less for backward at every size
# (benchmarks/paths_bench.py).
MIN_INTERMEDIATE_BYTES = 32 * 2**20

# Calls of at most this many tokens (a batch-1 decode step) skip sorting and the grouped product
# when autograd is off (`run_few`). One MoE layer, SmolLM2 shape, 8 experts, top-2, run_few ÷
# sorted-grouped time: 0.96 at 1 token, 0.99 at 2, 1.03 at 3-4 (benchmarks/RESULTS.md, "generate()").
FEW_TOKENS = 1


def applies(x: Tensor, tensors: Sequence[Tensor | None], act: torch.nn.Module, assignments: int | None) -> bool:
    """Whether the expert loop should run this call: CPU tokens without autocast, one dtype for
    the tokens and every expert tensor, an activation that does not write into its input
    (backward recomputes the activation from the saved pre-activation), and an [A, H]
    intermediate too large for the cache (`MIN_INTERMEDIATE_BYTES`; `assignments=None` skips this
    last test). Never under torch.compile:
    the loop reads its split sizes on the host (a graph break), so compiled layers take the grouped
    path, whose product is then one opaque custom op (moeify.layers.dispatch)."""
    if torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or getattr(act, "inplace", False):
        return False
    if not all(t is None or (t.dtype == x.dtype and t.device.type == "cpu") for t in tensors):
        return False
    return assignments is None or outgrows_cache(x, tensors[0], assignments)


def outgrows_cache(x: Tensor, w_in_EHD: Tensor, assignments: int) -> bool:
    """Whether this call's [A, H] intermediate reaches `MIN_INTERMEDIATE_BYTES`."""
    return assignments * w_in_EHD.shape[1] * x.element_size() >= MIN_INTERMEDIATE_BYTES


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will record this call (then `run`, else `run_combined`)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(
    x_AD: Tensor,
    w_in_EHD: Tensor,
    b_in_EH: Tensor | None,
    w_out_EOI: Tensor,
    b_out_EO: Tensor | None,
    tokens_per_expert_E: Tensor,
    activate: Activation,
) -> Tensor:
    """y[a] = w_out[e] · activate(w_in[e] · x[a] + b_in[e]) + b_out[e] for assignments sorted by
    expert, through `ExpertLoop` (training)."""
    return ExpertLoop.apply(x_AD, w_in_EHD, b_in_EH, w_out_EOI, b_out_EO, tokens_per_expert_E.tolist(), activate)


def run_combined(
    x_TD: Tensor,
    token_A: Tensor,
    weight_A1: Tensor,
    w_in_EHD: Tensor,
    b_in_EH: Tensor | None,
    w_out_EOI: Tensor,
    b_out_EO: Tensor | None,
    tokens_per_expert_E: Tensor,
    activate: Activation | Callable[[Tensor, Tensor], Tensor],
    finish: Activation,
    split_gate_up: bool = False,
) -> Tensor:
    """Without autograd (inference): the whole routed output y_TD, gathering, weighting and
    adding back each expert's tokens inside the loop, as transformers' eager experts do. Every
    temporary is one expert's, so nothing of size [A, ...] is allocated: fresh buffers that size
    cost their first-touch page faults (~0.4 ms/MB here, 4% of a DiT-sized forward).
    `finish` runs on each expert's output before its routing weight (the FFN's output dropout).
    `split_gate_up`: a gated layout's input projection as two products, gate rows then up rows,
    and `activate(gate, up)` (moeify.layers.experts.PackedExperts._splits_gate_up says why)."""
    sizes = tokens_per_expert_E.tolist()
    y_TD = x_TD.new_zeros(x_TD.shape[0], w_out_EOI.shape[1])
    # One scratch buffer per product, sized for the busiest expert and reused by every expert:
    # its pages are touched once per call, not once per expert.
    most = max(sizes, default=0)
    h_mH = x_TD.new_empty(most, w_in_EHD.shape[1])
    y_mO = x_TD.new_empty(most, w_out_EOI.shape[1])
    for e, rows in _expert_rows(sizes):
        n, token_n = rows.stop - rows.start, token_A[rows]
        x_nD = x_TD.index_select(0, token_n)
        tensors = (w_in_EHD, b_in_EH, w_out_EOI, b_out_EO)
        y_nO = finish(_expert(x_nD, e, *tensors, activate, h_mH[:n], y_mO[:n], split_gate_up))
        y_TD.index_add_(0, token_n, y_nO.mul_(weight_A1[rows].to(y_nO.dtype)))
    return y_TD


def run_few(
    x_TD: Tensor,
    expert_idx_TK: Tensor,
    weights_TK: Tensor,
    w_in_EHD: Tensor,
    b_in_EH: Tensor | None,
    w_out_EOI: Tensor,
    b_out_EO: Tensor | None,
    activate: Activation | Callable[[Tensor, Tensor], Tensor],
    finish: Activation,
    split_gate_up: bool = False,
) -> Tensor:
    """Decode-sized calls without autograd (`FEW_TOKENS`): y_TD with no sort and no grouped
    product. The routes are read on the host (on a CPU, a memory read) and each hit expert runs
    once on its tokens by plain matrix products, as `run_combined` does after sorting; at these
    sizes the sort's and the grouped kernel's fixed costs are what a decode step pays beyond
    reading the experts' weights. Arguments as in `run_combined`."""
    top_k, device = expert_idx_TK.shape[1], x_TD.device
    assignments_of: dict[int, list[int]] = {}
    for a, e in enumerate(expert_idx_TK.reshape(-1).tolist()):
        assignments_of.setdefault(e, []).append(a)
    weight_A1 = weights_TK.reshape(-1, 1)
    y_TD = x_TD.new_zeros(x_TD.shape[0], w_out_EOI.shape[1])
    for e, assignments in assignments_of.items():
        if len(assignments) == 1:  # views, no index tensors: every small op costs 5-10 us on a CPU
            a = assignments[0]
            rows = slice(a // top_k, a // top_k + 1)
            x_nD, w_n1 = x_TD[rows], weight_A1[a : a + 1]
        else:
            token_n = torch.tensor([a // top_k for a in assignments], device=device)
            x_nD, w_n1 = x_TD.index_select(0, token_n), weight_A1[torch.tensor(assignments, device=device)]
        tensors = (w_in_EHD, b_in_EH, w_out_EOI, b_out_EO)
        y_nO = finish(_expert(x_nD, e, *tensors, activate, split_gate_up=split_gate_up))
        y_nO = y_nO.mul_(w_n1.to(y_nO.dtype))
        if len(assignments) == 1:
            y_TD[rows].add_(y_nO)
        else:
            y_TD.index_add_(0, token_n, y_nO)
    return y_TD


def _expert_rows(sizes: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its rows among the sorted assignments) for every expert that received tokens."""
    start = 0
    for e, n in enumerate(sizes):
        if n:
            yield e, slice(start, start + n)
        start += n


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(x, weight.T, out=out)
    return torch.addmm(bias, x, weight.T, out=out)


def _expert(
    x_nD: Tensor,
    e: int,
    w_in_EHD: Tensor,
    b_in_EH: Tensor | None,
    w_out_EOI: Tensor,
    b_out_EO: Tensor | None,
    activate: Activation | Callable[[Tensor, Tensor], Tensor],
    h_out: Tensor | None = None,
    y_out: Tensor | None = None,
    split_gate_up: bool = False,
) -> Tensor:
    """Expert e on its n tokens; the pre-activation goes to `h_out` and the output to `y_out`
    when given (slices of [A, ...] buffers), else to temporaries. `split_gate_up`: the gate rows
    and the up rows as two products (into the two contiguous halves of `h_out`), then
    `activate(gate, up)`."""
    if split_gate_up:
        n, half = x_nD.shape[0], w_in_EHD.shape[1] // 2
        halves = (None, None) if h_out is None else h_out.view(2, n, half)  # h_out: rows :n, contiguous
        gate_nI, up_nI = (
            _linear(x_nD, w_in_EHD[e, cols], None if b_in_EH is None else b_in_EH[e, cols], out)
            for cols, out in zip((slice(None, half), slice(half, None)), halves)
        )
        a_nI = activate(gate_nI, up_nI)
    else:
        a_nI = activate(_linear(x_nD, w_in_EHD[e], None if b_in_EH is None else b_in_EH[e], h_out))
    return _linear(a_nI, w_out_EOI[e], None if b_out_EO is None else b_out_EO[e], y_out)


class ExpertLoop(torch.autograd.Function):
    """The loop over assignments already gathered and sorted, with a backward that runs expert
    by expert as well.

    Saves the tokens, the weights and the pre-activations [A, H] (as autograd would for the
    grouped path); the activation is recomputed per expert in backward, inside the cache.
    Weight gradients of experts that received no token are exact zeros.
    """

    @staticmethod
    def forward(ctx, x_AD, w_in_EHD, b_in_EH, w_out_EOI, b_out_EO, sizes, activate):
        # The pre-activations are kept for backward (written once here, read back only there).
        h_AH = x_AD.new_empty(x_AD.shape[0], w_in_EHD.shape[1])
        y_AO = x_AD.new_empty(x_AD.shape[0], w_out_EOI.shape[1])
        for e, rows in _expert_rows(sizes):
            _expert(x_AD[rows], e, w_in_EHD, b_in_EH, w_out_EOI, b_out_EO, activate, h_AH[rows], y_AO[rows])
        ctx.save_for_backward(x_AD, w_in_EHD, w_out_EOI, h_AH)
        ctx.sizes, ctx.activate = sizes, activate
        ctx.has_bias = (b_in_EH is not None, b_out_EO is not None)
        return y_AO

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_AO):
        x_AD, w_in_EHD, w_out_EOI, h_AH = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        need_h = need_x or need_w_in or need_b_in
        grad_y_AO = grad_y_AO.contiguous()
        num_experts = w_in_EHD.shape[0]
        # Each expert writes its own slice; experts without tokens are zeroed below.
        grad_x_AD = torch.empty_like(x_AD) if need_x else None
        grad_w_in = w_in_EHD.new_empty(w_in_EHD.shape) if need_w_in else None
        grad_b_in = w_in_EHD.new_empty(num_experts, w_in_EHD.shape[1]) if need_b_in else None
        grad_w_out = w_out_EOI.new_empty(w_out_EOI.shape) if need_w_out else None
        grad_b_out = w_out_EOI.new_empty(num_experts, w_out_EOI.shape[1]) if need_b_out else None
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                for grad in (grad_w_in, grad_b_in, grad_w_out, grad_b_out):
                    if grad is not None:
                        grad[e].zero_()
        for e, rows in _expert_rows(ctx.sizes):
            gy_nO = grad_y_AO[rows]
            # The activation's own derivative, whatever the module: autograd over this expert's
            # rows only, so the recomputed activation never leaves the cache.
            with torch.enable_grad():
                h_nH = h_AH[rows].detach().requires_grad_(need_h)
                a_nI = ctx.activate(h_nH)
            if need_w_out:
                torch.mm(gy_nO.T, a_nI.detach(), out=grad_w_out[e])
            if need_b_out:
                torch.sum(gy_nO, 0, out=grad_b_out[e])
            if not need_h:
                continue
            (grad_h_nH,) = torch.autograd.grad(a_nI, h_nH, gy_nO @ w_out_EOI[e])
            if need_w_in:
                torch.mm(grad_h_nH.T, x_AD[rows], out=grad_w_in[e])
            if need_b_in:
                torch.sum(grad_h_nH, 0, out=grad_b_in[e])
            if need_x:
                torch.mm(grad_h_nH, w_in_EHD[e], out=grad_x_AD[rows])
        has_b_in, has_b_out = ctx.has_bias
        return (
            grad_x_AD,
            grad_w_in,
            grad_b_in if has_b_in else None,
            grad_w_out,
            grad_b_out if has_b_out else None,
            None,
            None,
        )
