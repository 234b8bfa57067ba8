"""FFNs of 1x1 convolutions over [B, C, *positions] (PoolFormer, SqueezeBERT, SwiftFormer,
Kandinsky 3): every position is a token, the MoE layer sees them channel-last. As a module of
their own, chained in a block, split by a dropout module used twice; grouped convolutions as the
block-diagonal projections they are; and an "activation" that needs the whole grid is refused."""

from __future__ import annotations

import pytest
import torch
from core_helpers import Blocks
from torch import Tensor, nn

import moeify
from moeify import find_ffns, moe_layers
from moeify.layers.wiring import ChannelsFirst, SplitEntry, SplitExit

C, I = 8, 16  # noqa: E741 - the shape legend's I


class ConvMlp(nn.Module):
    """PoolFormer's FFN: conv1 (1x1) -> act -> conv2 (1x1), a module of its own."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = (
            nn.Conv2d(C, I, 1, groups=groups),
            nn.GELU(),
            nn.Conv2d(I, C, 1, groups=groups),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x)))


class Block2d(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = nn.GroupNorm(1, C), mlp

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class SqueezeLayer(nn.Module):
    """SqueezeBERT's layer over [B, C, T]: `intermediate` (conv + act) then `output.conv` with
    dropout, residual and norm after it (a chain); or, `shared_drop`, one dropout module after the
    activation and after the output projection (a split)."""

    def __init__(self, shared_drop: bool = False) -> None:
        super().__init__()
        self.shared_drop = shared_drop
        self.intermediate = nn.Sequential(nn.Conv1d(C, I, 1, groups=2), nn.GELU())
        self.output = nn.Conv1d(I, C, 1, groups=2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.intermediate(x)
        h = self.drop(self.output(self.drop(h))) if self.shared_drop else self.output(h)
        return torch.nn.functional.group_norm(x + h, 1)


class GridNorm(nn.Module):
    """Global response normalisation (ConvNeXt V2): a leaf that keeps the shape, with a norm over
    the positions; its gain starts at zero, so at first it is the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, I, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * x / x.norm(dim=(2, 3), keepdim=True)


def converted_exactly(model: nn.Module, x: Tensor) -> None:
    model.eval()
    with torch.no_grad():
        dense = model(x)
    moeify.moeify(model, num_experts=4, shared_expert_init="zero_out", example_inputs=x)
    with torch.no_grad():
        assert (model(x) - dense).abs().max() <= 1e-5 * dense.abs().max()


def grid(*positions: int) -> Tensor:
    return torch.randn(2, C, *positions, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_conv_mlp_module_converts_with_positions_as_tokens(groups: int) -> None:
    torch.manual_seed(0)
    model = Blocks(Block2d(ConvMlp(groups)), Block2d(ConvMlp(groups)))
    site = find_ffns(model).sites[0]
    assert (site.name, site.install_path, site.layout.channels_first) == ("blocks.0.mlp", "blocks.0.mlp", True)
    assert (site.in_features, site.intermediate_size) == (C, I)
    converted_exactly(model, grid(3, 5))
    wrapper = model.blocks[0].mlp
    assert isinstance(wrapper, ChannelsFirst) and isinstance(wrapper.moe, moeify.MoeLayer)
    layer = wrapper.moe
    layer.reset_stats()
    with torch.no_grad():
        model(grid(3, 5))
    assert int(layer.tokens_per_expert.sum()) == 2 * 3 * 5 * 2  # every position of both images, top-2
    if groups == 2:  # the experts hold the block-diagonal projection, zeros off the blocks
        w_in = layer.experts.w_in[0]
        assert torch.count_nonzero(w_in[: I // 2, C // 2 :]) == 0 and torch.count_nonzero(w_in[: I // 2, : C // 2]) > 0


@pytest.mark.parametrize(("shared_drop", "split"), [(False, False), (True, True)])
def test_a_conv_ffn_inline_in_its_block(shared_drop: bool, split: bool) -> None:
    torch.manual_seed(0)
    model = Blocks(SqueezeLayer(shared_drop), SqueezeLayer(shared_drop))
    site = find_ffns(model).sites[0]
    assert (site.name, site.layout.channels_first, site.layout.split) == ("blocks.0", True, split)
    converted_exactly(model, grid(7))
    block = model.blocks[0]
    if split:
        assert isinstance(block.intermediate[0], SplitEntry) and isinstance(block.output, SplitExit)
    else:
        assert isinstance(block.intermediate, ChannelsFirst) and isinstance(block.output, nn.Identity)
    assert len(moe_layers(model)) == 2


def test_an_activation_that_needs_the_whole_grid_is_refused() -> None:
    class GrnMlp(ConvMlp):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Sequential(nn.GELU(), GridNorm())

    torch.manual_seed(0)
    model = Blocks(Block2d(GrnMlp()))
    report = find_ffns(model)
    assert report.sites == []
    assert "its activation does not run on tokens one at a time" in report.skipped[0].reason


def test_conv_ffns_round_trip_through_a_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = Blocks(Block2d(ConvMlp(2)), SqueezeLayerOn2d()).eval()
    x = grid(2, 3)
    moeify.moeify(model, num_experts=4)
    with torch.no_grad():
        expected = model(x)
    moeify.save_pretrained(model, tmp_path)
    torch.manual_seed(9)
    loaded = moeify.from_pretrained(tmp_path, base_model=Blocks(Block2d(ConvMlp(2)), SqueezeLayerOn2d()))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


class SqueezeLayerOn2d(nn.Module):
    """A split conv FFN over a 2-D grid (a dropout module used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down, self.drop = nn.Conv2d(C, I, 1), nn.SiLU(), nn.Conv2d(I, C, 1), nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.down(self.drop(self.act(self.up(x)))))
