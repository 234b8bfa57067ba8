"""How a MoE layer takes the place of an FFN that is not simply a module `y = ffn(x)`.

- `AddResidual`: the FFN module adds a residual itself (`BloomMLP.forward(hidden_states,
  residual)`, MPT): the MoE layer replaces the FFN and the residual is added back, as before.
- `ChannelsFirst`: the FFN's projections are 1x1 convolutions over [B, C, *positions]
  (PoolFormer, Kandinsky 3): the MoE layer sees every position as a token.
- `SplitEntry` + `SplitExit`: the FFN is written inline in its block's forward
  (`self.fc2(F.dropout(self.act(self.fc1(x))))`) with something between the projections that is
  not a module moeify may swap (a functional dropout, an activation applied as a function, a
  dropout module the block also uses elsewhere). The entry takes the input projection's place:
  it hands `x` to the exit and returns zeros of the projection's output shape, which the block's
  own code between the projections turns into values nobody reads. The exit takes the output
  projection's place and returns the MoE layer's output for the handed-over `x`. Both are
  instance swaps; the block's code runs unchanged, and every op it applies after the FFN (its
  dropout, residual, norm) applies to the MoE output exactly as it applied to the FFN's.
"""

from __future__ import annotations

from torch import Tensor, nn

from moeify.layers.moe import MoeLayer


class AddResidual(nn.Module):
    """`moe(hidden_states) + residual`, the residual being the hidden states themselves
    (`position` 0) or the forward argument at `position` / called `name`."""

    def __init__(self, moe: MoeLayer, *, position: int, name: str) -> None:
        super().__init__()
        self.moe = moe
        self.position, self.name = position, name

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:  # the FFN's signature
        if self.position == 0:
            residual = hidden_states
        else:
            residual = kwargs[self.name] if self.name in kwargs else args[self.position - 1]
        return self.moe(hidden_states) + residual

    def extra_repr(self) -> str:
        return f"residual={'hidden_states' if self.position == 0 else self.name!r}"


class ChannelsFirst(nn.Module):
    """`moe` applied to [B, C, *positions] as to [B, *positions, C]."""

    def __init__(self, moe: MoeLayer) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:  # the FFN's signature
        return self.moe(hidden_states.movedim(1, -1)).movedim(-1, 1)


class Handoff:
    """What an entry gives its exit: the FFN input of the current call (not a tensor attribute:
    never in a state dict; a deepcopy of the model copies it with its entry and exit)."""

    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x: Tensor | None = None


class SplitEntry(nn.Module):
    """`channels_first`: the projection was a 1x1 convolution, its features in dim 1."""

    def __init__(self, handoff: Handoff, out_features: int, channels_first: bool = False) -> None:
        super().__init__()
        self.handoff, self.out_features, self.channels_first = handoff, out_features, channels_first

    def forward(self, x: Tensor) -> Tensor:
        self.handoff.x = x
        shape = list(x.shape)
        shape[1 if self.channels_first else -1] = self.out_features
        # Real zeros, not an expanded scalar: the block may apply an in-place activation to them.
        return x.new_zeros(shape)

    def extra_repr(self) -> str:
        return f"hands x to the MoE layer; returns zeros of width {self.out_features}"


class SplitExit(nn.Module):
    def __init__(self, moe: MoeLayer, handoff: Handoff, channels_first: bool = False) -> None:
        super().__init__()
        self.moe, self.handoff, self.channels_first = moe, handoff, channels_first

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = self.handoff.x
        if x is None:
            raise RuntimeError(
                "moeify: this FFN's output projection ran before its input projection handed over the input; "
                "the block's forward no longer calls them in the order moeify recorded"
            )
        self.handoff.x = None  # release it: the next call hands over its own
        if self.channels_first:
            return self.moe(x.movedim(1, -1)).movedim(-1, 1)
        return self.moe(x)
