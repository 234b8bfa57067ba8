"""Recipes that depart from the dense model by design: experts from several checkpoints
(Branch-Train-MiX, `experts_from`) and Drop-Upcycling (`reinit_fraction`); their deviation is
measured and reported (`moeify_state.deviation`, the model card) instead of checked."""

from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import assert_untouched, snapshot, tiny_llama, tokens
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify.recipes import reinit
from moeify.surgery import ConversionError, verify
from moeify.surgery.compare import relative_error

INTERMEDIATE, HIDDEN = 64, 32


def _ffn(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].mlp


def _expert(layer: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of routed expert e of a converted Llama MLP."""
    w_in, w_out = layer.experts.w_in[e], layer.experts.w_out[e]
    return w_in[:INTERMEDIATE], w_in[INTERMEDIATE:], w_out


def _dense(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


@torch.no_grad()
def _layer_deviation(dense: nn.Module, layer: nn.Module, seed: int) -> float:
    """The identity check's probe (verify.check_layer), recomputed."""
    x = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(seed))
    layer.eval()
    out = layer(x)
    layer.clear_losses()
    return relative_error(out, dense(x))


def _sources(n: int = 3) -> list[nn.Module]:
    return [tiny_llama(seed=10 + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# experts_from


def test_experts_come_from_the_sources_bit_for_bit_and_the_deviation_is_reported() -> None:
    sources, base = _sources(), tiny_llama(seed=0)
    dense = copy.deepcopy(base)
    ids = tokens()
    moeify.moeify(
        base, experts_from=sources, num_experts=6, top_k=2, num_shared_experts=0, example_inputs={"input_ids": ids}
    )
    state = base.moeify_state
    assert state.config.experts_from == ("source_0", "source_1", "source_2")
    assert not state.config.preserves_function
    for layer in (0, 1):
        moe = _ffn(base, layer)
        for e in range(6):  # expert e from source e % 3
            for got, want in zip(_expert(moe, e), _dense(_ffn(sources[e % 3], layer))):
                assert torch.equal(got, want)
    # The rest from the base ("base" is the default).
    assert torch.equal(base.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(base.model.layers[1].self_attn.q_proj.weight, dense.model.layers[1].self_attn.q_proj.weight)
    deviation = state.deviation
    for index in (0, 1):
        expected = _layer_deviation(_ffn(dense, index), _ffn(base, index), seed=0 + index)
        assert deviation["layers"][f"model.layers.{index}.mlp"] == expected
        assert expected > 0.5  # other models' FFNs: nothing like the base's
    converted = verify.run_model(base, {"input_ids": ids})
    assert deviation["model"] == verify.model_deviation(verify.run_model(dense, {"input_ids": ids}), converted)
    for name, source in zip(state.config.experts_from, sources):
        assert deviation["sources"][name] == verify.model_deviation(
            verify.run_model(source, {"input_ids": ids}), converted
        )
    assert set(deviation) == {"layers", "model", "sources"} and deviation["model"] > 0


def test_names_come_from_name_or_path_and_the_base_may_be_a_source() -> None:
    base, other = tiny_llama(seed=0), tiny_llama(seed=1)
    dense = copy.deepcopy(base)
    base.config._name_or_path = "org/base"
    other.config._name_or_path = "org/code"
    moeify.moeify(base, experts_from=[base, other], num_experts=2, top_k=1, num_shared_experts=0)
    assert base.moeify_state.config.experts_from == ("org/base", "org/code")
    moe = _ffn(base, 0)
    for got, want in zip(_expert(moe, 0), _dense(_ffn(dense, 0))):
        assert torch.equal(got, want)
    for got, want in zip(_expert(moe, 1), _dense(_ffn(other, 0))):
        assert torch.equal(got, want)


def test_rest_average_is_the_mean_over_the_sources() -> None:
    sources, base = _sources(), tiny_llama(seed=0)
    moeify.moeify(base, experts_from=sources, experts_from_rest="average", num_experts=3, top_k=1)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
        mean = torch.stack([s.get_parameter(name).float() for s in sources]).mean(0)
        assert torch.equal(base.get_parameter(name), mean)
    assert base.moeify_state.config.experts_from_rest == "average"
    # Each source still holds its own values (averaging replaced the base's tensors only).
    assert not torch.equal(sources[0].model.embed_tokens.weight, base.model.embed_tokens.weight)


def _stack(mlp_factory) -> nn.Module:
    from core_helpers import Stack

    torch.manual_seed(0)
    return Stack(mlp_factory(), mlp_factory())


def _exotic() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        (
            "shape",
            ConversionError,
            r"model.layers.0.mlp: source 1's w_in is \(48, 32\) torch.float32, the base's \(64, 32\)",
        ),
        ("architecture", ConversionError, "experts_from\\[1\\] is a Qwen2ForCausalLM and the base a LlamaForCausalLM"),
        ("num_experts", ValueError, "num_experts=4 must be a multiple of the 3 experts_from sources"),
        ("names_only", ConversionError, "pass the models themselves"),
        ("granularity", ConversionError, "experts_from takes whole FFNs"),
    ],
)
def test_refused_before_any_change(case, error, match) -> None:
    base = tiny_llama(seed=0)
    sources = _sources()
    if case == "shape":
        sources[1] = tiny_llama(seed=5, intermediate_size=48)
    if case == "architecture":
        torch.manual_seed(0)
        qwen = AutoConfig.for_model(
            "qwen2",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
        sources[1] = AutoModelForCausalLM.from_config(qwen)
    before = snapshot(base)
    kwargs = {"num_experts": 4 if case == "num_experts" else 6, "top_k": 2}
    if case == "names_only":
        kwargs["experts_from"] = ["a", "b", "c"]
    else:
        kwargs["experts_from"] = sources
    if case == "granularity":
        kwargs.update(granularity=2, num_experts=6, top_k=2)
    with pytest.raises(error, match=match):
        moeify.moeify(base, **kwargs)
    assert_untouched(base, before)


def test_generic_path_refused() -> None:
    base, other = _stack(_exotic), _stack(_exotic)
    before = snapshot(base)
    with pytest.raises(ConversionError, match="layers.0.mlp is converted on the generic path"):
        moeify.moeify(base, experts_from=[base, other], target_modules=["mlp"], num_experts=2, top_k=1)
    assert_untouched(base, before)


def test_a_failure_after_averaging_leaves_the_base_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    sources, base = _sources(), tiny_llama(seed=0)
    before = snapshot(base)

    def broken(*args, **kwargs) -> float:
        raise RuntimeError("measuring failed")

    monkeypatch.setattr(verify, "model_deviation", broken)
    with pytest.raises(RuntimeError, match="measuring failed"):
        moeify.moeify(
            base,
            experts_from=[base, *sources[1:]],
            experts_from_rest="average",
            num_experts=3,
            top_k=1,
            example_inputs={"input_ids": tokens()},
        )
    assert_untouched(base, before)


def test_save_and_load_without_the_sources_is_bit_exact(tmp_path) -> None:
    sources, base = _sources(), tiny_llama(seed=0)
    moeify.moeify(base, experts_from=sources, experts_from_rest="average", num_experts=3, top_k=2)
    ids = tokens()
    with torch.no_grad():
        expected = base.eval()(input_ids=ids).logits
    moeify.save_pretrained(base, tmp_path / "btx")
    del sources
    loaded = moeify.from_pretrained(tmp_path / "btx")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert loaded.moeify_state.config.experts_from == ("source_0", "source_1", "source_2")
    # The deviation measured at conversion travels with the checkpoint (the reloaded card's table).
    assert loaded.moeify_state.deviation == base.moeify_state.deviation
    assert loaded.moeify_state.deviation["layers"]


# ---------------------------------------------------------------------------------------------
# reinit_fraction (Drop-Upcycling)


def _changed_neurons(moe: nn.Module, dense: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron: whether its gate row, up row and down column each differ from the dense FFN."""
    gate, up, down = _expert(moe, e)
    dense_gate, dense_up, dense_down = _dense(dense)
    per = torch.stack([(gate != dense_gate).any(1), (up != dense_up).any(1), (down != dense_down).any(0)])
    return per.any(0), per.all(0)


@torch.no_grad()
def test_drop_upcycling_reinitialises_a_different_fraction_per_expert() -> None:
    base = tiny_llama(seed=0)
    dense = copy.deepcopy(base)
    ids = tokens()
    moeify.moeify(
        base,
        reinit_fraction=0.3,
        num_experts=4,
        top_k=2,
        num_shared_experts=0,
        seed=7,
        example_inputs={"input_ids": ids},
    )
    count = round(0.3 * INTERMEDIATE)
    assert count == 19
    for layer in (0, 1):
        moe, mlp = _ffn(base, layer), _ffn(dense, layer)
        subsets = []
        for e in range(4):
            changed, all_three = _changed_neurons(moe, mlp, e)
            assert int(changed.sum()) == count and torch.equal(changed, all_three)
            subsets.append(tuple(changed.nonzero().flatten().tolist()))
        assert len(set(subsets)) == 4  # a different subset per expert
        # The new values follow each matrix's own statistics (pooled over the 4 experts).
        for block, matrix in enumerate(_dense(mlp)):
            new = torch.cat(
                [
                    (
                        _expert(moe, e)[block][torch.tensor(s)]
                        if block < 2
                        else _expert(moe, e)[block][:, torch.tensor(s)]
                    ).flatten()
                    for e, s in enumerate(subsets)
                ]
            )
            assert abs(float(new.std()) / float(matrix.std()) - 1) < 0.05
            assert abs(float(new.mean() - matrix.mean())) < 0.05 * float(matrix.std())
    deviation = base.moeify_state.deviation
    assert set(deviation["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(v > 0 for v in deviation["layers"].values()) and deviation["model"] > 0
    assert "sources" not in deviation
    assert deviation["model"] == verify.model_deviation(
        verify.run_model(dense, {"input_ids": ids}), verify.run_model(base, {"input_ids": ids})
    )


def test_drop_upcycling_is_reproducible_and_leaves_routers_and_shared_experts_alone() -> None:
    def convert(seed: int, fraction: float, rng: int) -> nn.Module:
        torch.manual_seed(rng)  # the caller's RNG state must not matter
        return moeify.moeify(tiny_llama(seed=0), reinit_fraction=fraction, num_experts=4, top_k=2, seed=seed)

    a, b, c, plain = convert(3, 0.5, 1), convert(3, 0.5, 99), convert(4, 0.5, 1), convert(3, 0.0, 1)
    assert torch.equal(_ffn(a, 0).experts.w_in, _ffn(b, 0).experts.w_in)
    assert torch.equal(_ffn(a, 1).experts.w_out, _ffn(b, 1).experts.w_out)
    assert not torch.equal(_ffn(a, 0).experts.w_in, _ffn(c, 0).experts.w_in)
    for name, param in _ffn(plain, 0).named_parameters():
        if not name.startswith("experts."):  # the router and the shared experts
            assert torch.equal(_ffn(a, 0).get_parameter(name), param), name
    assert plain.moeify_state.deviation is None  # a function-preserving recipe is checked, not measured
    assert reinit.layer_seed(3, 1) == 3 * 1_000_003 + 1 + reinit.SEED_OFFSET


def test_drop_upcycling_refuses_the_generic_path() -> None:
    base = _stack(_exotic)
    before = snapshot(base)
    with pytest.raises(ConversionError, match="reinit_fraction=0.5 re-initialises"):
        moeify.moeify(base, reinit_fraction=0.5, target_modules=["mlp"], num_experts=2, top_k=1)
    assert_untouched(base, before)


def test_card_shows_both_recipes_and_the_deviation() -> None:
    sources, base = _sources(), tiny_llama(seed=0)
    moeify.moeify(
        base, experts_from=sources, reinit_fraction=0.25, num_experts=3, top_k=1, example_inputs={"input_ids": tokens()}
    )
    card = str(moeify.model_card(base))
    deviation = base.moeify_state.deviation
    assert "source_0, source_1, source_2; the rest from base" in card
    assert "Drop-Upcycling: 0.25 of every routed expert's intermediate neurons re-initialised" in card
    layer0, source2 = deviation["layers"]["model.layers.0.mlp"], deviation["sources"]["source_2"]
    assert f"| `model.layers.0.mlp` | its dense FFN (random tokens) | {float(f'{layer0:.4g}')} |" in card
    assert f"| whole model | source `source_2` (example inputs) | {float(f'{source2:.4g}')} |" in card
    assert '"reinit_fraction": 0.25' in card and '"experts_from_rest": "base"' in card


def test_drop_upcycling_saves_and_loads_bit_exact(tmp_path) -> None:
    """The rebuild re-draws nothing that survives: the re-initialised experts come from the file,
    and the measured deviation with them."""
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, reinit_fraction=0.5)
    ids = tokens()
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    moeify.save_pretrained(model, tmp_path / "drop")
    loaded = moeify.from_pretrained(tmp_path / "drop")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected)
    assert loaded.moeify_state.config.reinit_fraction == 0.5
    assert loaded.moeify_state.deviation == model.moeify_state.deviation
