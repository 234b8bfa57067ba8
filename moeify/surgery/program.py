"""Turn recorded nodes back into code: a `TracedActivation` that computes one tensor of a trace
from another, for any module of the same structure as the traced one.

Used twice: an FFN's activation (the region between its projections, packed into the experts),
and the dense FFN as its block computes it (projections included), the reference of the identity
check for FFNs written inline in a block's forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from moeify.layers.traced import Const, Slot, Step, TracedActivation, Training
from moeify.surgery.ops import (
    CHANNEL_REDUCTIONS,
    DROPOUT,
    ELEMENTWISE,
    SPLITS,
    base_name,
    is_constant,
    op_name,
    sliced,
    split_dim,
)
from moeify.surgery.trace import External, Node, Ref, Trace

ALLOWED = ELEMENTWISE | DROPOUT | SPLITS | CHANNEL_REDUCTIONS  # every function a recorded program may call


class NotReplayable(Exception):
    """The recorded nodes read something a replay cannot supply (a parameter used as a function
    argument, a tensor from outside the FFN)."""


def _relative(path: str, prefix: str) -> str:
    if not prefix:
        return path
    if not path.startswith(prefix + "."):
        raise NotReplayable(f"{path} is outside {prefix}")
    return path[len(prefix) + 1 :]


def _on_rows(trace: Trace, node: Node, args: tuple, kwargs: dict, channel: int) -> tuple[tuple, dict]:
    """A split of the channel dimension `channel`, rewritten for the last dimension of any rank:
    experts see rows [A, I] where the block saw [B, T, I] (or [B, I, H, W] with 1x1 convolutions)."""
    if split_dim(trace, node) is None:
        return args, kwargs
    if split_dim(trace, node) != channel:
        raise NotReplayable(f"{op_name(node)} across positions, not channels")
    if op_name(node) == "getitem":
        _, part = sliced(args[1], trace.value(node.refs()[0]).dim())
        return (args[0], (Ellipsis, part)), kwargs
    if "dim" in kwargs:
        return args, {**kwargs, "dim": -1}
    at = 1 if op_name(node) in CHANNEL_REDUCTIONS else 2  # mean(x, dim) / chunk(x, chunks, dim)
    return (*args[:at], -1, *args[at + 1 :]), kwargs


@dataclass(frozen=True)
class Program:
    """Steps computing `result` from one input; module steps name submodules relative to the site."""

    steps: tuple[Step, ...]
    result: Slot
    modules: dict[str, str]  # step key -> submodule path relative to the site
    constants: dict[str, Tensor]

    def build(self, site: nn.Module, *, copy_modules: bool = True) -> TracedActivation:
        """The replay for `site` (a module of the traced structure). Experts own copies of the
        modules they call; the reference of the identity check calls the site's own."""
        modules = {key: site.get_submodule(path) for key, path in self.modules.items()}
        if copy_modules:
            modules = {key: copy.deepcopy(module) for key, module in modules.items()}
        constants = {name: value.clone() for name, value in self.constants.items()}
        return TracedActivation(list(self.steps), self.result, modules, constants)

    def builder(self, *, copy_modules: bool = True) -> Replay:
        return Replay(self, copy_modules)

    # -- as data (a checkpoint records FFNs found on example inputs: moeify.hub.save)

    def to_dict(self) -> dict[str, Any]:
        steps = [
            {
                "fn": fn if isinstance(fn := step.fn, str) else _function_name(fn),
                "args": _encode(step.args),
                "kwargs": _encode(step.kwargs),
            }
            for step in self.steps
        ]
        constants = {
            name: {"dtype": str(t.dtype).removeprefix("torch."), "value": t.tolist()}
            for name, t in self.constants.items()
        }
        return {"steps": steps, "result": _encode(self.result), "modules": dict(self.modules), "constants": constants}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Program:
        """Read `to_dict`'s output. Functions are looked up by name among the element-wise,
        dropout and split functions the dataflow records, and nothing else: a record can name no
        other code to run."""
        steps = tuple(
            Step(
                step["fn"] if isinstance(step["fn"], str) else _function(step["fn"]),
                _decode(step["args"]),
                _decode(step["kwargs"]),
            )
            for step in data["steps"]
        )
        constants = {
            name: torch.tensor(c["value"], dtype=_dtype(c["dtype"])) for name, c in data.get("constants", {}).items()
        }
        result = _decode(data["result"])
        if not isinstance(result, Slot):
            raise ValueError("a recorded program's result must be a slot")
        return cls(steps, result, dict(data["modules"]), constants)


@dataclass(frozen=True)
class Replay:
    """`Replay(program)(site)`: the program's TracedActivation for `site`; an FFNLayout's `act` or
    `reference` (a callable of the site, as the layouts of the registry have)."""

    program: Program
    copy_modules: bool = True

    def __call__(self, site: nn.Module) -> TracedActivation:
        return self.program.build(site, copy_modules=self.copy_modules)


# Where recorded functions live, for naming them in a record and finding them again.
_NAMESPACES = {"tensor": torch.Tensor, "torch": torch, "functional": F, "nn": torch._C._nn, "special": torch.special}


def _function_name(fn: Callable) -> dict[str, str]:
    name = getattr(fn, "__name__", "")
    for namespace, holder in _NAMESPACES.items():
        if getattr(holder, name, None) is fn:
            return {"namespace": namespace, "name": name}
    raise NotReplayable(f"the function {fn!r} cannot be named in a checkpoint")


def _function(data: dict[str, str]) -> Callable:
    holder, name = _NAMESPACES.get(data.get("namespace", "")), data.get("name", "")
    fn = getattr(holder, name, None) if holder is not None and isinstance(name, str) else None
    if fn is None or base_name(name) not in ALLOWED:
        raise ValueError(f"a recorded program names {data!r}, which is not an element-wise, dropout or split function")
    return fn


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _encode(value: Any) -> Any:  # one branch per kind of value a recorded argument can be
    if isinstance(value, Slot):
        return {"slot": [value.step, value.pos]}
    if isinstance(value, Const):
        return {"const": value.name}
    if isinstance(value, Training):
        return {"training": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NotReplayable(f"the recorded argument {value!r} cannot be stored in a checkpoint")


def _decode(value: Any) -> Any:  # the inverse of _encode
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "slot" in value:
        step, pos = value["slot"]
        return Slot(int(step), None if pos is None else int(pos))
    if "const" in value:
        return Const(str(value["const"]))
    if "training" in value:
        return Training()
    if "dtype" in value:
        return _dtype(value["dtype"])
    if "slice" in value:
        return slice(*value["slice"])
    if "ellipsis" in value:
        return Ellipsis
    if "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v) for k, v in value["dict"].items()}
    raise ValueError(f"unknown value in a recorded program: {value!r}")


class _Builder:
    def __init__(self, trace: Trace, source: Ref, site: str, channel: int | None) -> None:
        self.trace, self.site, self.channel = trace, site, channel
        self.slots: dict[Ref, Slot | Const] = {source: Slot(0)}
        self.steps: list[Step] = []
        self.modules: dict[str, str] = {}
        self.constants: dict[str, Tensor] = {}

    def constant(self, value: Tensor) -> Const:
        name = f"c{len(self.constants)}"
        self.constants[name] = value.detach().clone()
        return Const(name)

    def convert(self, value: object) -> object:
        if isinstance(value, Ref):
            if value not in self.slots:
                raise NotReplayable(f"reads a tensor computed outside the FFN (node {value.node})")
            return self.slots[value]
        if isinstance(value, External):
            tensor = value.value
            if isinstance(tensor, nn.Parameter) or tensor is None or tensor.numel() > 1:
                # A learnable tensor read as an argument would be frozen into a copy; a large one
                # is no constant of an activation.
                raise NotReplayable(f"reads the tensor {value.path or 'made outside the FFN'}")
            return self.constant(tensor)
        return value

    def add(self, index: int) -> None:
        node = self.trace.nodes[index]
        if is_constant(self.trace, node):  # a constant the code made: keep its value
            for pos, value in enumerate(node.outputs):
                self.slots[Ref(index, pos)] = self.constant(value)
            return
        args, kwargs = tree_map(self.convert, node.args), tree_map(self.convert, node.kwargs)
        if node.kind == "func" and op_name(node) in DROPOUT:  # drops in training, as it did in the block
            if "training" in kwargs or len(args) <= 2:
                kwargs = {**kwargs, "training": Training()}
            else:
                args = (*args[:2], Training(), *args[3:])
        if self.channel is not None:
            args, kwargs = _on_rows(self.trace, node, args, kwargs, self.channel)
        fn: Callable | str = node.target
        if node.kind == "module":
            fn = f"m{len(self.modules)}"  # ModuleDict keys may not hold dots
            self.modules[fn] = _relative(node.target, self.site)
        self.steps.append(Step(fn, args, kwargs))
        for pos in range(len(node.outputs)):
            self.slots[Ref(index, pos)] = Slot(len(self.steps), None if node.single else pos)


def program(
    trace: Trace, nodes: Sequence[int], source: Ref, result: Ref, site: str, *, channel: int | None = None
) -> Program:
    """The replay of `nodes` (in run order) from `source` to `result`, its module steps relative
    to the submodule path `site` of the trace's root. With `channel`, it runs on rows [A, I]
    instead of the recorded layout (an activation for the experts), `channel` being the recorded
    dimension of I; without, on tensors laid out as recorded (the dense FFN)."""
    builder = _Builder(trace, source, site, channel)
    for index in nodes:
        builder.add(index)
    end = builder.slots.get(result)
    if not isinstance(end, Slot):
        raise NotReplayable("the result is not computed by the recorded nodes")
    return Program(tuple(builder.steps), end, builder.modules, builder.constants)
