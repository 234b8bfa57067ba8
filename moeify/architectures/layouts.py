"""FFN layouts as data: where an FFN's projections, activation and dropouts live, and how to read
its weights into the packed form `w_in [I_in, D]`, `w_out [D_out, I]`.

A layout is relative to its *site*, the module that holds the whole FFN. Most FFNs are one
module (`LlamaMLP`); some are split across a block (BERT's `intermediate` + `output.dense`, OPT's
`fc1`/`fc2` on the decoder layer): then the MoE layer is installed at `install_at` and the rest
of the chain (`identities`) becomes `nn.Identity`, leaving residuals and norms where they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

KINDS = ("mlp", "gated", "fused_gated")


@dataclass(frozen=True)
class FFNLayout:
    """How one FFN computes.

    kind: "mlp" (out(act(in(x)))), "gated" (out(act(gate(x)) * up(x)), separate gate/up),
        "fused_gated" (one projection yields both halves).
    proj_in: path of the input projection ("up" for gated kinds).
    proj_out: path of the output projection.
    act: path of the activation module, or a function of the site returning one.
    up_act: gated kinds: what the FFN applies to the up half before the product (GLM's clamp):
        a path or a function like `act`; None (the identity) for most.
    post_act: gated kinds: what it applies to the product (BitNet's norm); None for most.
    proj_gate: path of the gate projection ("gated" only).
    gate_first: "fused_gated" only: whether the gate is the first half of proj_in's output.
    mid_dropout / out_dropout: dropout after the activation / the output projection, applied by
        the experts: the path of an nn.Dropout, or its rate (a functional dropout).
    install_at: where the MoE layer goes ("" = the site itself).
    identities: modules of a split FFN, after `install_at`, replaced by nn.Identity.
    split: the FFN is inline in the site's forward with something between its projections that
        is not a module moeify may swap: `SplitEntry` takes the input projection(s)' place and the
        MoE layer (in a `SplitExit`) the output projection's (`install_at`; moeify.layers.wiring).
    residual: the site adds a forward argument to the FFN output itself (BloomMLP): its
        (position, name), position 0 being the hidden states; the MoE layer is wrapped in
        `AddResidual`.
    reference: the dense FFN as its block computes it, `reference(site)(x)`: the identity check's
        reference where the FFN is not a chain of modules (found by dataflow; None: `chain`).
    channels_first: the projections are 1x1 convolutions over [B, C, *positions]: the MoE layer
        is wrapped in `ChannelsFirst`, which hands it the positions as tokens.
    """

    kind: str
    proj_in: str
    proj_out: str
    act: str | Callable[[nn.Module], nn.Module]
    proj_gate: str | None = None
    gate_first: bool = True
    mid_dropout: str | float | None = None
    out_dropout: str | float | None = None
    install_at: str = ""
    identities: tuple[str, ...] = ()
    split: bool = False
    residual: tuple[int, str] | None = None
    reference: Callable[[nn.Module], Callable[[Tensor], Tensor]] | None = field(default=None, compare=False)
    channels_first: bool = False
    up_act: str | Callable[[nn.Module], nn.Module] | None = None
    post_act: str | Callable[[nn.Module], nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"FFNLayout.kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "gated") != (self.proj_gate is not None):
            raise ValueError("FFNLayout: proj_gate is required for kind='gated' and only for it")
        if self.split and (self.identities or self.residual or self.install_at != self.proj_out):
            raise ValueError("FFNLayout: a split FFN installs at proj_out, with no identities and no residual")

    @property
    def entries(self) -> tuple[str, ...]:
        """The input projections a split FFN's `SplitEntry` modules replace."""
        if not self.split:
            return ()
        return (self.proj_gate, self.proj_in) if self.proj_gate else (self.proj_in,)

    def chain(self, site: nn.Module) -> list[nn.Module]:
        """What computes the dense FFN, in call order (the reference of the identity check): the
        modules the MoE layer replaces, or the recorded `reference`."""
        if self.reference is not None:
            return [self.reference(site)]
        return [get(site, self.install_at)] + [get(site, path) for path in self.identities]


@dataclass(frozen=True)
class Piece:
    """A block of rows of a packed tensor, read from one of the FFN's own parameters.

    `transposed`: GPT-2's Conv1D stores [in, out]. `half`: one half of the parameter's rows
    (diffusers' fused projections are [up; gate], packed as [gate; up]). A 1x1 convolution's
    [out, in, 1, ...] weight reads as [out, in]; a grouped one's [out, in / groups, 1, ...] as the
    block-diagonal [out, in] it computes (a copy: its experts are dense clones of it).
    """

    param: Tensor
    transposed: bool = False
    half: int | None = None
    groups: int = 1

    def value(self) -> Tensor:
        t = self.param.t() if self.transposed else self.param
        t = t.flatten(1) if t.dim() > 2 else t
        if self.groups > 1:
            t = torch.block_diag(*t.chunk(self.groups))
        return t if self.half is None else t.chunk(2)[self.half]


@dataclass
class FFNWeights:
    """An FFN read into packed form, as pieces of its own parameters (no copies)."""

    w_in: list[Piece]  # rows stacked: [gate; up] for gated kinds, giving [I_in, D]
    b_in: list[Piece] | None
    w_out: list[Piece]  # [D_out, I]
    b_out: list[Piece] | None
    act: nn.Module
    gated: bool
    mid_dropout: float
    out_dropout: float
    up_act: nn.Module | None = None
    post_act: nn.Module | None = None

    @property
    def in_features(self) -> int:
        return self.w_in[0].value().shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w_out[0].value().shape[1]

    @property
    def out_features(self) -> int:
        return self.w_out[0].value().shape[0]

    @property
    def in_rows(self) -> int:
        return sum(piece.value().shape[0] for piece in self.w_in)

    @property
    def in_dtype(self) -> torch.dtype:
        return self.w_in[0].param.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return self.w_out[0].param.dtype

    @property
    def device(self) -> torch.device:
        return self.w_in[0].param.device


def get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def join(prefix: str, name: str) -> str:
    """A submodule path under `prefix` ("" is the root on either side)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def projection(module: nn.Module) -> tuple[Piece, Piece | None]:
    """(weight [out, in], bias) of a Linear-like module, as pieces."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    pointwise = isinstance(weight, Tensor) and weight.dim() > 2 and all(k == 1 for k in weight.shape[2:])
    if not isinstance(weight, Tensor) or (weight.dim() != 2 and not pointwise):
        raise ValueError(f"{type(module).__name__} is not a linear projection (no 2-D weight)")
    transposed = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    groups = getattr(module, "groups", 1) if pointwise else 1
    return Piece(weight, transposed=transposed, groups=groups), Piece(bias) if isinstance(bias, Tensor) else None


def _dropout_p(site: nn.Module, path: str | float | None) -> float:
    if path is None:
        return 0.0
    if isinstance(path, float):
        return path
    module = get(site, path)
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def read_weights(site: nn.Module, layout: FFNLayout) -> FFNWeights:
    """Read an FFN through its layout; raises ValueError when the module does not fit it."""
    w_in, b_in = projection(get(site, layout.proj_in))
    w_out, b_out = projection(get(site, layout.proj_out))
    w_in_pieces, b_in_pieces = [w_in], None if b_in is None else [b_in]
    if layout.kind == "gated":
        w_gate, b_gate = projection(get(site, layout.proj_gate))
        if w_gate.value().shape != w_in.value().shape or (b_gate is None) != (b_in is None):
            raise ValueError(
                f"gate {tuple(w_gate.value().shape)} and up {tuple(w_in.value().shape)} projections differ"
            )
        w_in_pieces = [w_gate, w_in]
        b_in_pieces = None if b_in is None else [b_gate, b_in]
    elif layout.kind == "fused_gated" and not layout.gate_first:
        # Canonical order is [gate; up] (transformers' gate_up_proj); diffusers' is [up; gate].
        w_in_pieces = [Piece(w_in.param, w_in.transposed, 1), Piece(w_in.param, w_in.transposed, 0)]
        b_in_pieces = None if b_in is None else [Piece(b_in.param, half=1), Piece(b_in.param, half=0)]
    gated = layout.kind != "mlp"
    rows = sum(p.value().shape[0] for p in w_in_pieces)
    inner = rows // 2 if gated else rows
    if w_out.value().shape[1] != inner or (gated and rows % 2):
        raise ValueError(
            f"projection shapes do not chain: in has {rows} rows, out is {tuple(w_out.value().shape)} (kind={layout.kind})"
        )
    act = _module(site, layout.act)
    up_act = _module(site, layout.up_act) if layout.up_act is not None else None
    post_act = _module(site, layout.post_act) if layout.post_act is not None else None
    return FFNWeights(
        w_in=w_in_pieces,
        b_in=b_in_pieces,
        w_out=[w_out],
        b_out=None if b_out is None else [b_out],
        act=act,
        gated=gated,
        mid_dropout=_dropout_p(site, layout.mid_dropout),
        out_dropout=_dropout_p(site, layout.out_dropout),
        up_act=up_act,
        post_act=post_act,
    )


def _module(site: nn.Module, act: str | Callable[[nn.Module], nn.Module]) -> nn.Module:
    """An activation for the experts: built by the layout, or a copy of the site's module."""
    return act(site) if callable(act) else copy.deepcopy(get(site, act))
