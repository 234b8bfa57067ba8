"""Build the MoE layer of each planned site by the three laws, and swap instances in.

Law 1: routed experts are exact clones of the dense FFN (copied into a preallocated [E, ...]
tensor: faster than deepcopy and no transient extra copy). Law 2: shared experts start at zero;
they take their training init only after the identity check (`init_shared_for_training`).
Law 3: only the routers start random (seeded per site, on CPU, so the result does not depend on
the device or on the caller's RNG state). Fine-grained experts (granularity > 1) are slices of
the FFN with router rows tied in groups: where they depart from Laws 1 and 3 is said in
moeify.recipes.granularity.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from moeify.architectures import read_weights
from moeify.architectures.layouts import FFNWeights, Piece, get, join, projection
from moeify.config import MoeifyConfig
from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.moe import MoeLayer
from moeify.layers.routers import RouterSpec, build_router
from moeify.layers.wiring import AddResidual, ChannelsFirst, Handoff, SplitEntry, SplitExit
from moeify.recipes import granularity
from moeify.surgery.find import FFNSite
from moeify.surgery.plan import ConversionPlan


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the CPU RNG for a block and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _packed(weights: FFNWeights, num_experts: int, intermediate_size: int | None = None) -> PackedExperts:
    experts = PackedExperts(
        num_experts,
        weights.in_features,
        intermediate_size or weights.intermediate_size,
        weights.out_features,
        gated=weights.gated,
        # Its own copy: routed and shared experts must not share an activation with parameters
        # (xIELU's alpha), which Law 2 zeroes in the shared ones.
        act=copy.deepcopy(weights.act),
        up_act=copy.deepcopy(weights.up_act),
        post_act=copy.deepcopy(weights.post_act),
        bias_in=weights.b_in is not None,
        bias_out=weights.b_out is not None,
        mid_dropout=weights.mid_dropout,
        out_dropout=weights.out_dropout,
        in_dtype=weights.in_dtype,
        out_dtype=weights.out_dtype,
        device=weights.device,
    )
    return experts


def packed_pairs(experts: PackedExperts, weights: FFNWeights) -> list[tuple[torch.Tensor, list[Piece]]]:
    """Each packed expert parameter with the dense FFN pieces it is filled from."""
    pairs = [(experts.w_in, weights.w_in), (experts.w_out, weights.w_out)]
    if weights.b_in is not None:
        pairs.append((experts.b_in, weights.b_in))
    if weights.b_out is not None:
        pairs.append((experts.b_out, weights.b_out))
    return pairs


@torch.no_grad()
def _clone_into(experts: PackedExperts, weights: FFNWeights) -> None:
    """Law 1: every expert slice equals the dense weights bit for bit. Each piece is copied
    straight into its rows of the preallocated [E, ...] tensor (no concatenated temporary)."""
    if experts.w_in.is_meta:
        return
    for packed, pieces in packed_pairs(experts, weights):
        offset = 0
        for piece in pieces:
            value = piece.value()
            rows = value.shape[0]
            packed[:, offset : offset + rows].copy_(value.unsqueeze(0).expand(packed.shape[0], *value.shape))
            offset += rows


@torch.no_grad()
def share_storage(experts: PackedExperts, weights: FFNWeights, config: MoeifyConfig) -> list[nn.Parameter]:
    """After the identity check: point the dense FFN's parameters at expert 0's rows (the same
    values, bit for bit), so the dense copy costs no memory while conversion goes on: peak memory
    stays at the final size plus one FFN. Returns the re-pointed parameters (for `unshare`).
    Only for clones: where expert 0 is not the dense FFN (slices, other sources, re-initialised
    neurons) the dense model a failed conversion hands back must keep its own values."""
    shared: list[nn.Parameter] = []
    clones = config.granularity == 1 and config.experts_from is None and config.reinit_fraction == 0
    if experts.w_in.is_meta or not clones:
        return shared
    for packed, pieces in packed_pairs(experts, weights):
        offset = 0
        for piece in pieces:
            rows = piece.value().shape[0]
            # A half of a fused [up; gate] projection maps to non-adjacent rows, a grouped 1x1
            # convolution to a block-diagonal expansion: leave those alone.
            if piece.half is None and piece.groups == 1 and isinstance(piece.param, nn.Parameter):
                view = packed[0, offset : offset + rows]
                # Conv1D's [in, out] is the transpose; a 1x1 convolution's [out, in, 1, ...] a view.
                piece.param.data = view.t() if piece.transposed else view.view(piece.param.shape)
                shared.append(piece.param)
            offset += rows
    return shared


@torch.no_grad()
def unshare(params: list[nn.Parameter]) -> None:
    """Undo `share_storage` (a failed conversion): give each dense parameter its own storage again."""
    for param in params:
        param.data = param.data.clone()


def _dense_module(model: nn.Module, site: FFNSite) -> nn.Module:
    return model.get_submodule(site.name)


def build_layer(
    model: nn.Module, site: FFNSite, index: int, plan: ConversionPlan
) -> tuple[MoeLayer, FFNWeights | None]:
    """The MoE layer for one site, not yet installed, and the dense weights it was read from
    (None on the generic path)."""
    config = plan.config
    module = _dense_module(model, site)
    weights = None
    if site.layout is not None:
        weights = read_weights(module, site.layout)
        experts = _packed(weights, config.num_experts, weights.intermediate_size // config.granularity)
        if config.granularity > 1:  # slices of the FFN, not clones (moeify.recipes.granularity)
            granularity.check_weights(site.name, weights, experts, config.granularity)
            granularity.slice_into(experts, weights, config.granularity)
        else:
            _clone_into(experts, weights)
        shared = None
        if config.num_shared_experts:
            shared = _packed(weights, config.num_shared_experts)
            if not shared.w_in.is_meta:
                with torch.no_grad():
                    for p in shared.parameters():
                        p.zero_()  # Law 2
        hidden, device = weights.in_features, weights.device
    else:
        if config.granularity > 1:
            raise granularity.refuse_generic(site.name, config.granularity)
        experts = ModuleExperts(module, config.num_experts)
        shared = ModuleExperts(module, config.num_shared_experts) if config.num_shared_experts else None
        if shared is not None:
            with torch.no_grad():
                for p in shared.parameters():
                    p.zero_()  # Law 2
        first = next(module.parameters())
        hidden, device = generic_hidden_size(module), first.device
    spec = RouterSpec(
        hidden_size=hidden,
        num_experts=config.num_experts,
        router_hidden_size=plan.router_hidden_size[site.name],
        num_heads=config.router_num_heads,
        init_std=config.router_init_std,
        conditioning_dim=plan.conditioning.dim if plan.conditioning else None,
    )
    with seeded(config.seed * 1_000_003 + index):
        router = build_router(config.router, spec)  # Law 3, built on CPU
    if config.granularity > 1:  # virtual groups: a copy's slices start with equal logits
        granularity.tie_router(site.name, router, config.granularity)
    router = router.to("meta" if device.type == "meta" else device)
    layer = MoeLayer(
        router=router,
        experts=experts,
        shared_experts=shared,
        top_k=config.top_k,
        temperature=config.router_temperature,
        balance_loss_weight=config.balance_loss_weight,
        z_loss_weight=config.z_loss_weight,
        entropy_loss_weight=config.entropy_loss_weight,
        router_score=config.router_score,
        balance_bias_rate=config.balance_bias_rate,
        calls_per_forward=site.calls,
        normalize_topk=config.normalize_topk,
        granularity=config.granularity,
    )
    return layer, weights


def generic_hidden_size(module: nn.Module) -> int:
    """The input width of an FFN with no known layout: its first nn.Linear's, else its first parameter's last dim."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[0].in_features
    return next(module.parameters()).shape[-1]


@torch.no_grad()
def init_shared_for_training(layer: MoeLayer, config: MoeifyConfig, index: int) -> None:
    """After the identity check: give the zero shared experts their training init."""
    shared = layer.shared_experts
    if shared is None or next(shared.parameters()).is_meta:
        return
    if config.shared_expert_init == "noise":
        # Weights only: noise on an output bias would shift the output by O(std) directly; noisy
        # weights on both projections move it by O(std^2).
        with seeded(config.seed * 1_000_003 + index + 500_009):
            for p in shared.matrices():
                p.copy_(torch.randn(p.shape, dtype=torch.float32).mul_(config.shared_noise_std))
        return
    # "zero_out": input projections cloned from routed expert 0, output projection left at zero.
    routed_in = layer.experts.input_parameters()
    shared_in = shared.input_parameters()
    if isinstance(shared, PackedExperts):
        # Fine-grained routed experts are slices: the first copy's, joined back into the whole FFN.
        routed_in = granularity.first_copy_inputs(layer.experts, layer.granularity)
        for dst, src in zip(shared_in, routed_in):
            dst.copy_(src[:1].expand_as(dst))
    else:
        per_expert = len(routed_in) // layer.experts.num_experts
        for s in range(shared.num_experts):
            for dst, src in zip(shared_in[s * per_expert : (s + 1) * per_expert], routed_in[:per_expert]):
                dst.copy_(src)


@dataclass
class Swap:
    """One replaced attribute, kept so that a failed whole-model check can be undone."""

    parent: nn.Module
    attr: str
    old: nn.Module
    new: nn.Module


def _set(model: nn.Module, path: str, new: nn.Module) -> list[Swap]:
    """Put `new` where `path` is, and wherever else the model holds the same module object (one
    module registered under two names stays one module)."""
    old = get(model, path)
    # A new module is in training mode; it takes the mode of the one it replaces (an eval model
    # stays in eval, its experts' dropouts off).
    new.train(old.training)
    holders = [
        (parent, attr)
        for _, parent in model.named_modules(remove_duplicate=False)
        for attr, child in parent._modules.items()
        if child is old
    ]
    swaps = []
    for parent, attr in dict.fromkeys(holders):
        setattr(parent, attr, new)
        swaps.append(Swap(parent, attr, old, new))
    return swaps


def _width_out(module: nn.Module) -> int:
    weight, _ = projection(module)
    return weight.value().shape[0]


def install(model: nn.Module, site: FFNSite, layer: MoeLayer) -> list[Swap]:
    """Swap instances (never classes): the MoE layer at `install_path` (wrapped when the FFN adds
    a residual itself, or is split over its block's forward), nn.Identity for the rest of a
    chained FFN."""
    layout = site.layout
    if layout is None:
        return _set(model, site.install_path, layer)
    if layout.split:
        handoff = Handoff()
        swaps = []
        for path in layout.entries:
            full = join(site.name, path)
            swaps += _set(model, full, SplitEntry(handoff, _width_out(get(model, full)), layout.channels_first))
        return swaps + _set(model, site.install_path, SplitExit(layer, handoff, layout.channels_first))
    if layout.residual is not None:
        position, name = layout.residual
        swaps = _set(model, site.install_path, AddResidual(layer, position=position, name=name))
    elif layout.channels_first:
        swaps = _set(model, site.install_path, ChannelsFirst(layer))
    else:
        swaps = _set(model, site.install_path, layer)
    for path in layout.identities:
        swaps += _set(model, join(site.name, path), nn.Identity())
    return swaps


def undo(swaps: list[Swap]) -> None:
    for swap in reversed(swaps):
        setattr(swap.parent, swap.attr, swap.old)
