"""Which tokens count: the padding mask of the current forward, shared by every MoE layer of a model.

Padding tokens still go through the experts (the model expects an output for them), but they must
not be counted in `tokens_per_expert`, the router losses or any monitor: a batch padded to 56 tokens
would otherwise balance the experts on padding (transformers' own `load_balancing_loss_func` takes
the attention mask for the same reason).

The mask is captured from the root model's own forward (`attention_mask`, and for an
encoder-decoder's decoder `decoder_attention_mask`) by a pre-hook, so the user passes nothing
extra; `moeify.token_mask(model, keep_BT)` sets one explicitly for models without such an argument.
A layer uses the mask only when its tokens are laid out as the mask is ([B, S] leading dims):
layers on another token grid (a vision tower, a decoding step with a KV cache) count every token.

Shape legend: B batch, S tokens per sample, T = B*S tokens.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

ENCODER = "attention_mask"
DECODER = "decoder_attention_mask"


def keep_mask(mask: Tensor) -> Tensor:
    """A mask in any of the usual formats as a bool "this token is real", on its device, without
    reading a value back to the host: bool, 0/1 (keep = 1), or an additive bias (0 keeps, a large
    negative number drops). A [B, 1, L] mask becomes [B, L]."""
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return mask
    mask = mask.float()
    # An additive bias has negative entries; a 0/1 mask has none. Decided on the device
    # (torch.where over a 0-dim tensor): `if (mask < 0).any()` would wait for it.
    return torch.where((mask < 0).any(), mask > -1.0, mask > 0.5)


class TokenMask:
    """The padding masks of the current forward of one model, read by each of its MoE layers.

    Not a module and not in any state dict: masks are per forward. They are kept after the forward
    (not cleared) because gradient checkpointing re-runs the blocks during backward, and the
    re-run must compute exactly what the forward did."""

    def __init__(self) -> None:
        self.captured: dict[str, Tensor | None] = {ENCODER: None, DECODER: None}
        self.explicit: Tensor | None = None
        self._positions: dict[str, int] = {}

    def bind(self, forward) -> None:  # any callable
        """Learn where the masks sit among the forward's positional parameters."""
        try:
            parameters = inspect.signature(forward).parameters.values()
        except (TypeError, ValueError):  # a builtin or C forward: keywords only
            return
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._positions = {name: names.index(name) for name in self.captured if name in names}

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with_kwargs=True) on the root model."""
        for name in self.captured:
            value = kwargs.get(name)
            position = self._positions.get(name)
            if value is None and position is not None and position < len(args):
                value = args[position]
            self.captured[name] = keep_mask(value) if isinstance(value, Tensor) and value.dim() >= 2 else None

    def set(self, keep_BS: Tensor | None) -> None:
        if keep_BS is not None:
            if not isinstance(keep_BS, Tensor) or keep_BS.dim() < 1:
                raise TypeError(
                    f"token_mask takes a tensor shaped like the tokens' leading dims ([batch, tokens]), 1/True "
                    f"for real tokens, or None; got {type(keep_BS).__name__}"
                )
            keep_BS = keep_mask(keep_BS)
        self.explicit = keep_BS

    def keep_T(self, source: str, batch_shape: torch.Size) -> Tensor | None:
        """The flat [T] bool mask for a layer whose tokens have leading dims `batch_shape`, or None
        (count every token) when there is no mask or it is laid out differently."""
        mask = self.explicit if self.explicit is not None else self.captured.get(source)
        if mask is None or tuple(mask.shape) != tuple(batch_shape):
            return None
        return mask.reshape(-1)
