"""Discovery by dataflow on plain nn.Modules, one per pattern: what is found, where the MoE layer
goes, and that the converted model computes exactly what the dense one did (fp32, zero_out).

The patterns: functional activations (gated, fused by chunk or by slicing, either half the
gate), an activation module, a composite tanh-GELU, FFNs inline in a block (a chain of modules;
split by a functional activation or dropout; a dropout module used twice), a residual added
inside (an argument, or the input itself), one module serving several depths, the same module
under two names, meta-device tracing, and the refusals (a convolution over tokens, an MLP fused
with attention, a hidden token mixer, a low-rank adapter).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from core_helpers import Blocks, assert_untouched, snapshot
from torch import Tensor, nn

import moeify
from moeify import ConversionError, find_ffns, moe_layers
from moeify.layers.experts import PackedExperts
from moeify.layers.traced import TracedActivation
from moeify.layers.wiring import AddResidual, SplitEntry, SplitExit
from moeify.monitors import attach_monitors
from moeify.surgery import discover
from moeify.surgery.discover import Analyser

D, I = 16, 32  # noqa: E741 - the shape legend's I


# --------------------------------------------------------------------------------- FFN modules


class SiluGated(nn.Module):
    """down(silu(gate(x)) * up(x)) with the activation as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.w_gate, self.w_up, self.w_down = nn.Linear(D, I, bias=False), nn.Linear(D, I, bias=False), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class ChunkGated(nn.Module):
    """One projection, split by chunk; `gate_second`: diffusers' GEGLU order (up, gate)."""

    def __init__(self, gate_second: bool = False) -> None:
        super().__init__()
        self.gate_second = gate_second
        self.proj, self.out = nn.Linear(D, 2 * I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(b) if self.gate_second else F.gelu(a) * b)


class SliceGated(nn.Module):
    """One projection, halves taken by slicing a rank-3 tensor: `h[:, :, :I]`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(D, 2 * I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        return self.out(torch.relu(h[:, :, :I]) * h[:, :, I:])


class TanhGelu(nn.Module):
    """GPT-2's GELU written out, with a constant tensor the forward makes."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        k = torch.tensor(math.sqrt(2.0 / math.pi))
        return self.c_proj(0.5 * h * (1.0 + torch.tanh(k * (h + 0.044715 * torch.pow(h, 3.0)))))


class ResidualArg(nn.Module):
    """BloomMLP's signature: forward(hidden_states, residual) = dropout(ffn(x)) + residual."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return F.dropout(self.down(F.gelu(self.up(hidden_states))), 0.1, self.training) + residual


class ResidualSelf(nn.Module):
    """x + ffn(x) inside the FFN module."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.sigmoid(self.up(x)))


# ---------------------------------------------------------------------------- blocks around them


class PreNorm(nn.Module):
    """x + mlp(norm(x)), the FFN a module of its own."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(D), mlp
        self.passes_residual = isinstance(mlp, ResidualArg)

    def forward(self, x: Tensor) -> Tensor:
        if self.passes_residual:
            return self.mlp(self.norm(x), x)
        return x + self.mlp(self.norm(x))


class InlineBlock(nn.Module):
    """fc1 / act / fc2 on the block itself, as BART and OPT write them. `style`:
    "modules" (act module, nothing between: a chain), "function" (F.gelu inline: split),
    "dropout" (a functional dropout between: split), "shared_dropout" (one dropout module after
    the activation and after fc2, as XLNet: split)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(D), nn.Linear(D, I), nn.GELU(), nn.Linear(I, D)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        if self.style == "modules":
            h = self.fc2(self.act(self.fc1(h)))
        elif self.style == "function":
            h = self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        elif self.style == "dropout":
            h = self.fc2(F.dropout(self.act(self.fc1(h)), 0.2, self.training))
        else:
            h = self.drop(self.fc2(self.drop(self.act(self.fc1(h)))))
        return x + h


def tokens(seed: int = 3) -> Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(seed))


def converted_exactly(model: nn.Module, **overrides) -> nn.Module:
    """Convert (fp32, zero_out, whole-model check) and assert the outputs are unchanged."""
    model.eval()
    x = tokens()
    with torch.no_grad():
        dense = model(x)
    moeify.moeify(model, num_experts=4, shared_expert_init="zero_out", example_inputs=x, **overrides)
    with torch.no_grad():
        out = model(x)
    assert (out - dense).abs().max() <= 1e-5 * dense.abs().max()
    return model


def only_layer(model: nn.Module) -> moeify.MoeLayer:
    layers = moe_layers(model)
    assert len(layers) >= 1
    return layers[0][1]


# ------------------------------------------------------------------------------- module FFNs


@pytest.mark.parametrize(
    ("make", "kind", "gate_first"),
    [
        (SiluGated, "gated", True),
        (lambda: ChunkGated(gate_second=False), "fused_gated", True),
        (lambda: ChunkGated(gate_second=True), "fused_gated", False),
        (SliceGated, "fused_gated", True),
        (TanhGelu, "mlp", True),
    ],
    ids=["silu-gated", "chunk-gate-first", "chunk-gate-second", "slices", "tanh-gelu"],
)
def test_functional_activations_pack(make, kind: str, gate_first: bool) -> None:
    torch.manual_seed(0)
    model = Blocks(PreNorm(make()), PreNorm(make()))
    [site, _] = find_ffns(model).sites
    assert (site.name, site.source, site.install_path, site.layout.kind) == (
        "blocks.0.mlp",
        "dataflow",
        "blocks.0.mlp",
        kind,
    )
    assert site.layout.gate_first is gate_first
    converted_exactly(model)
    experts = only_layer(model).experts
    assert isinstance(experts, PackedExperts) and isinstance(experts.act, TracedActivation)


def test_a_dropout_before_the_activation_drops_in_training_only() -> None:
    """Reformer's `act(dropout(dense(x)))`: the dropout is replayed inside the experts' activation
    with the activation's own train/eval flag."""

    class DropFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)

        def forward(self, x: Tensor) -> Tensor:
            return self.down(torch.relu(F.dropout(self.up(x), 0.5, self.training)))

    torch.manual_seed(0)
    model = converted_exactly(Blocks(PreNorm(DropFirst())))
    act = only_layer(model).experts.act
    assert "training=self.training" in repr(act)
    h = torch.randn(64, I)
    assert torch.equal(act.eval()(h), torch.relu(h))
    dropped = act.train()(h)
    assert 0.3 < float((dropped == 0).float().mean()) < 0.8 and torch.allclose(
        dropped[dropped != 0], 2 * torch.relu(h)[dropped != 0]
    )


def test_the_recorded_activation_reads_like_code() -> None:
    torch.manual_seed(0)
    model = Blocks(PreNorm(TanhGelu()))
    act = find_ffns(model).sites[0].layout.act(model.blocks[0].mlp)
    text = repr(act)
    assert "tanh(" in text and "pow(x, 3.0)" in text and "return v" in text
    assert dict(act.named_buffers()).keys() == {"c0"}  # sqrt(2/pi), a constant the forward made
    h = torch.randn(5, I)
    assert torch.allclose(act(h), F.gelu(h, approximate="tanh"), atol=1e-6)


# ----------------------------------------------------------------------------- placements


@pytest.mark.parametrize(
    ("style", "install", "split", "identities"),
    [
        ("modules", "fc1", False, ("act", "fc2")),
        ("function", "fc2", True, ()),
        ("dropout", "fc2", True, ()),
        ("shared_dropout", "fc2", True, ()),
    ],
)
def test_ffn_inline_in_its_block(style: str, install: str, split: bool, identities: tuple) -> None:
    torch.manual_seed(0)
    model = Blocks(InlineBlock(style), InlineBlock(style))
    site = find_ffns(model).sites[0]
    assert (site.name, site.install_path) == ("blocks.0", f"blocks.0.{install}")
    assert (site.layout.split, site.layout.identities) == (split, identities)
    converted_exactly(model)
    block = model.blocks[0]
    if split:
        assert isinstance(block.fc1, SplitEntry) and isinstance(block.fc2, SplitExit)
        assert block.fc1.handoff is block.fc2.handoff
    else:
        assert isinstance(block.fc1, moeify.MoeLayer) and isinstance(block.fc2, nn.Identity)


def test_split_ffn_trains_with_its_dropout_in_the_experts() -> None:
    """The block's dropout between the projections now falls on zeros; the experts apply it."""
    torch.manual_seed(0)
    model = converted_exactly(Blocks(InlineBlock("dropout")))
    assert only_layer(model).experts.mid_dropout == 0.2
    model.train()
    loss = model(tokens()).pow(2).mean() + moeify.aux_loss(model)
    loss.backward()
    layer = only_layer(model)
    assert layer.router.gate.weight.grad is not None and layer.experts.w_out.grad.abs().sum() > 0
    assert model.blocks[0].fc1.handoff.x is None  # released after the exit ran


@pytest.mark.parametrize("make", [ResidualArg, ResidualSelf], ids=["argument", "input"])
def test_residual_added_inside_the_ffn(make) -> None:
    torch.manual_seed(0)
    model = Blocks(PreNorm(make()), PreNorm(make()))
    site = find_ffns(model).sites[0]
    assert site.layout.residual == ((1, "residual") if make is ResidualArg else (0, "hidden_states"))
    converted_exactly(model)
    wrapper = model.blocks[0].mlp
    assert isinstance(wrapper, AddResidual) and isinstance(wrapper.moe, moeify.MoeLayer)


def test_one_module_serving_several_depths_stays_one_module() -> None:
    """ALBERT's pattern: one block object run three times per forward."""

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.block = nn.LayerNorm(D), InlineBlock("modules")

        def forward(self, x: Tensor) -> Tensor:
            for _ in range(3):
                x = self.block(self.norm(x))
            return x

    torch.manual_seed(0)
    model = Blocks(Looped())
    [site] = find_ffns(model).sites
    assert (site.name, site.calls) == ("blocks.0.block", 3)
    assert "one module run 3x per forward" in str(find_ffns(model))
    converted_exactly(model)
    layer = only_layer(model)
    assert len(moe_layers(model)) == 1 and layer.calls_per_forward == 3
    layer.reset_stats()
    with torch.no_grad():
        model(tokens())
    assert int(layer.tokens_per_expert.sum()) == 3 * 12 * 2  # runs x tokens x top_k
    # The monitors count every run, and say so.
    runner = attach_monitors(model, ["expert_load"])
    with torch.no_grad():
        model(tokens())
    record = runner.step()
    assert runner.summary()["calls_per_forward"] == {"blocks.0.block.fc1": 3}
    assert record is not None and runner.history[-1]["step"] == 1


def test_one_module_under_two_names_is_converted_once_everywhere() -> None:
    torch.manual_seed(0)
    shared = PreNorm(SiluGated())
    model = Blocks(shared, shared)
    assert [s.name for s in find_ffns(model).sites] == ["blocks.0.mlp"]
    converted_exactly(model)
    assert model.blocks[0].mlp is model.blocks[1].mlp and isinstance(model.blocks[1].mlp, moeify.MoeLayer)


# ------------------------------------------------------------------------------- refusals


class ConvFFN(nn.Module):
    """Sana's GLUMBConv idea: a depthwise 3x3 convolution between the projections."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.dw, self.down = nn.Linear(D, I), nn.Conv1d(I, I, 3, padding=1, groups=I), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x).transpose(1, 2)
        return self.down(F.silu(self.dw(h).transpose(1, 2)))


class ParallelBlock(nn.Module):
    """Flux's single-stream block: attention and MLP outputs concatenated, projected together."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.mlp_in, self.out = nn.Linear(D, 3 * D), nn.Linear(D, I), nn.Linear(D + I, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(torch.cat([attention, F.gelu(self.mlp_in(x))], dim=-1))


class CumsumAct(nn.Module):
    """Looks like an activation module (no weight, keeps the shape) but mixes tokens."""

    def forward(self, h: Tensor) -> Tensor:
        return torch.cumsum(h, dim=-2)


class HiddenMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, I), CumsumAct(), nn.Linear(I, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class LowRank(nn.Module):
    """A LoRA-like pair of projections with nothing between: no FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 4, bias=False), nn.Linear(4, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (ConvFFN, r"convolutional FFN: .* mixes neighbouring tokens"),
        (ParallelBlock, r"parallel attention \+ MLP block"),
        (HiddenMixer, r"not token-wise: permuting the tokens changes its outputs"),
    ],
    ids=["conv", "parallel-attention", "hidden-mixer"],
)
def test_token_mixers_are_refused_with_the_reason(make, reason: str) -> None:
    torch.manual_seed(0)
    model = Blocks(PreNorm(make()) if make is not ParallelBlock else make())
    report = find_ffns(model)
    assert report.sites == [] and len(report.skipped) == 1
    assert re.search(reason, report.skipped[0].reason), report.skipped[0].reason
    before = snapshot(model)
    with pytest.raises(ConversionError, match="Candidates, and why each was rejected") as error:
        moeify.moeify(model)
    assert re.search(reason, str(error.value))
    assert "target_modules=r'" in str(error.value)
    assert_untouched(model, before)


def test_a_low_rank_pair_is_no_ffn() -> None:
    model = Blocks(PreNorm(LowRank()))
    assert find_ffns(model).sites == []


def test_nothing_found_error_names_the_blocks_that_could_not_run_alone() -> None:
    class NeedsMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, I), nn.Linear(I, D)

        def forward(self, x: Tensor, positions: dict) -> Tensor:
            cos, sin = positions["cos"], positions["sin"]  # neither None nor a tensor works
            return self.fc2(F.gelu(self.fc1(x * cos + sin)))

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([NeedsMask(), NeedsMask()])

    with pytest.raises(ConversionError) as error:
        moeify.moeify(Holder())
    message = str(error.value)
    assert "layers.0 [NeedsMask]: cannot run alone on hidden states (2, 4, 16)" in message
    assert r"target_modules=r'layers\.\d+'" in message


# ------------------------------------------------------------------------------ mechanics


def test_find_traces_once_per_structure_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    record = discover.record
    monkeypatch.setattr(discover, "record", lambda *a, **k: calls.append(type(a[0]).__name__) or record(*a, **k))
    torch.manual_seed(0)
    model = Blocks(*(InlineBlock("function") for _ in range(6))).eval()
    model.blocks[0].train()  # flags are restored: a trace runs in eval mode
    before = snapshot(model)
    report = find_ffns(model)
    assert len(report.sites) == 6 and calls == ["InlineBlock"]
    assert_untouched(model, before)
    assert model.blocks[0].training and not model.blocks[1].training


def test_settings_that_change_the_computation_get_their_own_trace() -> None:
    """Same class, same submodules, another activation setting: traced again, not reused."""

    class Configurable(nn.Module):
        def __init__(self, approximate: str) -> None:
            super().__init__()
            self.approximate, self.up, self.down = approximate, nn.Linear(D, I), nn.Linear(I, D)

        def forward(self, x: Tensor) -> Tensor:
            return self.down(F.gelu(self.up(x), approximate=self.approximate))

    torch.manual_seed(0)
    model = Blocks(PreNorm(Configurable("none")), PreNorm(Configurable("tanh")))
    sites = find_ffns(model).sites
    acts = [repr(s.layout.act(model.get_submodule(s.name))) for s in sites]
    assert "approximate='none'" in acts[0] and "approximate='tanh'" in acts[1]
    converted_exactly(model)


def test_meta_modules_are_traced_on_a_random_copy() -> None:
    with torch.device("meta"):
        model = Blocks(InlineBlock("dropout"), PreNorm(ChunkGated(gate_second=True)))
    report = find_ffns(model)
    assert [(s.name, s.layout.split, s.layout.kind) for s in report.sites] == [
        ("blocks.0", True, "mlp"),
        ("blocks.1.mlp", False, "fused_gated"),
    ]
    assert all(p.is_meta for p in model.parameters())


def test_a_class_named_like_a_registered_one_is_not_taken_for_it() -> None:
    """diffusers' FeedForward is registered; a model's own class of that name is found by what
    it computes (the registry is keyed by the fully qualified class)."""

    class FeedForward(nn.Module):  # the name is the point
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w2, self.w3 = (
                nn.Linear(D, I, bias=False),
                nn.Linear(I, D, bias=False),
                nn.Linear(D, I, bias=False),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    torch.manual_seed(0)
    model = Blocks(PreNorm(FeedForward()))
    [site] = find_ffns(model).sites
    assert (site.class_name, site.source, site.layout.kind) == ("FeedForward", "dataflow", "gated")
    assert (site.layout.proj_gate, site.layout.proj_in) == ("w1", "w3")
    converted_exactly(model)


def test_analyser_reports_a_module_that_cannot_run() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, I), nn.Linear(I, D)

        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("needs a timestep")

    analysis = Analyser().analyse(Broken())
    assert analysis.error == "cannot run alone on hidden states (2, 4, 16) (RuntimeError: needs a timestep)"
