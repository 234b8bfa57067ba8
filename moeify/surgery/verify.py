"""The identity check (Law 2 is checked, not assumed): the converted layer must reproduce the dense
FFN, and optionally the converted model the dense model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moeify.layers.experts import ModuleExperts
from moeify.layers.moe import MoeLayer
from moeify.layers.routers import ConditioningContext
from moeify.surgery.compare import relative_error, tolerance_for
from moeify.surgery.plan import ConversionError
from moeify.surgery.trace import call, eval_mode

_TOKENS = (2, 8)  # batch, tokens per sample: enough to hit every expert of a random router


@torch.no_grad()
def check_layer(
    name: str,
    dense_chain: list[nn.Module],
    layer: MoeLayer,
    *,
    in_features: int,
    dtype: torch.dtype,
    device: torch.device,
    tolerance: float | None,
    seed: int,
    conditioning: tuple[ConditioningContext, int] | None,
) -> float:
    """Random tokens through the dense FFN and the MoE layer; raises ConversionError on mismatch.
    Returns max |moe - dense| / dense scale; `tolerance=None` only measures it (a recipe that
    departs from the dense FFN by design: `MoeifyConfig.preserves_function`)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*_TOKENS, in_features, generator=generator).to(device=device, dtype=dtype)
    saved = None
    if conditioning is not None:
        context, dim = conditioning
        saved = context.value
        context.value = torch.randn(_TOKENS[0], 4, dim, generator=generator).to(device=device, dtype=dtype)
    try:
        with eval_mode(layer, *dense_chain):
            ref = x
            for module in dense_chain:
                ref = module(ref)
            out = layer(x)
    except ConversionError:
        raise
    except Exception as error:  # the dense module or its clone failed on a plain token batch
        raise ConversionError(
            f"{name}: the identity check could not run the FFN on tokens shaped {tuple(x.shape)} "
            f"({type(error).__name__}: {error}). If this module is not a token-wise FFN, leave it out "
            "with exclude_modules."
        ) from error
    finally:
        if conditioning is not None:
            conditioning[0].value = saved
        layer.clear_losses()
        layer.tokens_per_expert.zero_()
    if out.shape != ref.shape:
        raise ConversionError(f"{name}: the MoE layer returns {tuple(out.shape)}, the dense FFN {tuple(ref.shape)}")
    error = relative_error(out, ref)
    if tolerance is None:
        return error
    allowed = tolerance_for(dtype, tolerance)
    if not error <= allowed:
        _check_zeroed_shared(name, layer, x)
        raise ConversionError(
            f"{name}: the converted layer does not reproduce the dense FFN: max |moe - dense| is {error:.3g} of "
            f"the output scale (allowed {allowed:.1g}). Its layout was read wrongly; report this with the "
            "module's class, or leave it out with exclude_modules."
        )
    return error


def _check_zeroed_shared(name: str, layer: MoeLayer, x: Tensor) -> None:
    """Generic shared experts start as copies of the module with every parameter zero (Law 2); a
    module with a residual or a constant inside still outputs something then. Say so, rather than
    blame a layout the generic path does not have."""
    if not isinstance(layer.shared_experts, ModuleExperts):
        return
    with eval_mode(layer):
        leak = float(layer.shared_experts.forward_all(x).detach().abs().max())
    if leak > 0:
        raise ConversionError(
            f"{name}: its shared experts start as copies of the module with every parameter zero, but such a "
            f"copy still outputs up to {leak:.3g} (a residual or a constant inside the module?), so the "
            "converted layer cannot start equal to the dense one. Pass num_shared_experts=0."
        )


def _outputs(result: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (ModelOutput, tuple, dict or tensor)."""
    if isinstance(result, Tensor):
        return [result] if result.is_floating_point() else []
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _outputs(item)]
    return []


@torch.no_grad()
def run_model(model: nn.Module, example_inputs: Any, seed: int = 0) -> list[Tensor]:
    """The model's floating outputs on the inputs, in eval mode, with the CPU and CUDA RNGs seeded
    (and the caller's restored): a forward that draws random numbers (ViT-MAE's masking noise)
    draws the same ones for the dense and the converted model."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # The router losses a converted model puts on its output are not outputs to compare.
    output_loss = getattr(model, "_moeify_output_loss", None)
    enabled = output_loss is not None and output_loss.enabled
    if enabled:
        output_loss.enabled = False
    try:
        with eval_mode(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            result = call(model, example_inputs)
    finally:
        if enabled:
            output_loss.enabled = True
    # Routing counts of the check are not training statistics.
    for module in model.modules():
        if isinstance(module, MoeLayer):
            module.tokens_per_expert.zero_()
            module.clear_losses()
    return _outputs(result)


def model_deviation(reference: list[Tensor], converted: list[Tensor]) -> float:
    """max |converted - reference| / reference scale over the outputs (what `check_model` bounds)."""
    if len(reference) != len(converted):
        raise ConversionError(
            "the converted model returns a different number of outputs than the model it is compared with"
        )
    return max((relative_error(c, r) for c, r in zip(converted, reference)), default=0.0)


def check_model(dense: list[Tensor], converted: list[Tensor], tolerance: float, dtype: torch.dtype) -> float:
    if len(dense) != len(converted):
        raise ConversionError("the converted model returns a different number of outputs than the dense model")
    worst = max((relative_error(c, d) for c, d in zip(converted, dense)), default=0.0)
    allowed = tolerance_for(dtype, tolerance) * 10  # errors of many layers add up
    if not worst <= allowed:
        raise ConversionError(
            f"the converted model does not reproduce the dense model on example_inputs: max relative "
            f"difference {worst:.3g} (allowed {allowed:.1g}); the model was left unchanged"
        )
    return worst
