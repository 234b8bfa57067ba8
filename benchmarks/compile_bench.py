"""torch.compile (inductor): the compiled MoE layer against the compiled dense top-k limit, and
against the same layer in eager, in one interleaved group per mode.

The compiled limit is the dense FFN compiled on its own and called top_k times. Compiling
`DenseTopK` whole would let AOTAutograd's common-subexpression elimination merge the k identical
runs: its forward+backward then costs one dense run, not k (measured: 0.55x the eager limit).

Eager runs the CPU expert loop above `MIN_INTERMEDIATE_BYTES` (every full-mode shape); compiled,
the layer takes the grouped path with its product as one custom op (moeify.layers.dispatch), so
`compiled ÷ eager` also compares the two paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from layer_bench import LIMIT, Settings, forward_backward, forward_only, relative_error, tokens
from models import DenseTopK, Shape, convert, dense_ffn
from results import Row, ratio_rows
from timing import interleaved

from moeify.layers.moe import MoeLayer

COMPILED, COMPILED_LIMIT, EAGER = "compiled moeify", f"compiled {LIMIT}", "eager moeify"


def taking_losses(run: Callable[[], None], layer: MoeLayer) -> Callable[[], None]:
    """A training step takes the router losses (`moeify.aux_loss`): without, the compiled layer's
    next backward also runs through the previous step's freed graph (its collected loss sum is an
    input of the one compiled autograd node) and fails."""

    def step() -> None:
        run()
        layer.aux_loss()

    return step


def compile_rows(shape: Shape, settings: Settings) -> tuple[list[Row], dict]:
    # Every MoeLayer shares one code object, and so dynamo's per-code recompile limit (8): start
    # each shape from an empty cache.
    torch._dynamo.reset()
    dense = dense_ffn(shape, dtype=settings.dtype, device=settings.device)
    layer = convert(dense, shape)
    compiled = torch.compile(layer, fullgraph=True)  # no graph break inside the MoE layer
    compiled_limit = DenseTopK(torch.compile(dense), shape.top_k)
    x = tokens(shape, shape.tokens, settings, seed=1)
    x_grad = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)
    runs = {
        "fwd": {
            n: forward_only(m, x) for n, m in ((COMPILED, compiled), (COMPILED_LIMIT, compiled_limit), (EAGER, layer))
        },
        "fwd+bwd": {
            COMPILED: taking_losses(forward_backward(compiled, x_grad, grad), layer),
            COMPILED_LIMIT: forward_backward(compiled_limit, x_grad, grad),
            EAGER: taking_losses(forward_backward(layer, x_grad, grad), layer),
        },
    }
    info: dict = {"compile_seconds": {}}
    for mode in runs:  # compile outside the timed rounds (first call of each graph)
        t0 = time.perf_counter()
        runs[mode][COMPILED]()
        runs[mode][COMPILED_LIMIT]()
        settings.sync()
        info["compile_seconds"][mode] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        info["max_relative_error"] = relative_error(compiled(x), layer(x))
    allowed = 1e-5 if settings.dtype == torch.float32 else 3e-2
    if info["max_relative_error"] > allowed:
        raise RuntimeError(
            f"compiled layer differs from eager by {info['max_relative_error']:.2e} (allowed {allowed:g})"
        )
    rows: list[Row] = []
    for mode, contenders in runs.items():
        timings = interleaved(contenders, repeats=settings.repeats, warmup=settings.warmup, sync=settings.sync)
        rows += ratio_rows(
            timings,
            section="compiled",
            shape=shape.name,
            mode=mode,
            candidate=COMPILED,
            baselines=[COMPILED_LIMIT, EAGER],
            note=f"inductor; compiled in {info['compile_seconds'][mode]} s",
        )
    return rows, info
