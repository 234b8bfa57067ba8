"""moeify's two CPU paths for packed experts against each other: the expert loop
(moeify.layers.expert_loop: expert by expert, custom backward) ÷ the grouped path (one grouped
product per projection, the path GPUs take), on the same layer and tokens, at several batch
sizes. This is the measurement behind `expert_loop.MIN_INTERMEDIATE_BYTES`, where moeify
switches from one to the other; plus the activation memory each saves for backward.
"""

from __future__ import annotations

import torch
from layer_bench import Settings, forward_backward, forward_only, tokens
from models import Shape, convert, dense_ffn, llm_shape
from results import Row, ratio_rows
from timing import interleaved
from torch import Tensor, nn

from moeify.layers import expert_loop

LOOP, GROUPED = "expert loop", "grouped path"
ALWAYS, NEVER = 0, 1 << 62  # MIN_INTERMEDIATE_BYTES that force one path


class OnPath(nn.Module):
    """Calls `layer` with the CPU path chosen by `threshold` (restored afterwards)."""

    def __init__(self, layer: nn.Module, threshold: int) -> None:
        super().__init__()
        self.layer, self.threshold = layer, threshold

    def forward(self, x: Tensor) -> Tensor:
        saved = expert_loop.MIN_INTERMEDIATE_BYTES
        expert_loop.MIN_INTERMEDIATE_BYTES = self.threshold
        try:
            return self.layer(x)
        finally:
            expert_loop.MIN_INTERMEDIATE_BYTES = saved


def saved_for_backward_mb(module: nn.Module, x: Tensor) -> float:
    """MB of tensors autograd keeps for backward, not counting parameters and the input."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    known = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in known) / 2**20


def path_rows(token_counts: list[int], settings: Settings) -> tuple[list[Row], dict]:
    shape: Shape = llm_shape(max(token_counts))
    layer = convert(dense_ffn(shape, dtype=settings.dtype, device=settings.device), shape)
    loop, grouped = OnPath(layer, ALWAYS), OnPath(layer, NEVER)
    rows: list[Row] = []
    info: dict = {"min_intermediate_bytes": expert_loop.MIN_INTERMEDIATE_BYTES, "saved_for_backward_mb": {}}
    rows_in = layer.experts.w_in.shape[1]
    for count in token_counts:
        x = tokens(shape, count, settings, seed=5)
        x_grad = x.detach().clone().requires_grad_(True)
        grad = torch.randn_like(x)
        intermediate_mb = count * shape.top_k * rows_in * x.element_size() / 2**20
        note = f"{count} tokens: grouped [A, H] intermediate {intermediate_mb:.0f} MB"
        contenders = {
            "fwd": {LOOP: forward_only(loop, x), GROUPED: forward_only(grouped, x)},
            "fwd+bwd": {LOOP: forward_backward(loop, x_grad, grad), GROUPED: forward_backward(grouped, x_grad, grad)},
        }
        for mode, runs in contenders.items():
            timings = interleaved(runs, repeats=settings.repeats, warmup=settings.warmup)
            rows += ratio_rows(
                timings,
                section="cpu paths",
                shape=f"llm@{count}",
                mode=mode,
                candidate=LOOP,
                baselines=[GROUPED],
                note=note,
            )
        saved = {name: saved_for_backward_mb(m, x_grad) for name, m in ((LOOP, loop), (GROUPED, grouped))}
        info["saved_for_backward_mb"][count] = saved
        ratio = saved[LOOP] / saved[GROUPED]
        rows.append(
            Row(
                "cpu paths",
                f"llm@{count}",
                "saved for backward",
                LOOP,
                GROUPED,
                ratio,
                ratio,
                ratio,
                note=f"{saved[LOOP]:.0f} / {saved[GROUPED]:.0f} MB kept for backward (activations, not weights)",
            )
        )
    return rows, info
