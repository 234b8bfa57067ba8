"""TRL glue: the router losses in `SFTTrainer`'s loss.

TRL's `SFTTrainer` (trl >= 1.x) replaces the model's forward by a fused LM head and builds its loss
from the per-token log-probabilities, so the router losses moeify adds to `output.loss` never reach
it (TRL adds an aux loss only for transformers' own MoE classes, from their router logits). One
argument puts them back, without a subclass:

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         compute_loss_func=moeify.integrations.trl.sft_loss(model))

With `compute_loss_func`, TRL runs the model once for the loss (full logits) and once more under
no_grad for its metrics (entropy, token accuracy).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from moeify.convert import aux_loss
from moeify.layers.inventory import moe_layers
from moeify.surgery.hooks import accumulation_share


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under peft's and torch's wrappers: what owns `loss_function`."""
    for module in model.modules():
        if hasattr(module, "loss_function"):
            return module
    raise TypeError(f"sft_loss needs a transformers causal LM (with a loss_function), got {type(model).__name__}")


def sft_loss(model: nn.Module) -> Callable[..., Tensor]:
    """A `compute_loss_func` for TRL's `SFTTrainer`: the model's own causal-LM loss (transformers'
    `loss_function`, `num_items_in_batch` respected) plus the router losses of that forward,
    weighted by the micro-batch's share of the step's labelled tokens under gradient accumulation,
    as the task loss is."""
    if not isinstance(model, nn.Module) or not moe_layers(model):
        raise ValueError(f"sft_loss needs a model converted by moeify, got {type(model).__name__}")
    owner = _causal_lm(model)

    def loss(outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
        task = owner.loss_function(
            logits=outputs.logits,
            labels=labels,
            vocab_size=owner.config.get_text_config().vocab_size,
            num_items_in_batch=num_items_in_batch,
        )
        return task + aux_loss(model).to(task.device) * accumulation_share(labels, num_items_in_batch)

    return loss


__all__ = ["sft_loss"]
