"""MoE layer speed: moeify's layer against the dense top-k limit and against transformers' own
MoE block, with balanced routing, skewed routing and decode-sized batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from models import (
    DensePerExpert,
    DenseTopK,
    Shape,
    WithImplementation,
    convert,
    dense_ffn,
    expert_shares,
    skew,
    transformers_twin,
)
from results import Row, ratio_rows
from timing import Timings, interleaved
from torch import Tensor, nn

from moeify.layers.moe import MoeLayer

LIMIT = "dense×k"  # the dense FFN run top_k times on the same tokens
TARGET_FWD_BWD = 1.15  # forward+backward within 15% of the limit
TARGET_DECODE = 1.5
TARGET_TRANSFORMERS = 1.0  # at least as fast as the fastest transformers implementation
TWIN_IMPLEMENTATIONS = ("eager", "grouped_mm")  # batched_mm gathers a weight matrix per token: decode only


@dataclass
class Settings:
    repeats: int
    warmup: int
    decode_repeats: int
    device: torch.device
    dtype: torch.dtype

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def forward_only(module: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def forward_backward(module: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """One training step's layer work; gradients start from None each call, as after
    `optimizer.zero_grad()`. A random incoming gradient: CPU grouped_mm's backward rejects the
    stride-0 gradient of `out.sum()` (../shared NOTES)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    return run


def tokens(shape: Shape, count: int, settings: Settings, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, count, shape.hidden, generator=generator).to(settings.device, settings.dtype)


def relative_error(out: Tensor, ref: Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def check_twins(layer: MoeLayer, twins: dict[str, nn.Module], x: Tensor, settings: Settings) -> dict[str, float]:
    """Identical routing and weights must give identical outputs before any timing counts."""
    allowed = 1e-4 if settings.dtype == torch.float32 else 3e-2
    errors = {}
    with torch.no_grad():
        ref = layer(x)
        for name, twin in twins.items():
            errors[name] = relative_error(twin(x), ref)
            if errors[name] > allowed:
                raise RuntimeError(
                    f"transformers {name} differs from moeify by {errors[name]:.2e} (allowed {allowed:g})"
                )
    return errors


def _timed(contenders: dict[str, Callable[[], object]], settings: Settings, repeats: int | None = None) -> Timings:
    return interleaved(contenders, repeats=repeats or settings.repeats, warmup=settings.warmup, sync=settings.sync)


def _twins(layer: MoeLayer, shape: Shape, implementations: tuple[str, ...]) -> tuple[nn.Module, dict[str, nn.Module]]:
    block = transformers_twin(layer, shape)
    return block, {f"transformers {name}": WithImplementation(block, name) for name in implementations}


def _balanced_and_skewed(
    shape: Shape, settings: Settings, layer: MoeLayer, baselines: dict[str, nn.Module], *, section: str, x: Tensor
) -> list[Row]:
    """fwd and fwd+bwd of `layer` against every baseline, interleaved in one group."""
    grad = torch.randn_like(x)
    x_grad = x.detach().clone().requires_grad_(True)
    rows = []
    targets = {LIMIT: TARGET_FWD_BWD} | {name: TARGET_TRANSFORMERS for name in baselines if name != LIMIT}
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            contenders = {"moeify": forward_only(layer, x)} | {n: forward_only(m, x) for n, m in baselines.items()}
        else:
            contenders = {"moeify": forward_backward(layer, x_grad, grad)} | {
                n: forward_backward(m, x_grad, grad) for n, m in baselines.items()
            }
        timings = _timed(contenders, settings)
        mode_targets = {k: v for k, v in targets.items() if mode == "fwd+bwd" or k != LIMIT}
        rows += ratio_rows(
            timings,
            section=section,
            shape=shape.name,
            mode=mode,
            candidate="moeify",
            baselines=list(baselines),
            targets=mode_targets,
        )
    return rows


def _section_of(name: str, default: str) -> str:
    return "transformers" if name.startswith("transformers") else default


def _split_sections(rows: list[Row], default: str) -> list[Row]:
    for row in rows:
        row.section = _section_of(row.baseline, default)
    return rows


def layer_suite(shape: Shape, settings: Settings, *, twin_shape: Shape | None = None) -> tuple[list[Row], dict]:
    """Every layer row of one shape. `twin_shape`: the bias-free variant that transformers' experts
    can hold, when `shape` itself has biases (None: compare `shape` itself)."""
    info: dict = {"shape": vars(shape).copy()}
    dense = dense_ffn(shape, dtype=settings.dtype, device=settings.device)
    layer = convert(dense, shape)
    limit = DenseTopK(dense, shape.top_k)
    x = tokens(shape, shape.tokens, settings, seed=1)
    info["balanced_shares"] = expert_shares(layer, x)

    twin_layer, twin_x = layer, x
    if twin_shape is not None:
        twin_dense = dense_ffn(twin_shape, dtype=settings.dtype, device=settings.device, seed=2)
        twin_layer = convert(twin_dense, twin_shape)
    block, twins = _twins(twin_layer, twin_shape or shape, TWIN_IMPLEMENTATIONS)
    info["twin_max_relative_error"] = check_twins(twin_layer, twins, twin_x, settings)

    rows: list[Row] = []
    if twin_shape is None:  # one interleaved group: the limit and both transformers implementations
        rows += _split_sections(
            _balanced_and_skewed(shape, settings, layer, {LIMIT: limit} | twins, section="limit", x=x), "limit"
        )
    else:
        rows += _balanced_and_skewed(shape, settings, layer, {LIMIT: limit}, section="limit", x=x)
        twin_rows = _balanced_and_skewed(twin_shape, settings, twin_layer, twins, section="transformers", x=twin_x)
        for row in twin_rows:
            row.note = "bias-free twin layer: transformers' non-gated experts (NemotronH) have no biases"
        rows += twin_rows

    rows += decode_rows(shape, settings, dense, layer, block if twin_shape is None else None, info)

    saved = layer.router.gate.weight.detach().clone()
    x_skewed = skew(layer, block if twin_shape is None else None, x)
    info["skewed_shares"] = expert_shares(layer, x_skewed)
    # Skewed: the fastest transformers implementation only (eager is 3x slower; ~3 min of a full run).
    skew_twins = {n: m for n, m in twins.items() if n.endswith("grouped_mm")}
    skew_baselines = {LIMIT: limit} | (skew_twins if twin_shape is None else {})
    if twin_shape is None:
        info["twin_max_relative_error_skewed"] = check_twins(layer, skew_twins, x_skewed, settings)
    skewed = _balanced_and_skewed(shape, settings, layer, skew_baselines, section="skewed", x=x_skewed)
    note = f"expert 0 takes {info['skewed_shares'][0]:.0%} of the assignments"
    for row in skewed:
        row.section = "skewed" if row.baseline == LIMIT else "skewed transformers"
        row.note = note
        if row.baseline == LIMIT:
            row.target = None  # reported, not a stated target
    with torch.no_grad():
        layer.router.gate.weight.copy_(saved)
    return rows + skewed, info


def decode_rows(
    shape: Shape, settings: Settings, dense: nn.Module, layer: MoeLayer, block: nn.Module | None, info: dict
) -> list[Row]:
    """16 tokens, forward only (inference). The limit reads each hit expert's weights once."""
    x = tokens(shape, 16, settings, seed=3)
    limit = DensePerExpert(dense, layer, x)
    info["decode_experts_hit"] = len(limit.hit)
    contenders: dict[str, Callable[[], object]] = {
        "moeify": forward_only(layer, x),
        "dense per hit expert": forward_only(limit, x),
    }
    names = ["dense per hit expert"]
    if block is not None:
        for impl in TWIN_IMPLEMENTATIONS:
            name = f"transformers {impl}"
            contenders[name] = forward_only(WithImplementation(block, impl), x)
            names.append(name)
    timings = _timed(contenders, settings, repeats=settings.decode_repeats)
    targets = {"dense per hit expert": TARGET_DECODE} | {n: TARGET_TRANSFORMERS for n in names[1:]}
    rows = ratio_rows(
        timings, section="decode", shape=shape.name, mode="fwd", candidate="moeify", baselines=names, targets=targets
    )
    if block is not None:
        # batched_mm gathers a weight matrix per assignment (~1 GB here): in its own group, so that
        # its allocations (page faults, evicted caches) do not land on the contenders after it.
        batched = "transformers batched_mm"
        timings = _timed(
            {"moeify": forward_only(layer, x), batched: forward_only(WithImplementation(block, "batched_mm"), x)},
            settings,
            repeats=settings.decode_repeats,
        )
        rows += ratio_rows(
            timings,
            section="decode",
            shape=shape.name,
            mode="fwd",
            candidate="moeify",
            baselines=[batched],
            targets={batched: TARGET_TRANSFORMERS},
        )
    for row in rows:
        row.note = f"16 tokens, {len(limit.hit)} experts hit"
    return rows
