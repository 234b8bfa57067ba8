"""Discovery by dataflow: run a block once on a tiny input, recognise its FFNs in the recorded
graph, place them, and check what was found numerically.

`Analyser.analyse(module)` traces a module alone on random hidden states `[2, 4, D]` (every other
required argument None) and caches the result per structure (class + submodule layout), so a
30-layer model is traced once per distinct block, not once per layer. A module that cannot run
alone (its forward needs a mask, rotary embeddings, a timestep...) is reported as such and the
caller looks at its children instead. A meta-device module (a model rebuilt for loading) is
traced on a copy with random CPU weights: only its structure matters here.

Each FFN found passes two checks before it is reported:
- replay: the recorded FFN, replayed from the recorded input, reproduces the recorded output;
- token-wise: permuting the tokens permutes the outputs (a hidden token mixer is refused).
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moeify.architectures.layouts import FFNLayout
from moeify.surgery.compare import relative_error, tolerance_for
from moeify.surgery.context import feeds_residual, follows_activation
from moeify.surgery.dataflow import Match, Miss, match_ffns
from moeify.surgery.placement import place
from moeify.surgery.trace import Trace, eval_mode, is_leaf, record

TOKENS = (2, 4)  # batch, tokens per sample: small, but enough to see a token mixer


@dataclass(frozen=True)
class Found:
    path: str  # the site, relative to the analysed module ("" = the module itself)
    layout: FFNLayout
    calls: int  # runs per forward of the analysed module (> 1: one module serving several depths)


@dataclass
class Analysis:
    error: str | None  # why the module could not run alone; None: it ran
    found: list[Found] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    ran: frozenset[str] = frozenset()  # paths of the submodules that ran, and of their ancestors


def _is_projection(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding)


# A transformer block holds at least its attention's and its FFN's projections.
BLOCK_PROJECTIONS = 4


def _is_stack(module: nn.Module) -> bool:
    """A list of repeated blocks (two containers of one class, each with an attention's and an
    FFN's worth of projections): traced block by block instead. A list of small FFNs inside a
    block (MobileBERT's) is no stack."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    kinds = [type(m) for m in module.children() if not is_leaf(m) and _projections(m) >= BLOCK_PROJECTIONS]
    return len(kinds) != len(set(kinds))


def _projections(module: nn.Module) -> int:
    return sum(pointwise_shape(sub) is not None for sub in module.modules())


# An embedding this large holds a vocabulary: its module is a whole model, not a block (a block may
# hold a small one: relative positions, the condition ids of an adaptive norm).
VOCABULARY = 8192


def worth_tracing(module: nn.Module) -> bool:
    """Cheap static filters: a module that could hold an FFN and whose trace stays small."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or is_leaf(module):
        return False
    for sub in module.modules():
        vocabulary = isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.num_embeddings >= VOCABULARY
        if vocabulary or _is_stack(sub):
            return False  # a whole model or a stack of blocks: look at the blocks
    return _projections(module) >= 2


def pointwise_shape(module: nn.Module) -> tuple[int, int] | None:
    """[out, in] of a projection or of a 1x1 convolution (a projection of the channels)."""
    weight = getattr(module, "weight", None)
    if not is_leaf(module) or not isinstance(weight, Tensor) or isinstance(module, nn.Embedding):
        return None
    if weight.dim() == 2 or (weight.dim() > 2 and all(k == 1 for k in weight.shape[2:])):
        return weight.shape[0], weight.shape[1]
    return None


def ffn_shaped(module: nn.Module, leaves: list[nn.Module] | None = None) -> bool:
    """Two projections (or 1x1 convolutions) that could chain D -> I -> D with I > D (weights
    [I, D] or a fused [2I, D], then [D, I]): an FFN may hide there. FFNs expand; an attention
    block's D -> D projections, a low-rank query (D -> r -> D) or a squeeze-excitation do not.
    `leaves`: look at these instead of all of the module's."""
    shapes = {s for s in map(pointwise_shape, leaves if leaves is not None else module.modules()) if s is not None}
    return any(
        d_out == d_in and i_in > d_in and i_out in (i_in, 2 * i_in) for i_out, d_in in shapes for d_out, i_in in shapes
    )


def hidden_size(module: nn.Module) -> int | None:
    """The width of the hidden states a block takes: the input width of its first leaf with a
    weight (a projection's in_features, a 1x1 convolution's in_channels, a norm's size)."""
    for sub in module.modules():
        weight = getattr(sub, "weight", None) if is_leaf(sub) else None
        if isinstance(weight, Tensor) and weight.dim() >= 1:
            if type(sub).__name__ == "Conv1D" and weight.dim() == 2:
                return weight.shape[0]  # GPT-2's Conv1D stores [in, out]
            if isinstance(sub, nn.modules.conv._ConvNd):
                return sub.in_channels
            if weight.dim() == 2:
                return weight.shape[1]
            return weight.shape[0] if weight.dim() == 1 else None
    return None


def probe_shapes(module: nn.Module, width: int) -> list[tuple[int, ...]]:
    """Hidden states to try: tokens [B, T, D]; then, for a block with convolutions, channels first
    [B, D, *positions] with as many position dimensions as its convolutions take."""
    shapes = [(*TOKENS, width)]
    positions = {len(m.kernel_size) for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    shapes += [(TOKENS[0], width, *([TOKENS[1]] * n)) for n in sorted(positions)]
    return shapes


def _required_after_first(module: nn.Module) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [p.name for p in required[1:]]


def _attempts(module: nn.Module, x: Tensor) -> list[dict[str, Tensor | None]]:
    """Keyword arguments for the required parameters after the hidden states, tried in turn:
    None (masks, caches, optional conditioning); tensors like the hidden states (a residual the
    FFN adds itself: `BloomMLP.forward(hidden_states, residual)`); all-ones attention masks,
    [B, 1, T, T] then [B, T] (ones mask nothing whether a mask is read as booleans, as a
    multiplier or added to the scores, where a constant shift leaves the softmax unchanged)."""
    names = _required_after_first(module)
    if not names:
        return [{}]
    generator = torch.Generator().manual_seed(1)
    batch, tokens = x.shape[:2]
    masks = [n for n in names if "mask" in n]
    attempts: list[dict[str, Tensor | None]] = [
        dict.fromkeys(names),
        {n: torch.randn(x.shape, generator=generator).to(x) for n in names},
    ]
    for shape in ((batch, 1, tokens, tokens), (batch, tokens)):
        if masks:
            attempts.append({**dict.fromkeys(names), **{n: x.new_ones(shape) for n in masks}})
    return attempts


# Attributes that number a block's position (`layer_idx`) differ between blocks that compute alike.
_POSITION = re.compile(r"(^|_)(idx|index|id|number)$")
_PRIMITIVE = (bool, int, float, str, type(None))


def _settings(module: nn.Module) -> tuple:
    """The plain attributes a forward may branch on or read as constants (`approximate="tanh"`, a
    dropout rate, `self.act = F.silu`), positions left out."""
    found = []
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training" or _POSITION.search(key):
            continue
        if isinstance(value, _PRIMITIVE) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _PRIMITIVE) for v in value)
        ):
            found.append((key, repr(value)))
        elif callable(value) and not isinstance(value, nn.Module) and hasattr(value, "__qualname__"):
            found.append((key, f"{getattr(value, '__module__', '')}.{value.__qualname__}"))
    return tuple(sorted(found))


def signature(module: nn.Module) -> tuple:
    """Two modules with equal signatures compute alike: same class, same submodule tree, same
    settings. What is recorded for one (an activation's constants) then holds for the other."""
    return tuple(
        (name, type(sub).__module__, type(sub).__qualname__, _settings(sub)) for name, sub in module.named_modules()
    )


def _materialised(module: nn.Module) -> nn.Module:
    """A copy with random CPU weights, for tracing a meta-device module (structure only)."""
    clone = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                value = torch.randn(param.shape, generator=generator).mul_(0.02).to(param.dtype)
                sub._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_meta:
                sub._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    return clone


def act_module(layout: FFNLayout, site: nn.Module) -> nn.Module:
    """The activation module a layout gives the experts of `site`."""
    return layout.act(site) if callable(layout.act) else site.get_submodule(layout.act)


def _check(dense: nn.Module, x: Tensor, y: Tensor, channel: int) -> str | None:
    """Why a found FFN (`dense`: its recorded computation, replayed) fails the replay or the
    token-wise check (None: it passes). `channel`: the dimension of the features; every other
    one indexes tokens (positions of a channels-first tensor)."""
    if x.numel() == 0:
        return "ran on no tokens in the trace, so it cannot be checked"
    tolerance = tolerance_for(x.dtype, 1e-5)
    with torch.no_grad(), eval_mode(dense):
        if relative_error(dense(x), y) > tolerance:
            return "replaying the recorded FFN does not reproduce what the block computed (data-dependent code?)"
        x_last, y_last = x.movedim(channel, -1), y.movedim(channel, -1)
        tokens_TD = x_last.reshape(-1, x.shape[channel])
        order = torch.randperm(tokens_TD.shape[0], generator=torch.Generator().manual_seed(0))
        permuted_x = tokens_TD[order].reshape(x_last.shape).movedim(-1, channel)
        permuted = dense(permuted_x).movedim(channel, -1).reshape(-1, y.shape[channel])
        if relative_error(permuted, y_last.reshape(-1, y.shape[channel])[order]) > tolerance:
            return "not token-wise: permuting the tokens changes its outputs beyond the permutation"
    return None


def _rows_check(act: nn.Module, source: Tensor, result: Tensor, channel: int) -> str | None:
    """Why the activation, applied to the intermediate as rows [A, I] (as the experts apply it),
    does not reproduce what the block computed (None: it does)."""
    rows = source.movedim(channel, -1).reshape(-1, source.shape[channel])
    expected = result.movedim(channel, -1).reshape(-1, result.shape[channel])
    try:
        with torch.no_grad(), eval_mode(act):
            out = act(rows)
    except Exception as error:  # the reason is reported
        return f"its activation does not run on tokens one at a time ({type(error).__name__}: {error})"[:300]
    if out.shape != expected.shape or relative_error(out, expected) > tolerance_for(rows.dtype, 1e-5):
        return "its activation, applied to tokens one at a time, computes something else than in the block"
    return None


def _not_a_block_ffn(trace: Trace, match: Match) -> str:
    """Why an FFN-shaped match is no FFN of a block's residual stream (empty: it is one)."""
    x, y = trace.value(match.x), trace.value(match.y)
    goes = feeds_residual(trace, match.y)
    if goes is None or follows_activation(trace, match.x):
        return "a layer of a multi-layer MLP head (its input or output is another layer's), not a block's FFN"
    if x.shape[match.channel] != y.shape[match.channel] and goes != "add":
        # A projector or a head (D -> V); an FFN of another width (LightGlue's, on a concatenation)
        # only where the trace shows its output reach the residual add.
        return "output size differs from input size: not a residual FFN"
    return ""


class Analyser:
    """Traces modules and remembers the result per structure."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Analysis] = {}

    def analyse(self, module: nn.Module) -> Analysis:
        key = signature(module)
        if key not in self._cache:
            self._cache[key] = self._analyse(module)
        return self._cache[key]

    def analyse_on(self, module: nn.Module, args: tuple, kwargs: dict) -> Analysis:
        """Trace a module on the inputs it received in a real forward (a block that cannot run
        alone); cached per structure like `analyse`."""
        key = (signature(module), "inputs")
        if key not in self._cache:
            try:
                trace = record(module, args, kwargs)
            except Exception as error:  # reported, as for `analyse`
                self._cache[key] = Analysis(
                    f"did not run on its recorded inputs ({type(error).__name__}: {error})"[:300]
                )
            else:
                self._cache[key] = self._read(trace, module)
        return self._cache[key]

    def _analyse(self, module: nn.Module) -> Analysis:
        width = hidden_size(module)
        if width is None:
            return Analysis("no weight to tell the width of its hidden states")
        tensors = [*module.parameters(), *module.buffers()]
        meta = any(t.is_meta for t in tensors)
        target = _materialised(module) if meta else module
        first = next((t for t in target.parameters() if t.is_floating_point()), None)
        dtype = first.dtype if first is not None else torch.float32
        device = first.device if first is not None else torch.device("cpu")
        failure, tried = "", (*TOKENS, width)
        for shape in probe_shapes(target, width):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
            for kwargs in _attempts(target, x):
                try:
                    trace = record(target, (x,), kwargs)
                except Exception as error:  # any failure means "cannot run alone"
                    failure = failure or f"{type(error).__name__}: {error}"
                    continue
                return self._read(trace, target)
        return Analysis(f"cannot run alone on hidden states {tried} ({failure})"[:300])

    def _read(self, trace: Trace, root: nn.Module) -> Analysis:
        matches, misses = match_ffns(trace)
        kept = []
        for match in matches:
            reason = _not_a_block_ffn(trace, match)
            if reason:
                misses.append(Miss(match.proj_out, reason))
            else:
                kept.append(match)
        # Only FFNs that stay may claim the modules they use (a ReLU module shared by the layers
        # of a head must not become an identity because one pair of them looked like an FFN).
        all_ffn = {i for m in kept for i in m.nodes}
        found: dict[str, Found] = {}
        calls: dict[str, int] = {}
        for match in kept:
            calls[match.proj_out] = calls.get(match.proj_out, 0) + 1
            if match.proj_out in found or any(m.where == match.proj_out for m in misses):
                continue
            placed = place(trace, match, all_ffn)
            if isinstance(placed, str):
                misses.append(Miss(match.proj_out, placed))
                continue
            site = root.get_submodule(placed.site) if placed.site else root
            dense = placed.program.build(site, copy_modules=False)
            problem = _check(dense, trace.value(match.x), trace.value(match.y), match.channel) or _rows_check(
                act_module(placed.layout, site),
                trace.value(match.act_source),
                trace.value(match.act_result),
                match.channel,
            )
            if problem:
                misses.append(Miss(match.proj_out, problem))
                continue
            found[match.proj_out] = Found(placed.site, placed.layout, 1)
        results = [Found(f.path, f.layout, calls[proj_out]) for proj_out, f in found.items()]
        called = {c.path for c in trace.calls} | {n.target for n in trace.nodes if n.kind == "module"}
        ancestors = {path.rsplit(".", i)[0] for path in called for i in range(1, path.count(".") + 1)}
        return Analysis(None, results, misses, frozenset(called | ancestors))
