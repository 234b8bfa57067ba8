"""The vocabulary of dataflow discovery: what a recorded node is.

Functions are known by their base name (`torch.add`, `Tensor.__iadd__` and `Tensor.add_` are all
"add"); leaf modules by what they did in the trace (a projection of the last dimension or of the
channels, a dropout, a norm). moeify.surgery.dataflow builds FFNs out of these; moeify.surgery.program
replays them; a checkpoint's recorded activation may name no other function (ALLOWED there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeify.surgery.compare import relative_error
from moeify.surgery.trace import Node, Trace, is_leaf

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
CONVOLUTIONS = frozenset({"conv1d", "conv2d", "conv3d"})

ATTENTION = frozenset({"scaled_dot_product_attention", "softmax", "matmul", "bmm", "baddbmm", "einsum"})

# Poolings: an MLP on their output (squeeze-and-excitation) acts on a summary, not on tokens.
POOLINGS = frozenset(
    {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d"}
)

REDUCTIONS = frozenset(
    {"norm", "vector_norm", "linalg_vector_norm", "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "cumsum"}
)

# Ops that change no value: a layout, a copy, or a dtype cast (Beam computes its SwiGLU in fp32 and
# casts back; the experts compute in their own dtype, within the identity check's tolerance).
PASS_THROUGH = frozenset({"contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type", "type_as"})

# The nonlinearities that make a side of `f(a) * g(b)` the gate (a clamp on the other side does not).
ACTIVATIONS = frozenset(
    """gelu silu relu relu6 leaky_relu elu selu celu mish softplus hardswish hardsigmoid hardtanh logsigmoid
    softsign tanhshrink tanh sigmoid erf exp""".split()
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


def elementwise(trace: Trace, node: Node) -> bool:
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


def is_norm(trace: Trace, node: Node) -> bool:
    """A leaf module that is scale-invariant on what it saw (a LayerNorm or RMSNorm without bias:
    norm(2x) == norm(x)); no activation is."""
    module, x = trace.modules[node.target], trace.value(node.refs()[0])
    try:
        with torch.no_grad():
            doubled = module(2 * x)
    except Exception:  # cannot tell: not a norm
        return False
    if not isinstance(doubled, Tensor) or doubled.shape != node.out().shape:
        return False
    return relative_error(doubled, node.out()) < 1e-4  # relative: weights of 1e-10 (SAM's init) are not zero
