"""Record what a module computes: one real forward on a tiny input, as a dataflow graph.

`record(module, args)` runs the module once under a `TorchFunctionMode` and forward hooks. Every
torch function called in its own code and in its container submodules becomes a `Node`; every
call of a *leaf* submodule (no children: nn.Linear, GPT-2's Conv1D, activation modules, dropout,
norms) becomes one opaque `Node` (what happens inside it is not recorded); every call of a
container submodule becomes a `Call` that says which node range it spans and which tensors went
in and came out. Tensors are tracked by identity as they flow, so an argument of a node is a
`Ref` to the node output it came from. This is torch.fx's graph, but taken from a run: Python
control flow, `**kwargs` and data-dependent shapes are no obstacle, and only the path the run
took is recorded (the pattern matcher checks whatever it recognises numerically afterwards).

Nothing of the module changes: it runs in eval mode under no_grad, and its buffers are restored
afterwards (a rotary cache resized by the run, a BatchNorm statistic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


@dataclass(frozen=True)
class Ref:
    """One tensor of the graph: output `pos` (in flattened order) of node `node`."""

    node: int
    pos: int = 0


@dataclass(frozen=True)
class External:
    """A tensor that no recorded node produced: a parameter or buffer of the traced module
    (`path` names it) or a tensor made elsewhere (`value` holds it)."""

    path: str | None
    value: Tensor | None = field(default=None, compare=False)


@dataclass
class Node:
    index: int
    kind: str  # "input" | "module" (a leaf submodule call) | "func" (a torch function)
    target: Any  # input: the argument's position; module: the submodule's path; func: the callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list, repr=False)  # the values the run produced
    single: bool = True  # the call returned one tensor (not a tuple of them)

    def refs(self) -> list[Ref]:
        """The graph tensors this node reads, in argument order."""
        found, _ = tree_flatten((self.args, self.kwargs))
        return [x for x in found if isinstance(x, Ref)]

    def out(self, pos: int = 0) -> Tensor:
        return self.outputs[pos]


@dataclass
class Call:
    """One forward of a container submodule: nodes [first, last) ran inside it."""

    path: str
    inputs: list[Ref]  # its tensor arguments, positional first
    keys: list[int | str]  # where each input was passed: position in the call, or keyword
    outputs: list[Ref]  # the tensors it returned (flattened)
    first: int
    last: int
    single: bool = True  # it returned one tensor (not a tuple or a model output)


@dataclass
class Trace:
    root: nn.Module
    nodes: list[Node]
    calls: list[Call]
    output: list[Ref]  # the root's returned tensors (flattened)
    modules: dict[str, nn.Module]  # path -> submodule (leaf or container), "" = root
    single_output: bool = True  # the root returned one tensor
    _consumers: dict[Ref, list[int]] | None = field(default=None, repr=False)

    def node(self, ref: Ref) -> Node:
        return self.nodes[ref.node]

    def value(self, ref: Ref) -> Tensor:
        return self.nodes[ref.node].out(ref.pos)

    def consumers(self, ref: Ref) -> list[int]:
        """Indices of the nodes that read `ref` (the root's output counts as a consumer: -1)."""
        if self._consumers is None:
            table: dict[Ref, list[int]] = {}
            for node in self.nodes:
                for used in node.refs():
                    table.setdefault(used, []).append(node.index)
            for used in self.output:
                table.setdefault(used, []).append(-1)
            self._consumers = table
        return self._consumers.get(ref, [])

    def module_calls(self, path: str) -> int:
        """How many times the leaf submodule `path` was called."""
        return sum(1 for n in self.nodes if n.kind == "module" and n.target == path)


def is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


class _Recorder(TorchFunctionMode):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self.calls: list[Call] = []
        self.latest: dict[int, Ref] = {}  # id(tensor) -> the node output that holds it now
        self.alive: list[Tensor] = []  # keeps every seen tensor alive, so no id is reused
        self.opaque = 0  # > 0 inside a leaf submodule: its own ops are not recorded
        self.externals = {id(t): name for name, t in _tensors_of(root)}
        self.open: dict[int, list[tuple[list[Ref], list[int | str], int]]] = {}  # id(module) -> (inputs, keys, first)

    # -- tensors <-> refs
    def ref_of(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        known = self.latest.get(id(value))
        if known is not None:
            return known
        return External(self.externals.get(id(value)), value)

    def add(self, kind: str, target: Any, args: tuple, kwargs: dict, result: Any) -> Node:
        node = Node(len(self.nodes), kind, target, tree_map(self.ref_of, args), tree_map(self.ref_of, kwargs))
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, Tensor)]
        node.outputs = outputs
        node.single = isinstance(result, Tensor)
        for pos, tensor in enumerate(outputs):
            self.latest[id(tensor)] = Ref(node.index, pos)
            self.alive.append(tensor)
        self.nodes.append(node)
        return node

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.opaque and any(isinstance(t, Tensor) for t in tree_flatten(result)[0]):
            self.add("func", func, args, kwargs, result)
        return result

    # -- module hooks
    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.opaque:
            return
        if is_leaf(module):
            self.opaque += 1
            return
        passed = [*enumerate(args), *kwargs.items()]
        found = [(key, self.ref_of(value)) for key, value in passed if isinstance(value, Tensor)]
        found = [(key, ref) for key, ref in found if isinstance(ref, Ref)]
        self.open.setdefault(id(module), []).append(([r for _, r in found], [k for k, _ in found], len(self.nodes)))

    def after(self, path: str, module: nn.Module, args: tuple, kwargs: dict, result: Any) -> None:
        if is_leaf(module):
            if self.opaque == 1:
                self.opaque = 0
                self.add("module", path, args, kwargs, result)
            elif self.opaque:
                self.opaque -= 1
            return
        if self.opaque:
            return
        inputs, keys, first = self.open[id(module)].pop()
        outputs = [self.ref_of(t) for t in tree_flatten(result)[0] if isinstance(t, Tensor)]
        outputs = [r for r in outputs if isinstance(r, Ref)]
        self.calls.append(Call(path, inputs, keys, outputs, first, len(self.nodes), isinstance(result, Tensor)))


def _tensors_of(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Dropout off for a run; each module's own train/eval flag restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and the buffers as they were, whatever the forward does to them."""
    buffers = [(m, name, b.clone()) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    try:
        with eval_mode(module):
            yield
    finally:
        with torch.no_grad():
            for m, name, saved in buffers:
                current = m._buffers.get(name)
                if current is not None and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:
                    m._buffers[name] = saved


def call(model: nn.Module, inputs: Any) -> Any:
    """`model` on example inputs: a dict of keyword arguments, a tuple of positional ones, or one value."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def record(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Trace:
    """Run `module(*args, **kwargs)` once and return its dataflow graph. Exceptions of the
    forward propagate (the caller decides what a module that cannot run alone means)."""
    recorder = _Recorder(module)
    modules = dict(module.named_modules(remove_duplicate=False))
    paths: dict[int, str] = {}
    for path, sub in modules.items():
        paths.setdefault(id(sub), path)
    handles = []
    for path in paths.values():
        sub = modules[path]
        if sub is module:
            continue
        handles.append(sub.register_forward_pre_hook(recorder.before, with_kwargs=True))
        handles.append(
            sub.register_forward_hook(lambda m, a, k, r, path=path: recorder.after(path, m, a, k, r), with_kwargs=True)
        )
    kwargs = kwargs or {}
    for pos, value in enumerate(tree_flatten((args, kwargs))[0]):
        if isinstance(value, Tensor):
            recorder.add("input", pos, (), {}, value)
    try:
        with _frozen(module), torch.no_grad(), recorder:
            result = module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    output = [recorder.ref_of(t) for t in tree_flatten(result)[0] if isinstance(t, Tensor)]
    refs = [r for r in output if isinstance(r, Ref)]
    return Trace(module, recorder.nodes, recorder.calls, refs, modules, single_output=isinstance(result, Tensor))
