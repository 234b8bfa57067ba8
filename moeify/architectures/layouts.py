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
from dataclasses import dataclass

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
    proj_gate: path of the gate projection ("gated" only).
    gate_first: "fused_gated" only: whether the gate is the first half of proj_in's output.
    mid_dropout / out_dropout: paths of nn.Dropout modules after the activation / projection.
    install_at: where the MoE layer goes ("" = the site itself).
    identities: modules of a split FFN, after `install_at`, replaced by nn.Identity.
    """

    kind: str
    proj_in: str
    proj_out: str
    act: str | Callable[[nn.Module], nn.Module]
    proj_gate: str | None = None
    gate_first: bool = True
    mid_dropout: str | None = None
    out_dropout: str | None = None
    install_at: str = ""
    identities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"FFNLayout.kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "gated") != (self.proj_gate is not None):
            raise ValueError("FFNLayout: proj_gate is required for kind='gated' and only for it")

    def chain(self, site: nn.Module) -> list[nn.Module]:
        """The modules the MoE layer replaces, in call order: calling them one after the other is
        the dense FFN (the reference of the identity check)."""
        return [get(site, self.install_at)] + [get(site, path) for path in self.identities]


@dataclass(frozen=True)
class Piece:
    """A block of rows of a packed tensor, read from one of the FFN's own parameters.

    `transposed`: GPT-2's Conv1D stores [in, out]. `half`: one half of the parameter's rows
    (diffusers' fused projections are [up; gate], packed as [gate; up]).
    """

    param: Tensor
    transposed: bool = False
    half: int | None = None

    def value(self) -> Tensor:
        t = self.param.t() if self.transposed else self.param
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


def projection(module: nn.Module) -> tuple[Piece, Piece | None]:
    """(weight [out, in], bias) of a Linear-like module, as pieces."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} is not a linear projection (no 2-D weight)")
    transposed = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    return Piece(weight, transposed=transposed), Piece(bias) if isinstance(bias, Tensor) else None


def _dropout_p(site: nn.Module, path: str | None) -> float:
    if path is None:
        return 0.0
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
            raise ValueError(f"gate {tuple(w_gate.value().shape)} and up {tuple(w_in.value().shape)} projections differ")
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
    act = layout.act(site) if callable(layout.act) else copy.deepcopy(get(site, layout.act))
    return FFNWeights(
        w_in=w_in_pieces,
        b_in=b_in_pieces,
        w_out=[w_out],
        b_out=None if b_out is None else [b_out],
        act=act,
        gated=gated,
        mid_dropout=_dropout_p(site, layout.mid_dropout),
        out_dropout=_dropout_p(site, layout.out_dropout),
    )
