"""`moeify(model)`: find → plan → apply → verify (moeify.surgery), then the shared experts'
training init. Apply builds each MoE layer and swaps it in; verify checks each built layer against
its dense FFN before the swap and the whole model on example_inputs after it. The only public
function that mutates a model; a failed conversion leaves it exactly as it was."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from moeify.config import MoeifyConfig, recipe
from moeify.layers.inventory import model_class, moe_layers, parameter_counts, require_moe_layers, unwrap
from moeify.layers.moe import MoeLayer, require_graph, total_aux_loss
from moeify.layers.routers import ConditioningContext
from moeify.recipes import reinit, router_init, sources
from moeify.surgery import apply, hooks, verify
from moeify.surgery.find import FFNSite
from moeify.surgery.plan import ConversionError, ConversionPlan, plan_conversion


def _layer_dtype_device(model: nn.Module, site: FFNSite) -> tuple[torch.dtype, torch.device]:
    param = next(model.get_submodule(site.name).parameters())
    return param.dtype, param.device


def _build_and_check(
    model: nn.Module,
    plan: ConversionPlan,
    picked: sources.Sources | None = None,
    deviation: dict | None = None,
    router_rows: dict[str, Tensor] | None = None,
) -> tuple[list[MoeLayer], list[nn.Parameter]]:
    """Build and check every layer, one at a time; each checked dense FFN then shares expert 0's
    storage, so peak memory is the final size plus one FFN. On failure the sharing is undone.
    Recipes that depart from the dense FFN (`picked` sources, reinit_fraction) change the experts
    first; their layers are measured into `deviation["layers"]` instead of checked."""
    config = plan.config
    layers: list[MoeLayer] = []
    shared_params: list[nn.Parameter] = []
    # A throwaway context for the check; the model's own is attached after the swap.
    context = ConditioningContext(plan.conditioning.arg, type(model).__name__) if plan.conditioning else None
    try:
        for index, site in enumerate(plan.sites):
            layer, weights = apply.build_layer(model, site, index, plan)
            if router_rows is not None:  # router_init from data, set before the identity check
                router_init.set_rows(layer.router, router_rows[site.name])
            if picked is not None:
                picked.take_experts(layer, site.name)
            if config.reinit_fraction:
                reinit.reinit_experts(layer.experts, config.reinit_fraction, reinit.layer_seed(config.seed, index))
            if context is not None:
                layer.router.context = context
            if config.verify:
                error = _check(model, site, index, layer, plan, context)
                if deviation is not None:
                    deviation["layers"][site.name] = error
            if weights is not None:
                shared_params += apply.share_storage(layer.experts, weights, config)
            layers.append(layer)
    except BaseException:
        apply.unshare(shared_params)
        raise
    return layers, shared_params


def _check(
    model: nn.Module,
    site: FFNSite,
    index: int,
    layer: MoeLayer,
    plan: ConversionPlan,
    context: ConditioningContext | None,
) -> float:
    dense = model.get_submodule(site.name)
    dtype, device = _layer_dtype_device(model, site)
    return verify.check_layer(
        site.name,
        site.layout.chain(dense) if site.layout else [dense],
        layer,
        in_features=site.in_features or apply.generic_hidden_size(dense),
        dtype=dtype,
        device=device,
        # A recipe that departs from the dense FFN by design is measured, not checked.
        tolerance=plan.config.verify_tolerance if plan.config.preserves_function else None,
        seed=plan.config.seed + index,
        conditioning=(context, plan.conditioning.dim) if context is not None else None,
    )


def _check_converted(
    model: nn.Module,
    example_inputs: Any,
    dense_outputs: list[Tensor],
    config: MoeifyConfig,
    picked: sources.Sources | None,
    deviation: dict | None,
) -> None:
    """The converted model on example_inputs: checked against the dense one, or measured."""
    try:
        converted = verify.run_model(model, example_inputs)
    except Exception as error:
        raise ConversionError(
            f"the converted {type(model).__name__} fails on example_inputs ({type(error).__name__}: {error}); "
            "its code may read something of a module moeify replaced. The model was left unchanged: leave "
            "that FFN out with exclude_modules (find_ffns(model) lists the sites)"
        ) from error
    if deviation is None:
        dtype = next(model.parameters()).dtype
        verify.check_model(dense_outputs, converted, config.verify_tolerance, dtype)
        return
    deviation["model"] = verify.model_deviation(dense_outputs, converted)
    if picked is not None:
        deviation["sources"] = picked.deviation(converted)


def moeify(
    model: nn.Module,
    config: MoeifyConfig | None = None,
    *,
    example_inputs: Any = None,
    calibration_inputs: Any = None,
    experts_from: list[nn.Module] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Convert every FFN of `model` into router + routed experts + shared experts, in place.

    Args:
        model: a transformers `PreTrainedModel`, a diffusers `ModelMixin`, or any nn.Module (give
            `target_modules` when its FFNs are not recognised).
        config: the recipe (`MoeifyConfig`); keyword `overrides` change single fields.
        example_inputs: optional inputs (dict of kwargs, tuple of args, or one tensor) on which the
            whole converted model must reproduce the dense model's outputs. Blocks that cannot run
            alone (they need a timestep embedding, rotary embeddings) are traced for FFNs on the
            inputs they receive in a forward of them.
        calibration_inputs: what `router_init` other than "random" reads (moeify.recipes.router_init):
            for "kmeans" a batch (as example_inputs) or a list of batches, whose FFN inputs are
            clustered into the router rows; for "prompts" a list with one entry per routed expert
            (per copy of the FFN when granularity > 1), each one batch or a list of batches of
            that expert's prompts. The dense model runs on them before anything changes.
        experts_from: models of `model`'s architecture (Branch-Train-MiX): routed expert i of
            every FFN is model i % n's FFN, bit for bit (moeify.recipes.sources); their names go
            into `config.experts_from`. Such recipes (and `reinit_fraction`) depart from the dense
            model by design: the deviation is measured and kept in `model.moeify_state.deviation`
            (per layer; on example_inputs, the whole model and each source) instead of checked.

    Returns the same `model` object. Raises `ConversionError` (a ValueError) with what was wrong
    and what to do; the model is then untouched.
    """
    source_models, overrides = sources.split_keyword(experts_from, overrides)
    config = recipe(config, overrides, "moeify")
    router_init.check(config, calibration_inputs)
    sources.check_given(config, source_models)
    started = time.perf_counter()
    plan = plan_conversion(model, config, example_inputs)
    reinit.check_sites(plan)
    picked = sources.prepare(model, plan, source_models) if source_models is not None else None
    calibrated = router_init.compute(model, plan, calibration_inputs)
    deviation = None if config.preserves_function else {"layers": {}, "model": None}
    rows = calibrated.rows() if calibrated is not None else None
    layers, shared_params = _build_and_check(model, plan, picked, deviation, rows)
    try:
        try:
            dense_outputs = verify.run_model(model, example_inputs) if example_inputs is not None else None
        except Exception as error:
            raise ConversionError(
                f"example_inputs do not run the dense {type(model).__name__} ({type(error).__name__}: {error}); pass "
                "what model(**example_inputs) (a dict), model(*example_inputs) (a tuple) or model(example_inputs) "
                "accepts. The model was left unchanged"
            ) from error
        if picked is not None and dense_outputs is not None:
            picked.run(model, example_inputs, dense_outputs)
    except BaseException:
        apply.unshare(shared_params)
        raise
    swaps = [swap for site, layer in zip(plan.sites, layers) for swap in apply.install(model, site, layer)]
    if plan.conditioning is not None:
        hooks.attach_conditioning(model, layers, plan.conditioning.arg)
    hooks.attach_token_mask(model, layers)
    try:
        if picked is not None and config.experts_from_rest == "average":
            picked.average_rest()
        if dense_outputs is not None:
            _check_converted(model, example_inputs, dense_outputs, config, picked, deviation)
    except BaseException:
        if picked is not None:
            picked.undo()
        apply.undo(swaps)  # the conditioning hook (if new) stays: it only records an argument
        apply.unshare(shared_params)
        raise
    for index, layer in enumerate(layers):
        apply.init_shared_for_training(layer, config, index)
    hooks.attach_output_loss(model, config.aux_loss_in_output)
    state = getattr(model, "moeify_state", None) or MoeifyState()
    state.conversions.append(config)
    state.captured.update(plan.report.captured)
    state.report = plan.report
    state.seconds = time.perf_counter() - started
    state.router_init = calibrated.summary() if calibrated is not None else None
    if deviation is not None:
        state.deviation = deviation
    if state.routing is not None:  # a second conversion: the routing control sees its layers too
        state.routing.layers = moe_layers(model)
    model.moeify_state = state
    return model


class MoeifyState:
    """What moeify recorded on a converted model: the recipes applied, in order, and the last report."""

    def __init__(self) -> None:
        self.conversions: list[MoeifyConfig] = []
        self.report = None
        self.seconds = 0.0
        # FFNs found by tracing blocks on example inputs, by site name: a checkpoint records them,
        # since rebuilding the model for loading has no inputs to trace on (moeify.surgery.record).
        self.captured: dict = {}
        # The routing settings over training (moeify.control.RoutingControl), once set_routing made it.
        self.routing = None
        # The last conversion that departs from the dense model by design (not preserves_function):
        # max |moe - dense| / dense scale per layer ("layers", on the identity check's random tokens;
        # measured when verify=True), of the whole model on example_inputs ("model", else None) and,
        # with experts_from, from each source ("sources"); all at conversion, before the shared
        # experts' training init (as the identity check).
        self.deviation: dict | None = None
        # router_init from data: tokens, row scale (and k-means steps) per layer of the last conversion.
        self.router_init: dict | None = None

    @property
    def config(self) -> MoeifyConfig:
        return self.conversions[-1]


def aux_loss(model: nn.Module) -> Tensor:
    """The router losses (balance, z-loss, entropy; weighted) of every MoE layer, ready to add to
    the task loss: `loss = task_loss + moeify.aux_loss(model)`.

    What it covers: each layer collects the losses of every forward since they were last taken,
    and this returns, summed over layers, each layer's mean over those forwards — two forwards
    before one backward (classifier-free guidance, DPO's chosen and rejected, distillation) both
    count. Taking them ends the collection: the next forward starts a new one (calling this again
    before it returns the same value). A forward in another mode (autograd on/off, train/eval)
    also starts a new one, so an evaluation pass between training steps does not leak in. With
    gradient accumulation, take it after each micro-batch's forward, as its task loss.

    A transformers model whose forward returns a `loss` already has these added to it in training
    mode (`MoeifyConfig.aux_loss_in_output`); add this only to losses computed outside the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aux_loss reads a model converted by moeify (an nn.Module), got {type(model).__name__}")
    layers = [layer for _, layer in require_moe_layers(model)]
    counted_twice = torch.is_grad_enabled() and any(layer.loss_taken_by_output for layer in layers)
    total = total_aux_loss(layers)
    if total is None:
        raise ValueError(
            "aux_loss(model) reads the router losses of the forwards since it was last taken: run a forward first"
        )
    if counted_twice and model.training:
        warnings.warn(
            "moeify.aux_loss(model): the model's output.loss already includes these router losses "
            "(MoeifyConfig.aux_loss_in_output=True); adding them again counts them twice. Use output.loss as is, "
            "or convert with aux_loss_in_output=False",
            stacklevel=2,
        )
    require_graph(layers, total)
    return total


def token_mask(model: nn.Module, keep: Tensor | None) -> None:
    """Say which tokens are real for models whose forward takes no `attention_mask` (transformers
    text models are covered without this: their mask is captured from the forward). `keep` is
    shaped like the tokens' leading dims ([batch, tokens]; bool, 0/1 or an additive bias); padding
    still gets an output, but is left out of `tokens_per_expert`, the router losses and every
    monitor. It applies to every following forward, until replaced; None goes back to the
    captured mask. Layers whose tokens are laid out differently count every token."""
    if not isinstance(model, nn.Module) or not moe_layers(model):
        raise ValueError(f"token_mask needs a model converted by moeify, got {type(model).__name__}")
    hooks.attach_token_mask(model, [layer for _, layer in moe_layers(model)]).set(keep)


__all__ = [
    "ConversionError",
    "MoeifyState",
    "aux_loss",
    "model_class",
    "moe_layers",
    "moeify",
    "parameter_counts",
    "token_mask",
    "unwrap",
]
