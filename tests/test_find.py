"""find_ffns (the dry run) and site selection: registry, dataflow and generic sources, target_modules
/ exclude_modules / layers, MoE and residual-MLP skips, partial conversion, seeded determinism."""

from __future__ import annotations

import pytest
import torch
from core_helpers import (
    Stack,
    assert_untouched,
    logits,
    snapshot,
    stack_input,
    tiny_llama,
    tokens,
)
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify import ConversionError, find_ffns, moe_layers
from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.wiring import AddResidual


def test_find_changes_nothing_and_reports_sites() -> None:
    model = tiny_llama()
    before = snapshot(model)
    report = find_ffns(model)
    assert_untouched(model, before)
    assert len(report) == 2 and report.skipped == []
    site = report.sites[0]
    assert site.as_dict() == {
        "name": "model.layers.0.mlp",
        "class_name": "LlamaMLP",
        "source": "registry",
        "install_path": "model.layers.0.mlp",
        "layer": 0,
        "in_features": 32,
        "intermediate_size": 64,
        "out_features": 32,
        "gated": True,
        "calls": 1,
    }
    assert [s.name for s in report] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert str(report).splitlines() == [
        "2 FFN site(s) to convert, 0 skipped",
        "  + model.layers.0.mlp [LlamaMLP, registry, gated 32->64->32]",
        "  + model.layers.1.mlp [LlamaMLP, registry, gated 32->64->32]",
    ]
    assert report.as_dict()["sites"][1]["layer"] == 1


@pytest.mark.parametrize(
    ("selection", "selected"),
    [
        ({"target_modules": ["mlp"]}, [0, 1]),
        ({"target_modules": ["layers.1.mlp"]}, [1]),  # dotted suffix
        ({"target_modules": ["model.layers.0.mlp"]}, [0]),  # exact name
        ({"target_modules": ["1.mlp", "layers.0.mlp"]}, [0, 1]),
        ({"target_modules": ["ers.1.mlp"]}, []),  # a suffix matches at a dot, not mid-name
        ({"target_modules": r"model\.layers\.0\.mlp"}, [0]),  # regex, full match
        ({"target_modules": r".*\.mlp"}, [0, 1]),
        ({"target_modules": r"layers\.1\.mlp"}, []),  # a regex must match the whole name
        ({"exclude_modules": ["layers.0.mlp"]}, [1]),
        ({"exclude_modules": r".*"}, []),
        ({"target_modules": ["mlp"], "exclude_modules": r".*1\.mlp"}, [0]),
        ({"layers": [1]}, [1]),
        ({"layers": [0, 1, 5]}, [0, 1]),
    ],
)
def test_selection(selection: dict, selected: list[int]) -> None:
    report = find_ffns(tiny_llama(), **selection)
    assert [s.layer for s in report.sites] == selected
    assert len(report.skipped) == 2 - len(selected)


def test_skip_reasons() -> None:
    model = tiny_llama()
    reasons = {s.name: s.reason for s in find_ffns(model, target_modules=["layers.1.mlp"]).skipped}
    assert reasons == {"model.layers.0.mlp": "not selected by target_modules"}
    reasons = {s.name: s.reason for s in find_ffns(model, exclude_modules=r".*0\.mlp").skipped}
    assert reasons == {"model.layers.0.mlp": "excluded by exclude_modules"}
    reasons = {s.name: s.reason for s in find_ffns(model, layers=[1]).skipped}
    assert reasons == {"model.layers.0.mlp": "block 0 is not in layers=[1]"}


def test_layers_converts_only_that_block() -> None:
    model = tiny_llama()
    ids = tokens()
    dense = logits(model, ids)
    moeify.moeify(model, num_experts=4, layers=[1])
    assert [name for name, _ in moe_layers(model)] == ["model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    report = model.moeify_state.report
    assert [(s.name, s.reason) for s in report.skipped] == [("model.layers.0.mlp", "block 0 is not in layers=[1]")]
    assert (logits(model, ids) - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_partial_then_further_conversion() -> None:
    model = tiny_llama()
    ids = tokens()
    dense = logits(model, ids)
    moeify.moeify(model, num_experts=4, layers=[0])
    first_router = model.model.layers[0].mlp.router.gate.weight.detach().clone()
    moeify.moeify(model, num_experts=2, top_k=1, num_shared_experts=0)  # the rest, with another recipe
    layers = dict(moe_layers(model))
    assert list(layers) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (layers["model.layers.0.mlp"].num_experts, layers["model.layers.1.mlp"].num_experts) == (4, 2)
    assert layers["model.layers.1.mlp"].shared_experts is None
    assert torch.equal(layers["model.layers.0.mlp"].router.gate.weight, first_router)  # left alone
    state = model.moeify_state
    assert [c.num_experts for c in state.conversions] == [4, 2]
    assert [(s.name, s.reason) for s in state.report.skipped] == [("model.layers.0.mlp", "already converted by moeify")]
    assert (logits(model, ids) - dense).abs().max() <= 1e-5 * dense.abs().max()
    with pytest.raises(ConversionError, match="already converted"):
        moeify.moeify(model)


# ---------------------------------------------------------------------------------------------
# Plain nn.Module models: dataflow discovery, and the generic path for exotic FFNs


class FcMLP(nn.Module):
    """fc1 / act / fc2 under an unregistered class name (with a dropout the trace must find)."""

    def __init__(self, d: int = 16, i: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, i)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(i, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TanhResidual(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.tanh(self.lin(x))


def three_layer_mlp(d: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, 24), nn.GELU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, d))


def _reproduces(model: nn.Module, convert) -> nn.Module:
    model.eval()
    x = stack_input()
    with torch.no_grad():
        dense = model(x)
    convert(model)
    with torch.no_grad():
        out = model(x)
    assert (out - dense).abs().max() <= 1e-5 * dense.abs().max()
    return model


def test_dataflow_finds_an_unregistered_fc_mlp() -> None:
    torch.manual_seed(0)
    model = Stack(FcMLP(), FcMLP())
    report = find_ffns(model)
    assert [(s.name, s.class_name, s.source) for s in report] == [
        ("layers.0.mlp", "FcMLP", "dataflow"),
        ("layers.1.mlp", "FcMLP", "dataflow"),
    ]
    site = report.sites[0]
    assert (site.in_features, site.intermediate_size, site.out_features, site.gated) == (16, 32, 16, False)
    assert site.layout.mid_dropout == 0.1  # the rate of the dropout module the trace ran
    _reproduces(model, lambda m: moeify.moeify(m, num_experts=4))
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, PackedExperts) and experts.mid_dropout == 0.1


@pytest.mark.parametrize("make", [TanhResidual, three_layer_mlp], ids=["tanh-residual", "three-layer-mlp"])
def test_exotic_ffn_converts_only_when_named(make) -> None:
    torch.manual_seed(0)
    model = Stack(make(), make())
    assert len(find_ffns(model)) == 0
    with pytest.raises(ConversionError, match="found no FFN to convert in Stack"):
        moeify.moeify(model)
    report = find_ffns(model, target_modules=["mlp"])
    assert [(s.name, s.source, s.in_features) for s in report] == [
        ("layers.0.mlp", "generic", None),
        ("layers.1.mlp", "generic", None),
    ]
    # A zeroed copy of x + tanh(W x) is x, not 0: that one converts without shared experts.
    shared = 0 if make is TanhResidual else 1
    _reproduces(model, lambda m: moeify.moeify(m, target_modules=["mlp"], num_experts=4, num_shared_experts=shared))
    layer = model.layers[0].mlp
    assert isinstance(layer.experts, ModuleExperts) and len(layer.experts.experts) == 4
    assert all(type(e) is type(layer.experts.experts[0]) for e in layer.experts.experts)
    if shared:
        assert isinstance(layer.shared_experts, ModuleExperts)


def test_an_ffn_inside_a_module_that_computes_more_converts_alone() -> None:
    """fc1/act/fc2, then a norm of the FFN's output (Gemma 2's post-FFN norm): the FFN is chained
    inside the module; the MoE layer takes fc1's place, act and fc2 become identities, the norm stays."""

    class NormedFFN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2, self.norm = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16)

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)
    model = Stack(NormedFFN())
    [site] = find_ffns(model).sites
    assert (site.name, site.source, site.install_path) == ("layers.0.mlp", "dataflow", "layers.0.mlp.fc1")
    assert site.layout.identities == ("act", "fc2")
    _reproduces(model, lambda m: moeify.moeify(m, num_experts=4))
    block = model.layers[0].mlp
    assert isinstance(block.fc1, moeify.MoeLayer) and isinstance(block.fc2, nn.Identity)
    assert isinstance(block.norm, nn.LayerNorm)


def test_a_multi_layer_mlp_head_is_no_ffn() -> None:
    """fc1 -> relu -> fc2 -> relu -> fc3 (a box head): no pair of its layers is a block's FFN, since
    each pair's input or output is another layer's, not the residual stream."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

        def forward(self, x: Tensor) -> Tensor:
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == 2 else torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    report = find_ffns(Stack(Head()))
    assert report.sites == []
    assert {s.reason for s in report.skipped} == {
        "a layer of a multi-layer MLP head (its input or output is another layer's), not a block's FFN"
    }


# ---------------------------------------------------------------------------------------------
# MoE blocks are skipped; Bloom's residual MLP converts

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}


def test_mixtral_is_already_moe() -> None:
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mixtral", intermediate_size=64, num_local_experts=4, **SMALL)
    )
    report = find_ffns(model)
    assert len(report) == 0
    assert [(s.name, s.class_name, s.reason) for s in report.skipped] == [
        (f"model.layers.{i}.mlp", "MixtralSparseMoeBlock", "already a Mixture-of-Experts block") for i in (0, 1)
    ]
    with pytest.raises(ConversionError, match="MixtralSparseMoeBlock\\]: already a Mixture-of-Experts block"):
        moeify.moeify(model)


def test_qwen2_moe_skips_the_moe_blocks_and_converts_its_dense_mlp() -> None:
    """The skip is at the sparse block, not at the first class whose name says "Moe": the dense
    MLP of an `mlp_only_layers` block converts."""
    config = AutoConfig.for_model(
        "qwen2_moe",
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        **SMALL,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    report = find_ffns(model)
    assert [(s.name, s.class_name, s.source) for s in report] == [("model.layers.0.mlp", "Qwen2MoeMLP", "dataflow")]
    assert [(s.name, s.class_name, s.reason) for s in report.skipped] == [
        ("model.layers.1.mlp", "Qwen2MoeSparseMoeBlock", "already a Mixture-of-Experts block")
    ]
    ids = tokens()
    dense = logits(model, ids)
    moeify.moeify(model, num_experts=4)
    assert [name for name, _ in moe_layers(model)] == ["model.layers.0.mlp"]
    assert (logits(model, ids) - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_bloom_mlp_adds_its_residual_and_converts() -> None:
    """`BloomMLP.forward(hidden_states, residual)` returns dropout(ffn(x)) + residual: the MoE
    layer replaces the FFN inside an AddResidual that adds the residual back."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=100)
    ).eval()
    report = find_ffns(model)
    assert [(s.name, s.source) for s in report] == [
        ("transformer.h.0.mlp", "dataflow"),
        ("transformer.h.1.mlp", "dataflow"),
    ]
    assert report.sites[0].layout.residual == (1, "residual")
    assert report.sites[0].layer_path == "transformer.h.0.mlp.moe"
    ids = tokens()
    dense = logits(model, ids)
    moeify.moeify(model, num_experts=4, shared_expert_init="zero_out", example_inputs={"input_ids": ids})
    wrapper = model.transformer.h[0].mlp
    assert isinstance(wrapper, AddResidual) and isinstance(wrapper.moe, moeify.MoeLayer)
    assert [name for name, _ in moe_layers(model)] == ["transformer.h.0.mlp.moe", "transformer.h.1.mlp.moe"]
    assert (logits(model, ids) - dense).abs().max() <= 1e-5 * dense.abs().max()


# ---------------------------------------------------------------------------------------------
# Determinism: the random parts (routers, shared noise) come from the seed alone


def _random_parts(model: nn.Module) -> dict[str, Tensor]:
    return {
        f"{name}.{part}.{key}": value.detach().clone()
        for name, layer in moe_layers(model)
        for part in ("router", "shared_experts")
        for key, value in getattr(layer, part).state_dict().items()
    }


def _converted(seed: int, rng_state: int, **overrides) -> dict[str, Tensor]:
    model = tiny_llama()
    torch.manual_seed(rng_state)  # the caller's RNG state must not matter
    moeify.moeify(model, num_experts=4, seed=seed, **overrides)
    return _random_parts(model)


@pytest.mark.parametrize("router", ["linear", "mlp"])
def test_same_seed_same_routers_and_shared_experts(router: str) -> None:
    first = _converted(seed=3, rng_state=0, router=router)
    again = _converted(seed=3, rng_state=123, router=router)
    other = _converted(seed=4, rng_state=0, router=router)
    assert list(first) == list(again) == list(other) and len(first) >= 4
    assert all(torch.equal(first[k], again[k]) for k in first)
    for key in first:
        if not key.endswith("bias"):  # router biases start at zero whatever the seed
            assert not torch.equal(first[key], other[key]), key
    # The two layers' routers differ from each other (seeded per site).
    routers = [v for k, v in first.items() if ".router." in k and k.endswith("weight")]
    assert not torch.equal(routers[0], routers[len(routers) // 2])
