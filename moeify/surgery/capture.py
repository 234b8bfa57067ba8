"""The inputs blocks receive in one forward of the whole model: for tracing blocks that cannot
run alone (they need a timestep embedding, rotary embeddings, a mask built by the model)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from moeify.surgery.errors import ConversionError
from moeify.surgery.trace import call, eval_mode


def _snapshot(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments as they are now: a KV cache passed along is filled by the very call it is
    passed to, and a later trace of that call must see it as it was."""
    try:
        return copy.deepcopy((args, kwargs))
    except Exception:  # an argument that cannot be copied is passed as it is
        return args, kwargs


class _Enough(Exception):
    """Every block of interest has been called: the rest of the forward is not needed."""


def capture_calls(model: nn.Module, example_inputs: Any, blocks: list[nn.Module]) -> dict[int, tuple[tuple, dict]]:
    """id(block) -> the (args, kwargs) of its first call during `model(example_inputs)`, in eval
    mode under no_grad. The forward stops once every block has been called."""
    found: dict[int, tuple[tuple, dict]] = {}
    wanted = {id(b) for b in blocks}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) in wanted and id(module) not in found:
            found[id(module)] = _snapshot(args, dict(kwargs))
            if len(found) == len(wanted):
                raise _Enough

    handles = [block.register_forward_pre_hook(keep, with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad(), eval_mode(model):
            call(model, example_inputs)
    except _Enough:
        pass
    except Exception as error:
        raise ConversionError(
            f"example_inputs do not run the dense {type(model).__name__} ({type(error).__name__}: {error}); "
            "pass what model(**example_inputs) (a dict), model(*example_inputs) (a tuple) or model(example_inputs) accepts"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return found
