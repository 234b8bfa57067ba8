"""What surrounds an FFN-shaped match in a trace: whether it is a block's FFN, and why not.

A match of projection -> activation -> projection is an FFN of its block when its input is the
block's hidden states (not a pooled summary, not another layer's activation) and its output goes
back to the residual stream (not into another projection: a head). When the region between two
projections is no activation, `explain` says what it is, when that is worth saying.
"""

from __future__ import annotations

from torch import nn

from moeify.surgery.ops import (
    ACTIVATIONS,
    ATTENTION,
    CONVOLUTIONS,
    ELEMENTWISE,
    PASS_THROUGH,
    POOLINGS,
    REDUCTIONS,
    dropout_p,
    op_name,
    projection,
)
from moeify.surgery.trace import Node, Ref, Trace


def _convolution(trace: Trace, node: Node) -> str:
    """The reason a convolution over tokens gives, if `node` is one (empty otherwise)."""
    if node.kind == "module":
        module = trace.modules[node.target]
        if isinstance(module, nn.modules.conv._ConvNd) and max(module.kernel_size) > 1:
            return (
                f"convolutional FFN: {node.target} (kernel {tuple(module.kernel_size)}) mixes neighbouring tokens "
                "between the projections, so the FFN is not token-wise"
            )
        return ""
    if op_name(node) in CONVOLUTIONS:
        return "convolutional FFN: a convolution between the projections mixes neighbouring tokens"
    return ""


def explain(trace: Trace, node: Node) -> str:
    """Why a non-elementwise node between two projections rules the FFN out (empty: it is no FFN,
    nothing worth saying). Looked for upstream of `node`, up to the projection it starts from: a
    convolution over tokens, attention concatenated with the MLP activations, or a reduction
    over the token positions."""
    upstream = _upstream(trace, node)
    if upstream is None:
        return ""  # no projection behind it: not between two projections
    if op_name(node) == "cat" and any(op_name(n) in ATTENTION for n in upstream):
        return (
            "parallel attention + MLP block: the MLP activations are concatenated with the attention output and "
            "projected together, so the MLP cannot be replaced token-wise on its own"
        )
    for candidate in upstream:
        reason = _convolution(trace, candidate)
        if reason:
            return reason
        if candidate.kind == "module" and isinstance(trace.modules[candidate.target], nn.modules.batchnorm._BatchNorm):
            return (
                f"not token-wise: batch normalization ({candidate.target}) between the projections mixes the tokens "
                "of a batch in training"
            )
    if op_name(node) in REDUCTIONS:
        return f"not token-wise: a {op_name(node)} between the projections reduces over the token positions"
    return ""


def _upstream(trace: Trace, node: Node, limit: int = 24) -> list[Node] | None:
    """`node` and the nodes feeding it, back to (not through) projections; None if no projection
    feeds it within `limit` nodes (it is not between two projections)."""
    seen: list[Node] = []
    frontier, reached = [node], False
    while frontier and len(seen) < limit:
        current = frontier.pop(0)
        if current in seen:
            continue
        if projection(trace, current) is not None:
            reached = True
            continue
        if current.kind == "input":
            continue
        seen.append(current)
        frontier.extend(trace.node(r) for r in current.refs())
    return seen if reached else None


def pooled(trace: Trace, x: Ref) -> bool:
    """`x` comes from a pooling or a mean over positions (possibly through a reshape)."""
    node = trace.node(x)
    for _ in range(3):
        if node.kind == "module":
            if isinstance(
                trace.modules[node.target], (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AvgPoolNd)
            ):
                return True
        elif op_name(node) in POOLINGS or op_name(node) == "mean":
            rank = trace.value(node.refs()[0]).dim() if node.refs() else 0
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            if op_name(node) in POOLINGS or any(
                isinstance(d, int) and d % max(rank, 1) not in (0, rank - 1) for d in dims
            ):
                return True
        if node.kind == "input" or not node.refs():
            return False
        node = trace.node(node.refs()[0])
    return False


# Ops that carry an FFN's output on towards the residual add: element-wise ones (a gate, a layer
# scale, a clamp), dropouts, casts, reshapes back to the block's layout.
_CARRY = ELEMENTWISE | PASS_THROUGH | frozenset({"permute", "transpose", "reshape", "view", "flatten", "movedim"})


def feeds_residual(trace: Trace, y: Ref, limit: int = 12) -> str | None:
    """Where the FFN output `y` goes, through gates, scales, dropouts, norms and reshapes only:
    "add" (the residual stream), "out" (it leaves the trace: what happens next cannot be seen
    here), or None when it feeds another projection first: then it is a layer of a prediction
    head (box_head = lin -> relu -> lin -> relu -> lin), not an FFN of the stream."""
    frontier, seen, leaves = [y], 0, False
    while frontier and seen < limit:
        ref = frontier.pop()
        seen += 1
        for index in trace.consumers(ref):
            if index < 0:
                leaves = True
                continue
            node = trace.nodes[index]
            name = op_name(node) if node.kind == "func" else ""
            if name in ("add", "sub") or dropout_p(trace, node) is not None:
                if name in ("add", "sub"):
                    return "add"
            elif not (
                name in _CARRY or (node.kind == "module" and projection(trace, node) is None and len(node.outputs) == 1)
            ):
                continue
            frontier.extend(Ref(index, pos) for pos in range(len(node.outputs)))
    return "out" if leaves else None


def follows_activation(trace: Trace, x: Ref) -> bool:
    """Whether the FFN input `x` is an activation of another projection's output (through dropouts
    and casts): the FFN is then a later layer of a multi-layer MLP (a head), not a block's FFN,
    whose input is a norm or the residual stream itself. An activation: a function such as relu, or
    a leaf module without parameters (a norm has its gain)."""
    node = trace.node(x)
    while (
        node.kind != "input" and (dropout_p(trace, node) is not None or op_name(node) in PASS_THROUGH) and node.refs()
    ):
        node = trace.node(node.refs()[0])
    if node.kind == "module":
        module = trace.modules[node.target]
        activation = projection(trace, node) is None and next(module.parameters(), None) is None
    else:
        activation = op_name(node) in ACTIVATIONS
    if not activation or len(node.refs()) != 1:
        return False
    return projection(trace, trace.node(node.refs()[0])) is not None
