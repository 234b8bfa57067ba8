"""Recognise token-wise FFNs in a recorded forward (`moeify.surgery.trace`) by what they compute.

An FFN is an output projection whose input is a token-wise, parameter-light function (the
*region*) of one or two input projections of the same tensor `x`:

    mlp          out(f(in(x)))                      f: any activation, module or functions
    gated        out(f(gate(x)) * up(x))            SwiGLU / GEGLU with separate projections
    fused_gated  out(f(g) * u), g, u = in(x) split  Phi-3's gate_up_proj, diffusers' GEGLU

A projection is a leaf module with a 2-D weight (nn.Linear, GPT-2's Conv1D) applied to the last
dimension, or a 1x1 convolution applied to the channels (moeify.surgery.ops). The region may hold
element-wise functions, splits and per-token reductions of the channels, dropouts, constants, and
leaf modules that keep the shape and are no projection (activation modules, a norm inside the
FFN); anything else (attention, a convolution over tokens, a concatenation with another branch)
means no FFN, and some of those are reported as `Miss`es with the reason (moeify.surgery.context),
for the error a user reads when nothing was found. For gated kinds the up half may pass through a
function of its own (`up_*`) and the product through another (`post_*`).

Shape legend: T tokens, D model dim, I intermediate dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeify.surgery.context import explain, pooled
from moeify.surgery.ops import (
    ACTIVATIONS,
    PASS_THROUGH,
    channel_dim,
    dropout_p,
    elementwise,
    is_constant,
    is_norm,
    is_split,
    op_name,
    projection,
    sliced,
    split_dim,
)
from moeify.surgery.trace import Node, Ref, Trace


@dataclass(frozen=True)
class Match:
    """One FFN found in a trace; paths are relative to the traced module."""

    kind: str  # "mlp" | "gated" | "fused_gated"
    proj_in: str  # the up projection for gated kinds
    proj_out: str
    proj_gate: str | None
    gate_first: bool
    act_nodes: tuple[int, ...]  # the region nodes computing f, in order (empty for kind-free acts)
    act_source: Ref  # the tensor f is applied to
    act_result: Ref
    up_nodes: tuple[int, ...]  # gated kinds: the region nodes computing g(up) (empty: g is the identity)
    up_source: Ref | None
    up_result: Ref | None
    post_nodes: tuple[int, ...]  # gated kinds: the region nodes after the product (empty: none)
    product: Ref  # gated kinds: act(gate) * g(up)
    top: Ref  # the activation's final value, before the mid dropout
    mid_dropout: float
    x: Ref  # the FFN's input
    h: Ref  # the output projection's input
    y: Ref  # the output projection's output
    nodes: frozenset[int]  # every node of the FFN: projections and region
    channel: int  # the dimension its projections act on: the last, or 1 (1x1 convolutions)

    def channels_first(self, trace: Trace) -> bool:
        return self.channel != trace.value(self.x).dim() - 1


@dataclass(frozen=True)
class Miss:
    """Something FFN-shaped that is not a token-wise FFN, and why."""

    where: str  # path of its output projection
    reason: str


class _NotFFN(Exception):
    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


def _region(trace: Trace, h: Ref) -> tuple[set[int], list[int]]:
    """The elementwise region feeding `h`, and the projection nodes at its edge."""
    region: set[int] = set()
    leaves: list[int] = []
    stack = [h.node]
    while stack:
        index = stack.pop()
        if index in region or index in leaves:
            continue
        node = trace.nodes[index]
        if projection(trace, node) is not None:
            leaves.append(index)
            continue
        if node.kind == "input":
            raise _NotFFN()
        if not elementwise(trace, node):
            raise _NotFFN(explain(trace, node))
        region.add(index)
        stack.extend(ref.node for ref in node.refs())
    return region, sorted(leaves)


def _contained(trace: Trace, produced: set[int], allowed: set[int]) -> bool:
    """Every output of `produced` is read only by nodes in `allowed` (constants, the same whatever
    the tokens, may be read anywhere)."""
    return all(
        consumer in allowed
        for index in produced
        if not is_constant(trace, trace.nodes[index])
        for pos in range(len(trace.nodes[index].outputs))
        for consumer in trace.consumers(Ref(index, pos))
    )


def _deps(trace: Trace, ref: Ref, sources: set[int], memo: dict[Ref, frozenset]) -> frozenset:
    """Which source refs (projection outputs or split halves) `ref` depends on."""
    if ref in memo:
        return memo[ref]
    if ref.node in sources:
        memo[ref] = frozenset({ref})
        return memo[ref]
    found: frozenset = frozenset()
    for used in trace.node(ref).refs():
        found |= _deps(trace, used, sources, memo)
    memo[ref] = found
    return found


def _strip(trace: Trace, ref: Ref, region: set[int]) -> tuple[Ref, float]:
    """Walk back over trailing dropouts and pass-through ops: the ref before them, and their p."""
    p = 0.0
    while ref.node in region:
        node = trace.node(ref)
        rate = dropout_p(trace, node)
        if rate is None and not (op_name(node) in PASS_THROUGH and node.kind == "func"):
            break
        p = max(p, rate or 0.0)
        ref = node.refs()[0]
    return ref, p


def _subgraph(trace: Trace, source: Ref, result: Ref, region: set[int]) -> tuple[int, ...]:
    """The region nodes computing `result` from `source`, in run order."""
    needed: set[int] = set()
    stack = [result]
    while stack:
        ref = stack.pop()
        if ref == source or ref.node in needed or ref.node not in region:
            continue
        needed.add(ref.node)
        stack.extend(trace.node(ref).refs())
    return tuple(sorted(needed))


def _half(trace: Trace, ref: Ref, width: int, channel: int) -> int | None:
    """0 / 1 if `ref` is the first / second half (of size `width`) of a fused projection's output."""
    node = trace.node(ref)
    if op_name(node) != "getitem":
        return ref.pos if len(node.outputs) == 2 and node.outputs[0].shape[channel] == width else None
    found = sliced(node.args[1], trace.value(node.refs()[0]).dim())
    if found is None or found[0] != channel:
        return None
    start, stop, step = found[1].indices(2 * width)
    if step != 1 or stop - start != width or start not in (0, width):
        return None
    return start // width


def _activates(trace: Trace, nodes: tuple[int, ...]) -> bool:
    return any(trace.nodes[i].kind == "module" or op_name(trace.nodes[i]) in ACTIVATIONS for i in nodes)


def _gate_and_up(trace: Trace, top: Ref, sources: set[int], region: set[int]) -> tuple[Ref, Ref, Ref, Ref]:
    """For `f(gate) * g(up)` (g mostly the identity): (gate source, f's result, up source, g's
    result). The gate is the side with an activation; raises _NotFFN otherwise."""
    node = trace.node(top)
    if op_name(node) != "mul" or len(node.refs()) != 2:
        raise _NotFFN()
    memo: dict[Ref, frozenset] = {}
    sides = node.refs()
    deps = [_deps(trace, side, sources, memo) for side in sides]
    if any(len(d) != 1 for d in deps) or deps[0] == deps[1]:
        raise _NotFFN()
    origin = [next(iter(d)) for d in deps]
    plain = [_strip(trace, side, region)[0] == start for side, start in zip(sides, origin)]
    activates = [_activates(trace, _subgraph(trace, start, side, region)) for side, start in zip(sides, origin)]
    # The gate: the side with an activation, the other plain if either is; else the first.
    gate = (
        0 if plain[1] or (activates[0] and not plain[0] and not activates[1]) or (activates[0] and activates[1]) else 1
    )
    if not activates[gate]:
        raise _NotFFN()
    up = 1 - gate
    return origin[gate], sides[gate], origin[up], sides[up]


def _ffn_input(trace: Trace, leaves: list[int]) -> Ref:
    """The one tensor every input projection reads; raises _NotFFN otherwise."""
    inputs = {trace.nodes[i].refs()[0] for i in leaves}
    if not leaves or len(leaves) > 2 or len(inputs) != 1:
        raise _NotFFN()
    x = inputs.pop()
    if pooled(trace, x):
        raise _NotFFN(
            "squeeze-and-excitation: this MLP acts on a pooled summary of the positions (a gate for them), "
            "not on each token"
        )
    return x


def _product(trace: Trace, top: Ref, region: set[int]) -> Ref:
    """The gated product under `top`: back through single-input region ops applied after it
    (BitNet normalises the product before the down projection)."""
    ref = top
    while ref.node in region:
        node = trace.node(ref)
        refs = [r for r in node.refs() if r.node in region or projection(trace, trace.node(r)) is not None]
        if op_name(node) == "mul" and len(refs) == 2 or len(refs) != 1:
            return ref
        ref = refs[0]
    return ref


def _structure(trace: Trace, h: Ref, top: Ref, leaves: list[int], region: set[int], channel: int) -> tuple:
    """(kind, gate_first, proj_in, proj_gate, source, result, up, up_result): how the region
    combines the input projections, f applied from `source` to `result` (and for gated kinds g
    from `up` to `up_result`)."""
    width_out = trace.value(h).shape[channel]
    widths = [trace.nodes[i].out().shape[channel] for i in leaves]
    if len(leaves) == 2:
        gate, result, up, up_result = _gate_and_up(trace, _product(trace, top, region), set(leaves), region)
        return "gated", True, trace.nodes[up.node].target, trace.nodes[gate.node].target, gate, result, up, up_result
    if widths[0] == width_out:
        return "mlp", True, trace.nodes[leaves[0]].target, None, Ref(leaves[0]), top, None, None
    if widths[0] != 2 * width_out:
        raise _NotFFN()
    splits = {i for i in region if is_split(trace, trace.nodes[i]) and trace.nodes[i].refs()[0] == Ref(leaves[0])}
    gate, result, up, up_result = _gate_and_up(trace, _product(trace, top, region), splits, region)
    halves = (_half(trace, gate, width_out, channel), _half(trace, up, width_out, channel))
    if set(halves) != {0, 1}:
        raise _NotFFN()  # interleaved or uneven: not the [gate; up] halves packed experts hold
    return "fused_gated", halves[0] == 0, trace.nodes[leaves[0]].target, None, gate, result, up, up_result


def _nonlinear(trace: Trace, nodes: tuple[int, ...]) -> bool:
    """Something in the activation other than norms, casts and no-ops: two projections with only a
    norm between them are a factored projection (DeepSeek's low-rank attention), not an FFN."""
    for index in nodes:
        node = trace.nodes[index]
        if node.kind == "module" and not is_norm(trace, node):
            return True
        if node.kind == "func" and node.refs() and op_name(node) not in PASS_THROUGH:
            return True
    return False


def match_at(trace: Trace, out_node: Node) -> Match:
    """The FFN whose output projection is `out_node`; raises _NotFFN (with a reason or not)."""
    h = out_node.refs()[0]
    region, leaves = _region(trace, h)
    x = _ffn_input(trace, leaves)
    if not _contained(trace, region | set(leaves), region | {out_node.index}):
        raise _NotFFN()  # an intermediate value is used elsewhere: not a self-contained FFN
    channel = channel_dim(trace, out_node)
    if any(channel_dim(trace, trace.nodes[i]) != channel for i in leaves):
        raise _NotFFN()
    if any(split_dim(trace, trace.nodes[i]) not in (None, channel) for i in region):
        raise _NotFFN()  # a split across positions, not channels
    top, mid_p = _strip(trace, h, region)
    kind, gate_first, proj_in, proj_gate, source, result, up, up_result = _structure(
        trace, h, top, leaves, region, channel
    )
    act_nodes = _subgraph(trace, source, result, region)
    up_nodes = _subgraph(trace, up, up_result, region) if up is not None else ()
    product = _product(trace, top, region) if kind != "mlp" else top
    post_nodes = _subgraph(trace, product, top, region) if product != top else ()
    if up_nodes and _strip(trace, up_result, region)[0] == up:
        up_nodes = ()  # only casts and no-ops on the up side
    if not _nonlinear(trace, act_nodes):
        raise _NotFFN()  # nothing (a LoRA adapter) or only a norm between the projections
    return Match(
        kind=kind,
        proj_in=proj_in,
        proj_out=out_node.target,
        proj_gate=proj_gate,
        gate_first=gate_first,
        act_nodes=act_nodes,
        act_source=source,
        act_result=result,
        up_nodes=up_nodes,
        up_source=up,
        up_result=up_result,
        post_nodes=post_nodes,
        product=product,
        top=top,
        mid_dropout=mid_p,
        x=x,
        h=h,
        y=Ref(out_node.index),
        nodes=frozenset(region | set(leaves) | {out_node.index}),
        channel=channel,
    )


def match_ffns(trace: Trace) -> tuple[list[Match], list[Miss]]:
    """Every FFN of a trace (each output projection at most once), and the explained near-misses."""
    matches: list[Match] = []
    misses: list[Miss] = []
    for node in trace.nodes:
        if projection(trace, node) is None:
            continue
        try:
            matches.append(match_at(trace, node))
        except _NotFFN as error:
            if error.reason:
                misses.append(Miss(node.target, error.reason))
    return matches, misses
