"""Fine-grained experts: each copy of the dense FFN cut into `granularity` experts along its
intermediate dimension ("Upcycling Large Language Models into Mixture of Experts", NVIDIA:
virtual groups and weight scaling; Qwen1.5-MoE's fine-grained experts).

With G = granularity, C = num_experts // G copies and I the FFN's intermediate size, expert
e = c·G + j holds slice j of the intermediate units, rows [j·I/G, (j+1)·I/G):

  w_in   those rows (gated FFNs: the same rows of gate AND of up, packed [gate_j; up_j])
  b_in   those rows
  w_out  those columns, times G
  b_out  whole (every slice keeps the FFN's output bias)

The router starts in virtual groups: the G rows of a copy's slices are one random row repeated
(in every output layer the router sums into its logits), so the slices of a copy have equal
logits and a top-(k·G) choice takes k whole copies (distinct copies' logits differ almost surely).
Renormalised over the k·G chosen slices, each slice of chosen copy c weighs p_c / (G·P), with P
the chosen copies' summed score, and the slices of one copy add up to
  Σ_j (G · w_out_j act(w_in_j x) + b_out) = G · dense(x),
so the layer returns Σ_c (p_c / P) · dense(x) = dense(x): the dense function is kept at
conversion, checked by the identity check like plain clones. The activation must act unit by
unit (checked on a probe); a product norm (`post_act`, BitNet) does not, and is refused.

Where this departs from the three laws (moeify.surgery.apply):
  Law 1 (routed experts are exact clones): the experts are slices of the FFN, not clones; each
        equals its slice of the dense weights bit for bit, w_out times G (exact for a power-of-two
        G, one rounding otherwise).
  Law 3 (only the routers are random): still true, but the router's rows are tied in groups of
        G at conversion; the slices' routing gradients differ (their outputs do), so training
        unties them.
  Law 2 is kept: shared experts are whole FFN copies, zero at conversion.

The generic path (ModuleExperts, deep copies of an unrecognised module) has no intermediate
dimension to cut, and a router kind that does not name its output layers (`Router.output_layers`)
cannot be grouped: both are refused for granularity > 1, before the model is changed.

Shape legend: D model dim, I intermediate dim, W = I / G slice width, E experts, C copies, G slices.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeify.architectures.layouts import FFNWeights
from moeify.layers.experts import PackedExperts
from moeify.layers.routers.base import Router
from moeify.surgery.compare import relative_error
from moeify.surgery.errors import ConversionError

_PROBE_TOKENS = 4


def refuse_generic(name: str, granularity: int) -> ConversionError:
    return ConversionError(
        f"{name}: granularity={granularity} cuts the FFN's intermediate dimension into experts, and this module "
        "converts on the generic path (deep copies of a module whose layout moeify did not recognise), which has "
        "no intermediate dimension to cut. Use granularity=1 for it (leave it out with exclude_modules, or "
        "convert it separately)"
    )


def check_weights(name: str, weights: FFNWeights, experts: PackedExperts, granularity: int) -> None:
    """Refuse an FFN that cannot be cut into `granularity` slices that add up to it."""
    size = weights.intermediate_size
    if size % granularity:
        divisors = [g for g in range(2, min(size, 16) + 1) if size % g == 0]
        raise ConversionError(
            f"{name}: granularity={granularity} must divide the FFN's intermediate size {size} (each expert is a "
            f"1/granularity slice of it); granularities that divide it: {divisors or 'none but 1'}"
        )
    if weights.post_act is not None:
        raise ConversionError(
            f"{name}: its gated product goes through {type(weights.post_act).__name__} (a norm over the intermediate "
            f"units), which slices cannot reproduce: convert it with granularity=1"
        )
    if not experts.w_in.is_meta:
        _check_unitwise(name, experts, size, granularity)


@torch.no_grad()
def _check_unitwise(name: str, experts: PackedExperts, size: int, granularity: int) -> None:
    """The activation on the whole intermediate vector must equal the activations of its slices
    side by side: true of GELU / SiLU / ReLU, false of anything that mixes units (a norm) or
    holds one parameter per unit (which a slice's width would not fit)."""
    generator = torch.Generator().manual_seed(0)
    halves = 2 if experts.gated else 1
    h = torch.randn(_PROBE_TOKENS, halves * size, generator=generator)
    h = h.to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    width = size // granularity
    try:
        whole = experts._activation(h)
        parts = [
            experts._activation(
                torch.cat([half[:, j * width : (j + 1) * width] for half in h.chunk(halves, dim=-1)], -1)
            )
            for j in range(granularity)
        ]
        error = relative_error(torch.cat(parts, dim=-1), whole)
    except (RuntimeError, ValueError) as failure:
        error, whole = float("inf"), failure
    if not error <= 1e-6:
        raise ConversionError(
            f"{name}: its activation {type(experts.act).__name__} does not act unit by unit on the intermediate "
            f"vector (on a slice of 1/{granularity} of it: {whole if isinstance(whole, Exception) else f'error {error:.3g}'}), "
            "so slices cannot add up to the FFN: convert it with granularity=1"
        )


@torch.no_grad()
def slice_into(experts: PackedExperts, weights: FFNWeights, granularity: int) -> None:
    """Expert c·G + j = slice j of the dense FFN (w_out × G, b_out whole), for every copy c. The
    dense weights are read once into whole tensors (one FFN of transient memory)."""
    if experts.w_in.is_meta:
        return
    size, copies = weights.intermediate_size, experts.num_experts // granularity
    width = size // granularity

    def by_slice_in(pieces: list) -> Tensor:
        """[rows_in, ...] → [G, rows_in / G, ...], gated rows regrouped as [gate_j; up_j]."""
        whole = torch.cat([piece.value() for piece in pieces])
        halves = whole.chunk(2) if experts.gated else (whole,)
        return torch.cat([half.unflatten(0, (granularity, width)) for half in halves], dim=1)

    def into(packed: Tensor, slices: Tensor) -> None:
        packed.unflatten(0, (copies, granularity)).copy_(slices.unsqueeze(0).expand(copies, *slices.shape))

    into(experts.w_in, by_slice_in(weights.w_in))
    if weights.b_in is not None:
        into(experts.b_in, by_slice_in(weights.b_in))
    w_out_DI = torch.cat([piece.value() for piece in weights.w_out])
    w_out_GDW = w_out_DI.unflatten(1, (granularity, width)).transpose(0, 1)
    into(experts.w_out, w_out_GDW * granularity)
    if weights.b_out is not None:
        b_out_D = torch.cat([piece.value() for piece in weights.b_out])
        experts.b_out.copy_(b_out_D.unsqueeze(0).expand_as(experts.b_out))


def output_layers(name: str, router: Router, granularity: int) -> list[nn.Linear]:
    """The nn.Linear layers whose rows are the router's per-expert logits (summed), by the
    router's `output_layers`; a router that names none is refused."""
    names = getattr(type(router), "output_layers", ())
    layers = [getattr(router, attr, None) for attr in names]
    if not names or not all(isinstance(layer, nn.Linear) for layer in layers):
        raise ConversionError(
            f"{name}: granularity={granularity} ties the router's rows in groups (the slices of one FFN copy start "
            f"with equal logits), and {type(router).__name__} does not name its output layers: set "
            f"`output_layers = ('<attribute>', ...)` on the class (the nn.Linear layers whose output rows are the "
            "experts' logits, summed), or use granularity=1"
        )
    for layer in layers:
        if layer.out_features != router.num_experts:
            raise ConversionError(
                f"{name}: {type(router).__name__}'s output layer has {layer.out_features} rows for "
                f"{router.num_experts} experts; it cannot be grouped"
            )
    return layers


@torch.no_grad()
def tie_router(name: str, router: Router, granularity: int) -> None:
    """Virtual groups: in every output layer, the G rows of a copy's slices become that copy's
    first row (bias included), so the G logits are equal."""
    for layer in output_layers(name, router, granularity):
        for param in (layer.weight, layer.bias):
            if param is not None and not param.is_meta:
                grouped = param.unflatten(0, (-1, granularity))
                grouped.copy_(grouped[:, :1].expand_as(grouped))


def first_copy_inputs(experts: PackedExperts, granularity: int) -> list[Tensor]:
    """The input projection(s) of the FFN copy that the first `granularity` experts cut, joined
    back whole, [1, rows_in, ...] each (what a whole-FFN shared expert's "zero_out" init clones)."""
    joined = []
    for param in experts.input_parameters():
        slices = param.detach()[:granularity]  # [G, rows_in / G, ...]
        halves = slices.chunk(2, dim=1) if experts.gated else (slices,)
        joined.append(torch.cat([half.flatten(0, 1) for half in halves]).unsqueeze(0))
    return joined
