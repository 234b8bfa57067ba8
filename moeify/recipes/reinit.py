"""Drop-Upcycling ("Drop-Upcycling: Training Sparse Mixture of Experts with Partial
Re-initialization", Nakamura et al. 2025): every routed expert starts as the dense FFN with a
random fraction r of its intermediate neurons re-initialised, a different subset per expert, so
the experts differ from step one instead of waiting for the router to break their symmetry.

A neuron j is one row of each matrix of `w_in` (gate and up alike, with `b_in`) and the matching
column of `w_out`; the new values are drawn from a normal with the mean and standard deviation of
the matrix they land in (each expert's own matrix before the change: the dense FFN's for clones,
the source's with `experts_from`). `b_out` belongs to no neuron and is kept. Laws 2 and 3 hold
(shared experts zero, routers random); Law 1 is broken by design, so `moeify` measures the
deviation from the dense FFN and reports it (`model.moeify_state.deviation`) instead of failing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeify.layers.experts import PackedExperts
from moeify.surgery.plan import ConversionError, ConversionPlan

# Offset of the re-initialisation's seed from the router's (seed * 1_000_003 + index) and the
# shared noise's (+ 500_009): a different stream for every layer, independent of the caller's RNG.
SEED_OFFSET = 700_001


def layer_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index + SEED_OFFSET


def check_sites(plan: ConversionPlan) -> None:
    """Re-initialising neurons needs packed experts: refuse the generic path before any change."""
    if plan.config.reinit_fraction == 0:
        return
    generic = [site.name for site in plan.sites if site.layout is None]
    if generic:
        raise ConversionError(
            f"reinit_fraction={plan.config.reinit_fraction} re-initialises intermediate neurons of packed experts, "
            f"and {generic[0]} is converted on the generic path (its layout is not known, so neither are its "
            "neurons): leave it out with exclude_modules, or pass reinit_fraction=0"
        )


def _normal_like(matrix: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Draws from N(mean, std) of `matrix` (float32 statistics, drawn on CPU: device independent)."""
    values = matrix.detach().float().cpu()
    mean, std = values.mean(), values.std(unbiased=False)
    drawn = torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean
    return drawn.to(dtype=matrix.dtype, device=matrix.device)


@torch.no_grad()
def reinit_experts(experts: PackedExperts, fraction: float, seed: int) -> list[Tensor]:
    """Re-initialise round(fraction * I) neurons of every routed expert, in place; returns each
    expert's re-initialised neuron indices (sorted). Nothing happens on the meta device (a model
    rebuilt for loading gets its weights from the file)."""
    if not isinstance(experts, PackedExperts):
        raise TypeError(f"reinit_experts works on PackedExperts, got {type(experts).__name__}")
    intermediate = experts.w_out.shape[-1]
    count = round(fraction * intermediate)
    if experts.w_in.is_meta or count == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    blocks = experts.w_in.shape[1] // intermediate  # 2 for gated kinds ([gate; up]), else 1
    dropped: list[Tensor] = []
    for e in range(experts.num_experts):
        neurons_N = torch.randperm(intermediate, generator=generator)[:count].sort().values
        dropped.append(neurons_N)
        for b in range(blocks):
            rows_N = neurons_N + b * intermediate
            w_in_ID = experts.w_in[e, b * intermediate : (b + 1) * intermediate]
            experts.w_in[e, rows_N.to(w_in_ID.device)] = _normal_like(w_in_ID, (count, w_in_ID.shape[1]), generator)
            if experts.b_in is not None:
                b_in_I = experts.b_in[e, b * intermediate : (b + 1) * intermediate]
                experts.b_in[e, rows_N.to(b_in_I.device)] = _normal_like(b_in_I, (count,), generator)
        w_out_DI = experts.w_out[e]
        experts.w_out[e][:, neurons_N.to(w_out_DI.device)] = _normal_like(
            w_out_DI, (w_out_DI.shape[0], count), generator
        )
    return dropped
