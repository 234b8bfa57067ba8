"""The cross-attention router: each token attends to the model's conditioning (e.g. the text
tokens `encoder_hidden_states` of a diffusion transformer), so routes can follow the prompt.

logits_TE = W_x x_TD + W_o · MHA(q = W_q x, k = W_k c, v = W_v c)

The conditioning is captured from the model's own forward by a pre-hook on the root module
(`ConditioningContext.capture`); the user passes nothing extra.

Shape legend: B batch, S tokens per sample, L conditioning tokens, C conditioning dim,
A attention width, N heads, T = B*S tokens, E experts.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.layers.routers.base import Router, RouterSpec, register_router
from moeify.layers.tokens import keep_mask

MASK_ARG = "encoder_attention_mask"


class ConditioningContext:
    """Holds the conditioning (and its padding mask) of the current forward for every
    cross-attention router of a model."""

    def __init__(self, arg_name: str, model_name: str) -> None:
        self.arg_name, self.model_name = arg_name, model_name
        self.value: Tensor | None = None
        self.mask: Tensor | None = None
        self.keep: Tensor | None = None  # the mask as bool [B, L] "attend to this token"
        self._position: int | None = None
        self._mask_position: int | None = None

    def bind(self, forward) -> None:
        """Learn where the conditioning and its mask sit among the forward's positional parameters."""
        names = [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self._position = names.index(self.arg_name) if self.arg_name in names else None
        self._mask_position = names.index(MASK_ARG) if MASK_ARG in names else None

    @staticmethod
    def _argument(args: tuple, kwargs: dict, name: str, position: int | None) -> Tensor | None:
        value = kwargs.get(name)
        if value is None and position is not None and position < len(args):
            value = args[position]
        return value

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (with_kwargs=True) on the root model. The tensors are kept (not
        cleared after forward) because gradient checkpointing re-runs the blocks during backward."""
        self.value = self._argument(args, kwargs, self.arg_name, self._position)
        self.mask = self._argument(args, kwargs, MASK_ARG, self._mask_position)
        # As bool "attend", once per forward rather than in every layer's router.
        self.keep = keep_mask(self.mask) if isinstance(self.mask, Tensor) else None

    def __getstate__(self) -> dict:
        # A copy (EMA model, pickle) starts without the last forward's conditioning: it may carry
        # that forward's graph (a trained text encoder), which cannot be copied.
        return self.__dict__ | {"value": None, "mask": None, "keep": None}

    def get(self) -> Tensor:
        if self.value is None:
            raise RuntimeError(
                f"the cross-attention router needs `{self.arg_name}`, and the last forward of "
                f"{self.model_name} got none: pass `{self.arg_name}=` to the model's forward"
            )
        return self.value


class CrossAttentionRouter(Router):
    output_layers = ("from_tokens", "from_context")

    def __init__(
        self,
        hidden_size: int,
        conditioning_dim: int,
        attention_size: int,
        num_heads: int,
        num_experts: int,
        init_std: float,
        device=None,
    ) -> None:
        super().__init__()
        if attention_size % num_heads:
            raise ValueError(f"router_hidden_size={attention_size} must be divisible by router_num_heads={num_heads}")
        self.num_experts, self.num_heads = num_experts, num_heads
        kw = dict(device=device, dtype=torch.float32)
        self.to_q = nn.Linear(hidden_size, attention_size, bias=False, **kw)
        self.to_k = nn.Linear(conditioning_dim, attention_size, bias=False, **kw)
        self.to_v = nn.Linear(conditioning_dim, attention_size, bias=False, **kw)
        self.from_tokens = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.from_context = nn.Linear(attention_size, num_experts, bias=False, **kw)
        for layer in (self.to_q, self.to_k, self.to_v, self.from_tokens, self.from_context):
            nn.init.normal_(layer.weight, std=init_std)
        self.context: ConditioningContext | None = None  # set by the conversion, not a module

    def __deepcopy__(self, memo: dict) -> CrossAttentionRouter:
        # A router copied on its own (peft's modules_to_save copy, a copied block) keeps reading its
        # model's conditioning: a copied context would hold the conditioning of the last forward
        # forever. Copied with its whole model it gets the copy's context, which `memo` holds by
        # then (the root's capture hook, in `_forward_pre_hooks`, is copied before `_modules`).
        if self.context is not None and id(self.context) not in memo:
            memo[id(self.context)] = self.context
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return clone

    def logits(self, x_TD: Tensor, batch_shape: torch.Size) -> Tensor:
        if self.context is None:
            raise RuntimeError("this cross-attention router is not attached to a model's conditioning")
        c_BLC = self.context.get().to(device=x_TD.device, dtype=torch.float32)
        if c_BLC.dim() == 2:
            c_BLC = c_BLC.unsqueeze(0)
        batch = c_BLC.shape[0]
        if len(batch_shape) < 2 or batch_shape[0] != batch:
            raise RuntimeError(
                f"the cross-attention router got tokens of shape {tuple(batch_shape)} + (hidden,) but a "
                f"conditioning batch of {batch}: it needs FFN inputs shaped [batch, tokens, hidden]"
            )
        heads = self.num_heads
        q_BNSA = self.to_q(x_TD).view(batch, -1, heads, self.to_q.out_features // heads).transpose(1, 2)
        k_BNLA = self.to_k(c_BLC).view(batch, -1, heads, self.to_k.out_features // heads).transpose(1, 2)
        v_BNLA = self.to_v(c_BLC).view(batch, -1, heads, self.to_v.out_features // heads).transpose(1, 2)
        r_BNSA = F.scaled_dot_product_attention(q_BNSA, k_BNLA, v_BNLA, attn_mask=self._attention_mask(c_BLC))
        r_TA = r_BNSA.transpose(1, 2).reshape(x_TD.shape[0], -1)
        return self.from_tokens(x_TD) + self.from_context(r_TA)

    def _attention_mask(self, c_BLC: Tensor) -> Tensor | None:
        """Padding tokens the model masks out must not steer the routes: a [B, 1, 1, L] bool mask
        from the captured `encoder_attention_mask`. A row with every token masked attends to all of
        them instead (softmax over nothing is NaN)."""
        keep_BL = self.context.keep if self.context is not None else None
        if keep_BL is None:
            return None
        keep_BL = keep_BL.to(c_BLC.device)
        if tuple(keep_BL.shape) != tuple(c_BLC.shape[:2]):  # not this conditioning's mask: attend to all
            return None
        keep_BL = keep_BL | ~keep_BL.any(dim=-1, keepdim=True)
        return keep_BL[:, None, None, :]


def _build(spec: RouterSpec) -> CrossAttentionRouter:
    if spec.conditioning_dim is None:
        raise ValueError("the cross-attention router needs the conditioning dim")
    return CrossAttentionRouter(
        spec.hidden_size,
        spec.conditioning_dim,
        spec.router_hidden_size,
        spec.num_heads,
        spec.num_experts,
        spec.init_std,
        spec.device,
    )


register_router("cross_attention", _build)
