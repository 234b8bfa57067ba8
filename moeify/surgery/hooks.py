"""The hooks moeify puts on a converted model's root module, each filling one shared context
object (not a module, not in any state dict) that the MoE layers read:

- `attach_conditioning`: the conditioning a cross-attention router attends to;
- `attach_token_mask`: the padding masks, so padding is not counted (moeify.layers.tokens);
- `attach_output_loss`: the router losses added to `output.loss` in training mode, so a plain
  `Trainer`, an accelerate loop or TRL's `SFTTrainer` trains the routers with no change.

Hooks are bound methods of the context object: `copy.deepcopy(model)` copies them with the
model, and the copy's hooks fill the copy's context.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from moeify.layers.moe import MoeLayer, require_graph, total_aux_loss
from moeify.layers.routers import ConditioningContext, CrossAttentionRouter
from moeify.layers.tokens import DECODER, ENCODER, TokenMask


def _model_context(model: nn.Module, attr: str, make: Callable[[], Any], *, captures: bool = True) -> Any:
    """The model's context `attr`, made and hooked onto the root's forward on first use: as a
    pre-hook when it `capture`s the forward's arguments, else as a forward hook that `add`s to
    the output."""
    context = getattr(model, attr, None)
    if context is None:
        context = make()
        if captures:
            context.bind(model.forward)
            model.register_forward_pre_hook(context.capture, with_kwargs=True)
        else:
            model.register_forward_hook(context.add, with_kwargs=True)
        setattr(model, attr, context)
    return context


def attach_conditioning(model: nn.Module, layers: list[MoeLayer], arg: str) -> ConditioningContext:
    """One context per model, filled by a pre-hook on the root's forward."""
    context = _model_context(model, "_moeify_conditioning", lambda: ConditioningContext(arg, type(model).__name__))
    for layer in layers:
        if isinstance(layer.router, CrossAttentionRouter):
            layer.router.context = context
    return context


def _encoder(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder's encoder (its layers use `attention_mask`, the decoder's
    `decoder_attention_mask`), or None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


def attach_token_mask(model: nn.Module, layers: list[MoeLayer]) -> TokenMask:
    """One padding-mask context per model, filled by a pre-hook on the root's forward."""
    context = _model_context(model, "_moeify_tokens", TokenMask)
    encoder = _encoder(model)
    in_encoder = {id(module) for module in encoder.modules()} if encoder is not None else None
    for layer in layers:
        layer.token_mask = context
        layer.mask_source = ENCODER if in_encoder is None or id(layer) in in_encoder else DECODER
    return context


class OutputLoss:
    """Adds the router losses to the loss a model's forward returns, as transformers' own MoE
    models do with `output_router_logits=True` (there off by default, which silently leaves their
    routers unbalanced: transformers#44242). Here on by default (`MoeifyConfig.aux_loss_in_output`):

    - training mode, `output.loss` a tensor: `output.loss += aux_loss`, and `output.aux_loss` holds
      the router losses (taken, as `moeify.aux_loss(model)` would take them). Under `Trainer`'s
      gradient accumulation (`num_items_in_batch` passed to the forward) each micro-batch adds
      them weighted by its share of the step's labelled tokens, as its task loss is;
    - eval mode: `output.aux_loss` is set, `output.loss` stays the task loss (perplexity stays true);
      under torch.no_grad with no monitor attached the layers compute no router losses
      (`MoeLayer.infers`), and nothing is set;
    - a forward with no `loss` (no labels, a diffusers model, `return_dict=False`): nothing changes,
      and `moeify.aux_loss(model)` still collects the losses for the caller's own loss.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def add(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        loss = getattr(output, "loss", None)
        if not self.enabled or not isinstance(loss, Tensor):
            return
        layers = [m for m in module.modules() if isinstance(m, MoeLayer)]
        aux = total_aux_loss(layers)
        if aux is None:
            return
        if module.training:
            require_graph(layers, aux)
            output.loss = loss + (aux * accumulation_share(kwargs.get("labels"), kwargs.get("num_items_in_batch"))).to(
                device=loss.device, dtype=loss.dtype
            )
            for layer in layers:
                layer.loss_taken_by_output = True
            if torch.is_grad_enabled() and type(output).__name__ == "FusedCausalLMOutput":
                _warn_fused()  # (TRL's metrics forward, under no_grad, is not the one that trains)
        if isinstance(output, MutableMapping):  # a ModelOutput keeps keys and attributes in step
            output["aux_loss"] = aux
        else:
            output.aux_loss = aux


def accumulation_share(labels: object, num_items_in_batch: object) -> Tensor | float:
    """This micro-batch's share of the accumulated step's labelled tokens, when `Trainer` passes
    `num_items_in_batch`: its task loss is then a sum over this micro-batch's tokens divided by the
    step's total (not a per-micro-batch mean, and `Trainer` no longer divides by the accumulation
    steps), so the router losses get the same weighting. Without it: 1."""
    if num_items_in_batch is None or not isinstance(labels, Tensor):
        return 1.0
    mine = (labels != -100).sum()
    total = num_items_in_batch.to(mine.device) if isinstance(num_items_in_batch, Tensor) else num_items_in_batch
    return mine / total  # a tensor: no host read


_warned_fused = False


def _warn_fused() -> None:
    global _warned_fused
    if not _warned_fused:
        _warned_fused = True
        warnings.warn(
            "moeify: TRL's SFTTrainer computes its loss from the fused log-probabilities and ignores output.loss, "
            "so the router losses moeify added there do not train the routers. Pass "
            "compute_loss_func=moeify.integrations.trl.sft_loss(model) to SFTTrainer",
            stacklevel=3,
        )


def attach_output_loss(model: nn.Module, enabled: bool) -> OutputLoss:
    """One forward hook per model; a later conversion's setting replaces the earlier one's."""
    context = _model_context(model, "_moeify_output_loss", lambda: OutputLoss(enabled), captures=False)
    context.enabled = enabled
    return context
