"""Recognise token-wise FFNs in a recorded forward (`moeify.surgery.trace`) by what they compute.

An FFN is an output projection whose input is a token-wise, parameter-light function (the
*region*) of one or two input projections of the same tensor `x`:

    mlp          out(f(in(x)))                      f: any activation, module or functions
    gated        out(f(gate(x)) * up(x))            SwiGLU / GEGLU with separate projections
    fused_gated  out(f(g) * u), g, u = in(x) split  Phi-3's gate_up_proj, diffusers' GEGLU

A projection is a leaf module with a 2-D weight (nn.Linear, GPT-2's Conv1D) applied to the last
dimension. The region may hold any torch function from `ELEMENTWISE`, splits of the last
dimension, dropout, and parameter-free or norm-like leaf modules that keep the shape (activation
modules, a LayerNorm inside the FFN); anything else (attention, a convolution over tokens, a
concatenation with another branch) means no FFN, and some of those are reported as `Miss`es
with the reason, for the error a user reads when nothing was found.

Shape legend: T tokens, D model dim, I intermediate dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeify.surgery.compare import relative_error
from moeify.surgery.trace import Node, Ref, Trace, is_leaf

# Functions (by name: torch.x, Tensor.x, F.x and their dunder / in-place forms) that act on each
# element alone, so on each token alone, whatever the tensor's rank.
ELEMENTWISE = frozenset(
    """add sub rsub mul div true_divide pow neg abs exp exp2 log log1p log2 expm1 sqrt rsqrt square
    reciprocal tanh sigmoid erf erfc erfinv sin cos clamp clip clamp_min clamp_max minimum maximum where
    sign floor ceil round trunc gt lt ge le eq ne logical_not logical_and logical_or
    gelu silu relu relu6 leaky_relu elu selu celu mish softplus hardswish hardsigmoid hardtanh logsigmoid
    softsign tanhshrink threshold
    to float half bfloat16 double type type_as contiguous clone detach""".split()
)
DROPOUT = frozenset({"dropout", "feature_dropout", "alpha_dropout"})
# Reductions that stay token-wise when they run over the channels with keepdim (split_dim checks).
CHANNEL_REDUCTIONS = frozenset({"mean", "std", "var", "sum", "amax", "amin", "norm", "logsumexp"})
SPLITS = frozenset({"chunk", "split", "tensor_split", "getitem", "narrow", "unbind"})
# Token-mixing ops that make a near-miss worth explaining.
_CONVOLUTIONS = frozenset({"conv1d", "conv2d", "conv3d"})
_ATTENTION = frozenset({"scaled_dot_product_attention", "softmax", "matmul", "bmm", "baddbmm", "einsum"})
# Poolings: an MLP on their output (squeeze-and-excitation) acts on a summary, not on tokens.
_POOLINGS = frozenset(
    {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d"}
)
_REDUCTIONS = frozenset(
    {"norm", "vector_norm", "linalg_vector_norm", "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "cumsum"}
)


def base_name(name: str) -> str:
    """`add`, `__iadd__`, `__radd__` and `add_` all read as `add`."""
    name = name.strip("_")
    if name.startswith(("r", "i")) and name[1:] in ELEMENTWISE and name not in ELEMENTWISE:
        name = name[1:]  # __radd__, __imul__
    return name[:-1] if name.endswith("_") and name[:-1] in ELEMENTWISE else name


def op_name(node: Node) -> str:
    """The base name of a node's function (`torch.add`, `Tensor.__iadd__`: "add")."""
    return base_name(getattr(node.target, "__name__", "") or "")


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


def pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 convolution: a projection of the channels (dim 1) at every position (grouped: a
    block-diagonal one)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and all(k == 1 for k in module.kernel_size)
        and all(s == 1 for s in module.stride)
        and all(d == 1 for d in module.dilation)
        and (module.padding in ("valid", "same") or all(p == 0 for p in module.padding))
    )


def projection(trace: Trace, node: Node) -> nn.Module | None:
    """The leaf module of a node if it projects one tensor's last dimension (a 2-D weight:
    nn.Linear, GPT-2's Conv1D) or its channels (a 1x1 convolution)."""
    if node.kind != "module":
        return None
    module = trace.modules[node.target]
    weight = getattr(module, "weight", None)
    refs = node.refs()
    if not isinstance(weight, Tensor) or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return None
    # Called with the tensor alone, returning it alone: what a SplitEntry or a MoE layer can stand for.
    if len(refs) != 1 or not node.single or tuple(node.args) != (refs[0],):
        return None
    x, y = trace.value(refs[0]), node.out()
    if pointwise_conv(module):
        same = x.dim() == len(module.kernel_size) + 2 and x.shape[:1] + x.shape[2:] == y.shape[:1] + y.shape[2:]
        return module if same else None
    if weight.dim() != 2 or x.dim() < 2 or x.shape[:-1] != y.shape[:-1]:
        return None
    return module


def channel_dim(trace: Trace, node: Node) -> int:
    """The (non-negative) dimension a projection node projects: 1 for a 1x1 convolution."""
    rank = trace.value(node.refs()[0]).dim()
    return 1 if isinstance(trace.modules[node.target], nn.modules.conv._ConvNd) else rank - 1


def dropout_p(trace: Trace, node: Node) -> float | None:
    """p of a dropout node (functional or nn.Dropout), None if the node is no dropout."""
    if node.kind == "module":
        module = trace.modules[node.target]
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return float(module.p)
        # Stochastic depth (timm's DropPath and its copies) drops whole samples, which no per-token
        # dropout reproduces; at rate 0 it is the identity, the only case read as a dropout here.
        return 0.0 if getattr(module, "drop_prob", None) == 0 and is_leaf(module) else None
    if op_name(node) not in DROPOUT:
        return None
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return float(p)


def sliced(index: object, rank: int) -> tuple[int, slice] | None:
    """(dim, slice) if indexing a rank-`rank` tensor with `index` slices one dimension and keeps
    every other whole (`x[..., :n]`, `x[:, n:]`); None otherwise."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (rank - len(index))
    if len(index) != rank or not all(isinstance(i, slice) for i in index):
        return None
    cut = [(dim, i) for dim, i in enumerate(index) if i != slice(None)]
    return cut[0] if len(cut) == 1 else None


def split_dim(trace: Trace, node: Node) -> int | None:
    """The (non-negative) dimension a split node divides (chunk, split, narrow, a slice), or a
    keepdim reduction reduces (a per-token mean or std over the channels, as Gemma 3n's activation
    sparsity takes), or None when the node is neither over one dimension."""
    name = op_name(node)
    if node.kind != "func" or name not in SPLITS | CHANNEL_REDUCTIONS or not node.refs():
        return None
    rank = trace.value(node.refs()[0]).dim()
    if name == "getitem":
        found = sliced(node.args[1], rank) if len(node.args) > 1 else None
        return found[0] if found else None
    if name in CHANNEL_REDUCTIONS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
        if not node.kwargs.get("keepdim", False):
            return None
    else:
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim % rank if isinstance(dim, int) and -rank <= dim < rank else None


def is_constant(trace: Trace, node: Node) -> bool:
    """A function of constants only (`torch.tensor(0.95)` and what is computed from it): it has
    one value, whatever the tokens."""
    if node.kind != "func":
        return False
    memo = trace.__dict__.setdefault("_constant", {})
    if node.index not in memo:
        memo[node.index] = all(is_constant(trace, trace.node(r)) for r in node.refs())
    return memo[node.index]


def is_split(trace: Trace, node: Node) -> bool:
    return split_dim(trace, node) is not None


def _elementwise(trace: Trace, node: Node) -> bool:
    """May this node sit between an FFN's projections? Functions that act element by element (or
    split the channels), and leaf modules that keep the shape and are no projection (activation
    modules, a norm, a per-channel gain): what such a module does to other tokens the token-wise
    check tells afterwards (moeify.surgery.discover)."""
    if node.kind == "module":
        module = trace.modules[node.target]
        refs = node.refs()
        keeps_shape = len(refs) == 1 and len(node.outputs) == 1 and trace.value(refs[0]).shape == node.out().shape
        drops_samples = getattr(module, "drop_prob", 0) != 0  # stochastic depth: not per token
        batch_statistics = isinstance(module, nn.modules.batchnorm._BatchNorm)  # mixes the batch in training
        convolution = isinstance(module, nn.modules.conv._ConvNd)  # over neighbouring tokens, or a projection
        return (
            keeps_shape and not (drops_samples or batch_statistics or convolution) and projection(trace, node) is None
        )
    if node.kind != "func":
        return False
    if is_constant(trace, node):
        return True  # a constant the forward makes (`torch.tensor(0.79)`): replayed as a value
    name = op_name(node)
    return name in ELEMENTWISE or name in DROPOUT or is_split(trace, node)


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
    if op_name(node) in _CONVOLUTIONS:
        return "convolutional FFN: a convolution between the projections mixes neighbouring tokens"
    return ""


def _explain(trace: Trace, node: Node) -> str:
    """Why a non-elementwise node between two projections rules the FFN out (empty: it is no FFN,
    nothing worth saying). Looked for upstream of `node`, up to the projection it starts from: a
    convolution over tokens, attention concatenated with the MLP activations, or a reduction
    over the token positions."""
    upstream = _upstream(trace, node)
    if upstream is None:
        return ""  # no projection behind it: not between two projections
    if op_name(node) == "cat" and any(op_name(n) in _ATTENTION for n in upstream):
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
    if op_name(node) in _REDUCTIONS:
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
        if not _elementwise(trace, node):
            raise _NotFFN(_explain(trace, node))
        region.add(index)
        stack.extend(ref.node for ref in node.refs())
    return region, sorted(leaves)


def _pooled(trace: Trace, x: Ref) -> bool:
    """`x` comes from a pooling or a mean over positions (possibly through a reshape)."""
    node = trace.node(x)
    for _ in range(3):
        if node.kind == "module":
            if isinstance(
                trace.modules[node.target], (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AvgPoolNd)
            ):
                return True
        elif op_name(node) in _POOLINGS or op_name(node) == "mean":
            rank = trace.value(node.refs()[0]).dim() if node.refs() else 0
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            if op_name(node) in _POOLINGS or any(
                isinstance(d, int) and d % max(rank, 1) not in (0, rank - 1) for d in dims
            ):
                return True
        if node.kind == "input" or not node.refs():
            return False
        node = trace.node(node.refs()[0])
    return False


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


# Ops that change no value: a layout, a copy, or a dtype cast (Beam computes its SwiGLU in fp32 and
# casts back; the experts compute in their own dtype, within the identity check's tolerance).
_PASS_THROUGH = frozenset({"contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type", "type_as"})


def _strip(trace: Trace, ref: Ref, region: set[int]) -> tuple[Ref, float]:
    """Walk back over trailing dropouts and pass-through ops: the ref before them, and their p."""
    p = 0.0
    while ref.node in region:
        node = trace.node(ref)
        rate = dropout_p(trace, node)
        if rate is None and not (op_name(node) in _PASS_THROUGH and node.kind == "func"):
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


# The nonlinearities that make a side of `f(a) * g(b)` the gate (a clamp on the other side does not).
_ACTIVATIONS = frozenset(
    """gelu silu relu relu6 leaky_relu elu selu celu mish softplus hardswish hardsigmoid hardtanh logsigmoid
    softsign tanhshrink tanh sigmoid erf exp""".split()
)


def _activates(trace: Trace, nodes: tuple[int, ...]) -> bool:
    return any(trace.nodes[i].kind == "module" or op_name(trace.nodes[i]) in _ACTIVATIONS for i in nodes)


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
    if _pooled(trace, x):
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


def _is_norm(trace: Trace, node: Node) -> bool:
    """A leaf module that is scale-invariant on what it saw (a LayerNorm or RMSNorm without bias:
    norm(2x) == norm(x)); no activation is."""
    module, x = trace.modules[node.target], trace.value(node.refs()[0])
    try:
        with torch.no_grad():
            doubled = module(2 * x)
    except Exception:  # noqa: BLE001 - cannot tell: not a norm
        return False
    if not isinstance(doubled, Tensor) or doubled.shape != node.out().shape:
        return False
    return relative_error(doubled, node.out()) < 1e-4  # relative: weights of 1e-10 (SAM's init) are not zero


def _nonlinear(trace: Trace, nodes: tuple[int, ...]) -> bool:
    """Something in the activation other than norms, casts and no-ops: two projections with only a
    norm between them are a factored projection (DeepSeek's low-rank attention), not an FFN."""
    for index in nodes:
        node = trace.nodes[index]
        if node.kind == "module" and not _is_norm(trace, node):
            return True
        if node.kind == "func" and node.refs() and op_name(node) not in _PASS_THROUGH:
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


# Ops that carry an FFN's output on towards the residual add: element-wise ones (a gate, a layer
# scale, a clamp), dropouts, casts, reshapes back to the block's layout.
_CARRY = ELEMENTWISE | _PASS_THROUGH | frozenset({"permute", "transpose", "reshape", "view", "flatten", "movedim"})


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
        node.kind != "input" and (dropout_p(trace, node) is not None or op_name(node) in _PASS_THROUGH) and node.refs()
    ):
        node = trace.node(node.refs()[0])
    if node.kind == "module":
        module = trace.modules[node.target]
        activation = projection(trace, node) is None and next(module.parameters(), None) is None
    else:
        activation = op_name(node) in _ACTIVATIONS
    if not activation or len(node.refs()) != 1:
        return False
    return projection(trace, trace.node(node.refs()[0])) is not None


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
