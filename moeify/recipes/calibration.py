"""What each converted FFN receives on calibration inputs: the dense model's FFN input hidden states.

`capture_ffn_inputs(model, sites, batches)` runs the dense model (eval mode, no_grad, each
module's train/eval flag restored) on every batch and hands each FFN site's input tokens, padding
left out, to a callback. The tokens are read where the router of the MoE layer will read them:
at the FFN's input projection (its gate projection reads the same tensor), or for an FFN moeify
converts generically, at the module's first argument; a 1x1-convolution FFN's [B, C, *positions]
input becomes positions-as-tokens, as `ChannelsFirst` hands them to the MoE layer. Padding is
known the way a converted model knows it (moeify.layers.tokens): the forward's `attention_mask`
(a decoder's `decoder_attention_mask`), or the mask set with `moeify.token_mask`.

Shape legend: B batch, S tokens per sample, T tokens, D model dim.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moeify.architectures.layouts import join
from moeify.layers.tokens import DECODER, ENCODER, TokenMask
from moeify.surgery import hooks
from moeify.surgery.errors import ConversionError
from moeify.surgery.find import FFNSite
from moeify.surgery.trace import call, eval_mode

# A progress bar from this many batches on (and only on a terminal): fewer run in seconds.
PROGRESS_MIN_BATCHES = 8

OnTokens = Callable[[int, Tensor], None]  # (site index, x_TD float32 on CPU)


def is_batch(value: Any) -> bool:
    """One batch is what `moeify(..., example_inputs=...)` takes: a dict (or mapping) of keyword
    arguments, a tuple of positional ones, or one tensor. A list (any other iterable) holds batches."""
    return isinstance(value, (Mapping, tuple, Tensor))


def as_batches(value: Any, what: str) -> Iterable[Any]:
    """`value` as an iterable of batches: one batch, or a list / iterable of them."""
    if is_batch(value):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{what} must be one batch (a dict of keyword arguments, a tuple of positional ones, or one tensor the "
            f"model takes) or a list of batches, got {type(value).__name__}"
        )
    return value


def _as_call_inputs(batch: Any) -> Any:
    # transformers' BatchEncoding is a Mapping but not a dict: `call` passes dicts as keywords.
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _input_module(model: nn.Module, site: FFNSite) -> tuple[nn.Module, bool]:
    """The module whose input is the FFN's input, and whether its features sit in dim 1."""
    layout = site.layout
    if layout is None:
        return model.get_submodule(site.install_path), False
    return model.get_submodule(join(site.name, layout.proj_in)), layout.channels_first


def _mask_sources(model: nn.Module, sites: list[FFNSite]) -> list[str]:
    """Which padding mask each site's tokens follow: an encoder-decoder's decoder its own."""
    encoder = hooks._encoder(model)
    if encoder is None:
        return [ENCODER] * len(sites)
    inside = {id(m) for m in encoder.modules()}
    return [ENCODER if id(model.get_submodule(site.name)) in inside else DECODER for site in sites]


def _progress(batches: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
    """tqdm (huggingface_hub's, which honours HF_HUB_DISABLE_PROGRESS_BARS) on a terminal and for
    enough batches; the batches as they are otherwise."""
    if (total is not None and total < PROGRESS_MIN_BATCHES) or not sys.stderr.isatty():
        return batches
    try:
        from huggingface_hub.utils import tqdm
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency; its tqdm an internal
        return batches
    return tqdm(batches, total=total, desc=description, unit="batch", leave=False)


def _explicit_mask(model: nn.Module) -> Tensor | None:
    """The mask a converted model was given with `moeify.token_mask` (a second conversion)."""
    context = getattr(model, "_moeify_tokens", None)
    return context.explicit if isinstance(context, TokenMask) else None


def capture_ffn_inputs(
    model: nn.Module, sites: list[FFNSite], batches: Iterable[Any], on_tokens: OnTokens, *, description: str
) -> int:
    """Run `model` on each batch; `on_tokens(i, x_TD)` gets site i's real tokens (fp32, CPU) at
    every call of it. Returns the number of batches run. Nothing of the model changes."""
    mask = TokenMask()
    mask.bind(model.forward)
    mask.explicit = _explicit_mask(model)
    sources = _mask_sources(model, sites)

    def hook_for(index: int, channels_first: bool) -> Callable[..., None]:
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs)
            if x is None:
                return
            if channels_first:
                x = x.movedim(1, -1)
            keep_T = mask.keep_T(sources[index], x.shape[:-1])
            x_TD = x.reshape(-1, x.shape[-1])
            if keep_T is not None:
                x_TD = x_TD[keep_T.to(x_TD.device)]
            on_tokens(index, x_TD.detach().to(device="cpu", dtype=torch.float32))

        return keep

    handles = [model.register_forward_pre_hook(mask.capture, with_kwargs=True)]
    for index, site in enumerate(sites):
        module, channels_first = _input_module(model, site)
        handles.append(module.register_forward_pre_hook(hook_for(index, channels_first), with_kwargs=True))
    total = len(batches) if hasattr(batches, "__len__") else None
    count = 0
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in _progress(batches, total, description):
                if not is_batch(batch):
                    raise TypeError(
                        f"{description}: batch {count} is a {type(batch).__name__}; each batch is a dict of keyword "
                        "arguments, a tuple of positional ones, or one tensor the model takes"
                    )
                try:
                    call(model, _as_call_inputs(batch))
                except Exception as error:
                    raise ConversionError(
                        f"{description}: batch {count} does not run the dense {type(model).__name__} "
                        f"({type(error).__name__}: {error}); pass what model(**batch) (a dict), model(*batch) (a "
                        "tuple) or model(batch) accepts. The model was left unchanged"
                    ) from error
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    return count


def concatenated(chunks: Iterator[Tensor] | list[Tensor], width: int) -> Tensor:
    """The captured tokens of one site as one [T, D] tensor (an empty one when none came)."""
    chunks = list(chunks)
    return torch.cat(chunks) if chunks else torch.zeros(0, width)
