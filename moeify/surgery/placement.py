"""Where a MoE layer goes for an FFN found in a trace, as an `FFNLayout` relative to its site.

Three placements, the first that applies:

1. **module** — a submodule's call computed exactly the FFN (plus its output dropout, plus a
   residual it adds itself): the MoE layer replaces that submodule (`LlamaMLP`, `BloomMLP` via
   `AddResidual`).
2. **chain** — the FFN runs inline in its block, as a chain of submodule calls with nothing the
   block computes between them (BERT's `intermediate` → `output.dense`; OPT's `fc1` →
   `activation_fn` → `fc2`): the MoE layer replaces the first, `nn.Identity` the rest.
3. **split** — anything else inline (a functional activation or dropout between the
   projections, a dropout module the block also uses elsewhere): `SplitEntry` / `SplitExit`
   (moeify.layers.wiring) at the projections.

A submodule that placement 2 or 3 swaps must run only as part of FFNs of this kind: a module that
also serves something else (an activation module shared with attention) is never swapped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeify.architectures.layouts import FFNLayout, get
from moeify.architectures.registry import required_positional_args
from moeify.surgery.dataflow import Match
from moeify.surgery.ops import dropout_p, op_name, projection
from moeify.surgery.program import NotReplayable, Program, program
from moeify.surgery.trace import Call, Node, Ref, Trace

# Ops that change nothing (dropout at p=0 aside): the block may apply them between chained modules.
_NO_OPS = frozenset({"contiguous", "clone", "detach"})


@dataclass(frozen=True)
class Placed:
    site: str  # path of the site (the module holding the whole FFN) in the trace's root
    layout: FFNLayout
    program: Program  # the dense FFN as recorded, from x to y, relative to the site


def _root_call(trace: Trace) -> Call:
    inputs = [Ref(n.index) for n in trace.nodes if n.kind == "input"]
    keys: list[int | str] = [n.target for n in trace.nodes if n.kind == "input"]
    return Call("", inputs, keys, trace.output, len(inputs), len(trace.nodes), trace.single_output)


def _out_dropouts(trace: Trace, y: Ref) -> tuple[Ref, list[int], float]:
    """Follow dropouts applied to the FFN output alone: the last ref, their nodes, their rate."""
    nodes, p = [], 0.0
    while True:
        consumers = trace.consumers(y)
        if len(consumers) != 1 or consumers[0] < 0:
            return y, nodes, p
        node = trace.nodes[consumers[0]]
        rate = dropout_p(trace, node)
        if rate is None or node.refs()[0] != y:
            return y, nodes, p
        nodes.append(node.index)
        p = max(p, rate)
        y = Ref(node.index)


def _residual(trace: Trace, call: Call, y: Ref) -> tuple[Node, int] | None:
    """The call's output as `y + one of its inputs`: (the add node, that input's index)."""
    if len(call.outputs) != 1:
        return None
    node = trace.node(call.outputs[0])
    refs = node.refs()
    if op_name(node) != "add" or len(refs) != 2 or y not in refs or node.kwargs.get("alpha", 1) != 1:
        return None
    other = refs[1] if refs[0] == y else refs[0]
    return (node, call.inputs.index(other)) if other in call.inputs else None


def _parameter_name(module: nn.Module, key: int | str) -> tuple[int, str] | None:
    """(position, name) of a forward argument passed at `key` (a position or a keyword)."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind is not p.VAR_KEYWORD]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(key, int):
        return (key, names[key]) if key < len(names) else None
    return (names.index(key), key) if key in names else None


def _relative(path: str, site: str) -> str:
    return path if not site else path[len(site) + 1 :]


@dataclass(frozen=True)
class ResidualReference:
    """An FFNLayout `reference` for a module that adds a residual itself."""

    residual: tuple[int, str]

    def __call__(self, site: nn.Module) -> nn.Module:
        return WithoutResidual(site, self.residual)


@dataclass(frozen=True)
class ChannelsFirstReference:
    """An FFNLayout `reference` for a 1x1-convolution FFN over `positions` spatial dimensions: it
    takes tokens [..., C] like the MoE layer does. The dense FFN is `inner(site)`, or else the
    chain of submodules `chain` (the site itself for ("",))."""

    positions: int
    inner: Callable[[nn.Module], nn.Module] | None = None
    chain: tuple[str, ...] = ("",)

    def __call__(self, site: nn.Module) -> nn.Module:
        dense = self.inner(site) if self.inner is not None else nn.Sequential(*(get(site, p) for p in self.chain))
        return OnTokens(dense, self.positions)


class OnTokens(nn.Module):
    """A channels-first module applied to tokens [..., C]: [N, C] becomes [1, C, N, 1, ...]."""

    def __init__(self, site: nn.Module, positions: int) -> None:
        super().__init__()
        self.site, self.positions = site, positions

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(1, -1, x.shape[-1]).movedim(-1, 1)  # [1, C, N]
        grid = tokens.reshape(*tokens.shape, *([1] * (self.positions - 1)))
        out = self.site(grid).reshape(1, -1, tokens.shape[-1]).movedim(1, -1)  # [1, N, C_out]
        return out.reshape(*x.shape[:-1], out.shape[-1])


class WithoutResidual(nn.Module):
    """The FFN alone of a module that adds a residual itself: the residual argument zero, or (the
    hidden states being the residual) the input subtracted again."""

    def __init__(self, site: nn.Module, residual: tuple[int, str]) -> None:
        super().__init__()
        self.site, (self.position, self.name) = site, residual

    def forward(self, x: Tensor) -> Tensor:
        if self.position == 0:
            return self.site(x) - x
        return self.site(x, **{self.name: torch.zeros_like(x)})


def _activation(trace: Trace, nodes: tuple[int, ...], source: Ref, result: Ref, site: str, channel: int) -> object:
    """An activation module's path (deep-copied for the experts), or the replay of the functions."""
    if len(nodes) == 1 and trace.nodes[nodes[0]].kind == "module":
        return _relative(trace.nodes[nodes[0]].target, site)
    return program(trace, nodes, source, result, site, channel=channel).builder()


def _place(trace: Trace, match: Match, site: str, **install: object) -> Placed:
    """The placement of `match` relative to `site`: its FFNLayout, its activation replayed where
    it is no module. The identity check's reference is the site's own modules where they compute
    the FFN alone; the recorded program only for a split FFN."""
    rel = lambda path: _relative(path, site)  # noqa: E731
    act = _activation(trace, match.act_nodes, match.act_source, match.act_result, site, match.channel)
    up_act = post_act = None
    if match.up_nodes:
        up_act = _activation(trace, match.up_nodes, match.up_source, match.up_result, site, match.channel)
    if match.post_nodes:
        post_act = _activation(trace, match.post_nodes, match.product, match.top, site, match.channel)
    dense = program(trace, sorted(match.nodes), match.x, match.y, site)
    if install.get("split"):
        reference = dense.builder(copy_modules=False)
    elif install.get("residual"):
        reference = ResidualReference(install["residual"])
    else:
        reference = None
    channels_first = match.channels_first(trace)
    if channels_first:  # the check feeds tokens [..., C]: the dense FFN gets them channels first
        chain = (install.get("install_at", ""), *install.get("identities", ()))
        reference = ChannelsFirstReference(trace.value(match.x).dim() - 2, reference, chain)
    layout = FFNLayout(
        match.kind,
        proj_in=rel(match.proj_in),
        proj_out=rel(match.proj_out),
        proj_gate=rel(match.proj_gate) if match.proj_gate else None,
        gate_first=match.gate_first,
        act=act,
        up_act=up_act,
        post_act=post_act,
        mid_dropout=match.mid_dropout or None,
        reference=reference,
        channels_first=channels_first,
        **install,
    )
    return Placed(site, layout, dense)


def _replaceable(trace: Trace, call: Call, extra_inputs: int = 0) -> bool:
    """A module a MoE layer (which returns one tensor, and needs only the hidden states) may take
    the place of: it returned one tensor and requires no more arguments than it was given here."""
    module = trace.modules[call.path] if call.path else trace.root
    return call.single and len(required_positional_args(module)) <= 1 + extra_inputs


def _as_module(trace: Trace, match: Match) -> Placed | None:
    y, dropouts, out_p = _out_dropouts(trace, match.y)
    ffn = set(match.nodes) | set(dropouts)
    channels_first = match.channels_first(trace)
    for call in [*trace.calls, _root_call(trace)]:  # inner calls first: the smallest module wins
        if not call.inputs or call.inputs[0] != match.x or not _replaceable(trace, call, len(call.inputs) - 1):
            continue
        body = set(range(call.first, call.last))
        if body == ffn and call.outputs == [y]:
            return _place(trace, match, call.path, out_dropout=out_p or None)
        if channels_first:
            continue  # a residual is not wrapped around channels-first FFNs
        found = _residual(trace, call, y)
        if found is not None and body == ffn | {found[0].index}:
            module = trace.modules[call.path]
            key = call.keys[found[1]]
            residual = (0, "hidden_states") if found[1] == 0 else _parameter_name(module, key)
            if residual is not None:
                return _place(trace, match, call.path, out_dropout=out_p or None, residual=residual)
    return None


def _enclosing(trace: Trace, nodes: set[int]) -> Call:
    """The smallest call that ran all `nodes`."""
    inside = [c for c in trace.calls if c.first <= min(nodes) and max(nodes) < c.last]
    return min(inside, key=lambda c: c.last - c.first, default=_root_call(trace))


def _swappable(trace: Trace, path: str, ffn_nodes: set[int]) -> bool:
    """A leaf module every call of which is part of some FFN (of `ffn_nodes`), and that only one
    path of the model holds."""
    calls = [n.index for n in trace.nodes if n.kind == "module" and n.target == path]
    module = trace.modules[path]
    aliases = sum(1 for m in trace.modules.values() if m is module)
    return aliases == 1 and all(i in ffn_nodes for i in calls)


def _as_chain(trace: Trace, match: Match, site: str, all_ffn: set[int]) -> Placed | None:
    """The first module on the FFN's path that takes x, covers both projections of a gated FFN,
    and whose remaining nodes are swappable leaf modules or no-ops."""
    # The MoE layer takes the place of a module called with x alone that returns one tensor.
    firsts = [
        c
        for c in trace.calls
        if c.inputs == [match.x] and _replaceable(trace, c) and set(range(c.first, c.last)) <= match.nodes
    ]
    leaves = [
        n
        for n in (trace.nodes[i] for i in sorted(match.nodes))
        if n.kind == "module" and n.refs() == [match.x] and n.single
    ]
    candidates = [(c.path, set(range(c.first, c.last))) for c in firsts] + [(n.target, {n.index}) for n in leaves]
    proj_nodes = {i for i in match.nodes if projection(trace, trace.nodes[i]) is not None and i != match.y.node}
    candidates = [(path, covered) for path, covered in candidates if proj_nodes <= covered]
    if not candidates:
        return None
    install, covered = max(candidates, key=lambda c: len(c[1]))
    identities = []
    for index in sorted(match.nodes - covered):
        node = trace.nodes[index]
        if node.kind == "module" and _swappable(trace, node.target, all_ffn):
            identities.append(node.target)
        elif not (node.kind == "func" and (op_name(node) in _NO_OPS or dropout_p(trace, node) == 0.0)):
            return None
    rel = [_relative(p, site) for p in identities]
    return _place(trace, match, site, install_at=_relative(install, site), identities=tuple(rel))


def _as_split(trace: Trace, match: Match, site: str, all_ffn: set[int]) -> Placed | None:
    projections = [match.proj_in, match.proj_out] + ([match.proj_gate] if match.proj_gate else [])
    if not all(_swappable(trace, path, all_ffn) for path in projections):
        return None
    rel = _relative(match.proj_out, site)
    return _place(trace, match, site, install_at=rel, split=True)


def place(trace: Trace, match: Match, all_ffn: set[int]) -> Placed | str:
    """The placement of one FFN, or the reason there is none. `all_ffn`: the nodes of every FFN
    of the trace (a module used by several FFNs, ALBERT's shared layer, may still be swapped)."""
    try:
        placed = _as_module(trace, match)
        if placed is not None:
            return placed
        site = _enclosing(trace, set(match.nodes)).path
        return (
            _as_chain(trace, match, site, all_ffn)
            or _as_split(trace, match, site, all_ffn)
            or f"its projections ({match.proj_in}, {match.proj_out}) also serve other computations of the block"
        )
    except NotReplayable as error:
        return f"its activation cannot be replayed: {error}"
