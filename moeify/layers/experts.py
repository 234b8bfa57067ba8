"""Routed and shared experts.

`PackedExperts` holds E clones of a recognised FFN layout as one [E, ...] tensor per projection
(stored nn.Linear-style, [E, out, in], so expert e's slice equals the dense weight bit for bit)
and runs them by sorted, grouped dispatch. `ModuleExperts` holds deep copies of any other
token-wise module, so exotic FFNs still convert.

Shape legend: T tokens, D model dim, I intermediate dim, E experts, K top-k, A = T*K.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.layers import expert_loop
from moeify.layers.dispatch import count_per_expert, grouped_linear, sort_by_expert


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a projection runs in: autocast's when it is on (as F.linear would), else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


class PackedExperts(nn.Module):
    """E experts `y = w_out · act(w_in · x + b_in) + b_out`, one tensor per projection.

    Gated layouts (SwiGLU/GEGLU) keep gate and up stacked in `w_in` as [gate; up] along the out
    dim (transformers' `gate_up_proj` order) and compute `act(gate) * up`.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        intermediate_size: int,
        out_features: int,
        *,
        gated: bool,
        act: nn.Module,
        bias_in: bool,
        bias_out: bool,
        mid_dropout: float = 0.0,
        out_dropout: float = 0.0,
        in_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        up_act: nn.Module | None = None,
        post_act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        rows_in = 2 * intermediate_size if gated else intermediate_size
        self.num_experts, self.gated = num_experts, gated
        self.w_in = nn.Parameter(torch.empty(num_experts, rows_in, in_features, dtype=in_dtype, device=device))
        self.b_in = nn.Parameter(torch.empty(num_experts, rows_in, dtype=in_dtype, device=device)) if bias_in else None
        self.w_out = nn.Parameter(
            torch.empty(num_experts, out_features, intermediate_size, dtype=out_dtype, device=device)
        )
        self.b_out = (
            nn.Parameter(torch.empty(num_experts, out_features, dtype=out_dtype, device=device)) if bias_out else None
        )
        self.act = act
        # Gated only: applied to the up half before the product (GLM clamps it), and to the product
        # (BitNet normalises it); None: identity.
        self.up_act, self.post_act = up_act, post_act
        self.mid_dropout, self.out_dropout = mid_dropout, out_dropout
        # Expert parallelism (moeify.distributed.apply_expert_parallel): the packed tensors become
        # DTensors sharded on dim 0 and this moves each assignment to the rank holding its expert.
        self.exchange = None

    def extra_repr(self) -> str:
        e, rows, d = self.w_in.shape
        return f"num_experts={e}, in={d}, intermediate={self.w_out.shape[-1]}, out={self.w_out.shape[1]}, gated={self.gated}"

    def _activation(self, h: Tensor, in_place: bool = False) -> Tensor:
        """`in_place`: the gate product overwrites act(gate), one expert-sized temporary fewer;
        only without autograd (nothing then needs the activation's output afterwards)."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self._gate(gate, up, in_place)
        return self.act(h)

    def _gate(self, gate: Tensor, up: Tensor, in_place: bool = False) -> Tensor:
        if self.up_act is not None:
            up = self.up_act(up)
        product = self.act(gate).mul_(up) if in_place else self.act(gate) * up
        return product if self.post_act is None else self.post_act(product)

    def _splits_gate_up(self, x: Tensor, needs_grad: bool) -> bool:
        """Gated, on a CPU, several tokens, no autograd: the input projection as two products (the
        gate rows, then the up rows) instead of one over [gate; up]. This CPU's BLAS runs
        [n, D] x [D, 2I] 5-16% slower than two [n, D] x [D, I] at 4-128 tokens per expert, while at
        one token the single product is as fast or faster (benchmarks/RESULTS.md, "generate()").
        Under autograd each slice's weight gradient would be a full [E, 2I, D] buffer, so training
        keeps the one product."""
        return self.gated and x.device.type == "cpu" and x.shape[0] > 1 and not needs_grad

    def _activated(self, x: Tensor, w_in: Tensor, b_in: Tensor | None, project: Callable, split: bool) -> Tensor:
        """act(w_in · x + b_in), mid dropout included, where `project(x, w, b)` runs one input
        product (grouped over experts, or one expert's); `split` as in `_splits_gate_up`. The
        [gate; up] rows sit on dim -2 of `w_in` and dim -1 of `b_in` whether packed or one expert's."""
        if split:
            half = w_in.shape[-2] // 2
            gate, up = (
                project(x, w_in[..., rows, :], None if b_in is None else b_in[..., rows])
                for rows in (slice(None, half), slice(half, None))
            )
            h = self._gate(gate, up, in_place=True)
        else:
            h = self._activation(project(x, w_in, b_in))
        return F.dropout(h, self.mid_dropout, self.training) if self.mid_dropout else h

    def _finish(self, y: Tensor) -> Tensor:
        return F.dropout(y, self.out_dropout, self.training) if self.out_dropout else y

    def _runs_expert_by_expert(self, x: Tensor, tensors: tuple[Tensor | None, ...], assignments: int | None) -> bool:
        """CPU, large batches: expert by expert (moeify.layers.expert_loop); elsewhere, or with
        dropout between the projections in training (its mask would have to be replayed in
        backward), grouped. `assignments=None`: whatever the batch size."""
        extra = (self.up_act, self.post_act)
        if (self.mid_dropout and self.training) or any(getattr(m, "inplace", False) for m in extra):
            return False
        return expert_loop.applies(x, tensors, self.act, assignments)

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None, expert_A: Tensor, counts_E: Tensor) -> Tensor:
        dtype = compute_dtype(x.device, weight.dtype)
        return grouped_linear(
            x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), expert_A, counts_E
        )

    def forward(
        self, x_TD: Tensor, expert_idx_TK: Tensor | None = None, weights_TK: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | Tensor:
        """Routed: the weighted expert output `y_TD` and `tokens_per_expert_E`. Without routes (shared
        experts): `forward_all(x_TD)`. MoeLayer calls both through the module, so whatever wraps the
        experts (peft adapters, hooks) sees the call."""
        if expert_idx_TK is None:
            return self.forward_all(x_TD)
        # Read once: under a peft adapter each read of a weight computes W + ΔW afresh.
        tensors = (self.w_in, self.b_in, self.w_out, self.b_out)
        if self.exchange is not None:
            return self._forward_parallel(x_TD, expert_idx_TK, weights_TK, tensors)
        needs_grad = expert_loop.wants_grad(x_TD, weights_TK, *tensors)
        split = self._splits_gate_up(x_TD, needs_grad)
        loops = self._runs_expert_by_expert(x_TD, tensors, None)  # the CPU loop may run this call
        activate = partial(self._gate if split else self._activation, in_place=True)
        if loops and not needs_grad and x_TD.shape[0] <= expert_loop.FEW_TOKENS:
            y_TD = expert_loop.run_few(x_TD, expert_idx_TK, weights_TK, *tensors, activate, self._finish, split)
            return y_TD, count_per_expert(expert_idx_TK.reshape(-1), self.num_experts)
        order_A, token_A, expert_A, counts_E = sort_by_expert(expert_idx_TK, self.num_experts)
        weight_A1 = weights_TK.reshape(-1)[order_A].unsqueeze(-1)
        expert_by_expert = loops and expert_loop.outgrows_cache(x_TD, self.w_in, expert_idx_TK.numel())
        if expert_by_expert and not needs_grad:
            y_TD = expert_loop.run_combined(x_TD, token_A, weight_A1, *tensors, counts_E, activate, self._finish, split)
            return y_TD, counts_E
        # index_select, not x_TD[token_A]: its backward is a row-wise index_add_, where advanced
        # indexing's is an element-wise scatter (1.5x slower on CPU at 4096 tokens).
        x_AD = x_TD.index_select(0, token_A)
        if expert_by_expert:
            y_AD = self._finish(expert_loop.run(x_AD, *tensors, counts_E, self._activation))
        else:
            y_AD = self.run_sorted(x_AD, expert_A, counts_E, tensors, split)
        return self._combine(x_TD, y_AD, token_A, weight_A1), counts_E

    def run_sorted(
        self, x_AD: Tensor, expert_A: Tensor, counts_E: Tensor, tensors: tuple[Tensor | None, ...], split: bool = False
    ) -> Tensor:
        """The experts' outputs y_AD for assignments sorted by expert (`expert_A` of each, `counts_E`
        per expert), grouped: one product per projection. `tensors` = (w_in, b_in, w_out, b_out),
        whose dim 0 indexes the experts that `expert_A` names."""
        w_in, b_in, w_out, b_out = tensors
        project = partial(self._project, expert_A=expert_A, counts_E=counts_E)
        h_AI = self._activated(x_AD, w_in, b_in, project, split)
        return self._finish(self._project(h_AI, w_out, b_out, expert_A, counts_E))

    @staticmethod
    def _combine(x_TD: Tensor, y_AD: Tensor, token_A: Tensor, weight_A1: Tensor) -> Tensor:
        """Each token's weighted sum of its assignments' outputs."""
        y_TD = y_AD.new_zeros(x_TD.shape[0], y_AD.shape[-1])
        # index_add_ keeps one dtype end to end (an fp32 buffer filled by bf16 slices fails under autocast).
        return y_TD.index_add_(0, token_A, y_AD * weight_A1.to(y_AD.dtype))

    def _forward_parallel(
        self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor, tensors: tuple[Tensor | None, ...]
    ) -> tuple[Tensor, Tensor]:
        """Expert parallelism: the assignments travel to the ranks holding their experts
        (`self.exchange`, a moeify.distributed.TokenExchange), run there on the grouped path over
        the local shard, and come back. The counts returned are this rank's routing choices."""
        order_A, token_A, _, counts_E = sort_by_expert(expert_idx_TK, self.num_experts)
        weight_A1 = weights_TK.reshape(-1)[order_A].unsqueeze(-1)
        local = tuple(self.exchange.local(t) for t in tensors)
        y_AD = self.exchange(x_TD.index_select(0, token_A), counts_E, partial(self.run_sorted, tensors=local))
        return self._combine(x_TD, y_AD, token_A, weight_A1), counts_E

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every token through every expert, summed: how shared experts run."""
        y_TD = None
        params = zip(
            self.w_in.unbind(0),
            self.b_in.unbind(0) if self.b_in is not None else [None] * self.num_experts,
            self.w_out.unbind(0),
            self.b_out.unbind(0) if self.b_out is not None else [None] * self.num_experts,
        )
        split = self._splits_gate_up(x_TD, expert_loop.wants_grad(x_TD, self.w_in, self.b_in, self.w_out, self.b_out))
        for w_in, b_in, w_out, b_out in params:
            h = self._activated(x_TD.to(compute_dtype(x_TD.device, w_in.dtype)), w_in, b_in, F.linear, split)
            y = F.linear(h.to(compute_dtype(h.device, w_out.dtype)), w_out, b_out)
            if self.out_dropout:
                y = F.dropout(y, self.out_dropout, self.training)
            y_TD = y if y_TD is None else y_TD + y
        return y_TD

    def matrices(self) -> list[nn.Parameter]:
        """The weight matrices (no biases): what the "noise" shared init perturbs."""
        return [self.w_in, self.w_out]

    def output_parameters(self) -> list[nn.Parameter]:
        """Parameters of the output projection (zeroed by the "zero_out" shared init)."""
        return [p for p in (self.w_out, self.b_out) if p is not None]

    def input_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.w_in, self.b_in) if p is not None]


class ModuleExperts(nn.Module):
    """E deep copies of an arbitrary token-wise FFN module (the generic path). Under torch.compile
    its routed call is a graph break (it runs eagerly); `fullgraph=True` needs packed experts."""

    def __init__(self, module: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.experts = nn.ModuleList(copy.deepcopy(module) for _ in range(num_experts))

    def forward(
        self, x_TD: Tensor, expert_idx_TK: Tensor | None = None, weights_TK: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | Tensor:
        if expert_idx_TK is None:  # shared experts, as in PackedExperts.forward
            return self.forward_all(x_TD)
        return self._routed(x_TD, expert_idx_TK, weights_TK)

    # Under torch.compile the routed experts run eagerly (a graph break around this call): the
    # split sizes are read on the host and each expert sees a data-dependent number of tokens,
    # which dynamo would otherwise specialise on and recompile for. Packed layouts compile whole.
    @torch.compiler.disable
    def _routed(self, x_TD: Tensor, expert_idx_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor]:
        order_A, token_A, _, counts_E = sort_by_expert(expert_idx_TK, self.num_experts)
        x_AD = x_TD[token_A]
        weight_A1 = weights_TK.reshape(-1)[order_A].unsqueeze(-1)
        # The generic path reads the split sizes on the host (one sync); packed layouts do not.
        outputs = [
            expert(chunk) if chunk.shape[0] else None
            for chunk, expert in zip(x_AD.split(counts_E.tolist()), self.experts)
        ]
        present = [out for out in outputs if out is not None]
        y_AD = torch.cat(present) if present else x_AD.new_zeros(0, x_TD.shape[-1])
        y_TD = y_AD.new_zeros(x_TD.shape[0], y_AD.shape[-1])
        y_TD = y_TD.index_add_(0, token_A, y_AD * weight_A1.to(y_AD.dtype))
        idle = [expert for expert, out in zip(self.experts, outputs) if out is None]
        if idle and torch.is_grad_enabled():
            # DDP without find_unused_parameters fails on the next step ("Expected to have finished
            # reduction") when a parameter is missing from a step's graph. An empty slice of each
            # idle expert's parameters joins the graph at zero cost: its gradient is exactly zero.
            y_TD = y_TD + sum(
                p.reshape(-1)[:0].sum() for expert in idle for p in expert.parameters() if p.requires_grad
            )
        return y_TD, counts_E

    def forward_all(self, x_TD: Tensor) -> Tensor:
        y_TD = None
        for expert in self.experts:
            y = expert(x_TD)
            y_TD = y if y_TD is None else y_TD + y
        return y_TD

    def matrices(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.dim() >= 2]

    def output_parameters(self) -> list[nn.Parameter]:
        """The last nn.Linear of each copy, taken as its output projection."""
        params = []
        for expert in self.experts:
            linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(
                    f"shared_expert_init='zero_out' needs an nn.Linear output projection, and "
                    f"{type(expert).__name__} has none; use shared_expert_init='noise'"
                )
            params += [p for p in (linears[-1].weight, linears[-1].bias) if p is not None]
        return params

    def input_parameters(self) -> list[nn.Parameter]:
        out = {id(p) for p in self.output_parameters()}
        return [p for p in self.parameters() if id(p) not in out]
