"""Routers initialised from data (moeify.recipes.router_init): k-means centroids and per-expert
prompt means of the dense model's FFN inputs, recomputed here from hooks on the FFN modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import moeify
from moeify.layers.moe import MoeLayer
from moeify.recipes.router_init import KMEANS_SEED_OFFSET, row_scale, spherical_kmeans
from moeify.surgery import ConversionError

E, STD = 4, 0.02


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def ids(batch: int, seq: int, low: int = 3, high: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randint(low, high, (batch, seq), generator=torch.Generator().manual_seed(seed))


def ffn_inputs(model: LlamaForCausalLM, batches: list[dict]) -> list[torch.Tensor]:
    """Per layer, the tokens each MLP receives (its forward's argument), padding dropped by the
    batch's attention_mask: an independent capture from moeify's (which reads up_proj's input)."""
    found: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    keep: list[torch.Tensor | None] = [None]
    handles = [
        layer.mlp.register_forward_pre_hook(
            lambda m, args, i=i: found[i].append(args[0].reshape(-1, args[0].shape[-1])[keep[0]].float())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                keep[0] = (
                    mask.reshape(-1).bool()
                    if mask is not None
                    else torch.ones(batch["input_ids"].numel(), dtype=torch.bool)
                )
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in found]


def routers(model) -> list[torch.Tensor]:
    return [m.router.gate.weight.detach().clone() for m in model.modules() if isinstance(m, MoeLayer)]


def test_kmeans_rows_are_the_scaled_centroids_of_the_ffn_inputs():
    dense = tiny_llama()
    batch = {"input_ids": ids(4, 16)}
    tokens = ffn_inputs(dense, [batch])
    model = moeify.moeify(copy.deepcopy(dense), num_experts=E, top_k=2, router_init="kmeans", calibration_inputs=batch)
    summary = model.moeify_state.router_init
    for index, (rows_ED, x_TD) in enumerate(zip(routers(model), tokens)):
        # A reference run of the same k-means on the independently captured tokens: bit for bit.
        reference = spherical_kmeans(x_TD, E, seed=index + KMEANS_SEED_OFFSET)
        assert reference.converged and reference.iterations >= 2
        assert torch.equal(rows_ED, reference.centroids_ED * row_scale(reference.centroids_ED, x_TD, STD))
        # Whatever the implementation: a k-means fixed point. Every row has one norm, so the router's
        # top-1 choice is the cluster by cosine, and each row points along its cluster's mean direction.
        norms_E = rows_ED.norm(dim=-1)
        torch.testing.assert_close(norms_E, norms_E[:1].expand(E), rtol=1e-6, atol=0)
        top1_T = (x_TD @ rows_ED.T).argmax(dim=-1)
        assert torch.equal(top1_T, reference.assignment_T)
        assert len(top1_T.unique()) == E  # no empty cluster on 64 tokens
        for e in range(E):
            mean_D = F.normalize(F.normalize(x_TD[top1_T == e], dim=-1).sum(dim=0), dim=0)
            torch.testing.assert_close(rows_ED[e] / norms_E[e], mean_D, rtol=0, atol=1e-6)
        # The chosen scale: logits as large (RMS over the tokens) as Law 3's random router gives.
        rms_logit = (x_TD @ rows_ED.T).pow(2).mean().sqrt()
        torch.testing.assert_close(rms_logit, STD * x_TD.norm(dim=-1).pow(2).mean().sqrt(), rtol=1e-5, atol=0)
        site = summary["sites"][f"model.layers.{index}.mlp"]
        assert site["tokens"] == 64 and site["iterations"] == reference.iterations and site["converged"]
        assert site["scale"] == pytest.approx(float(norms_E[0]), rel=1e-6)


def test_kmeans_is_reproducible_with_the_seed():
    dense = tiny_llama()
    batch = {"input_ids": ids(4, 16)}
    runs = [
        routers(
            moeify.moeify(
                copy.deepcopy(dense), num_experts=E, router_init="kmeans", calibration_inputs=batch, seed=seed
            )
        )
        for seed in (0, 0, 1)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not any(torch.equal(a, c) for a, c in zip(runs[0], runs[2]))


def test_identity_holds_with_data_routers():
    dense = tiny_llama()
    probe = {"input_ids": ids(2, 12, seed=7)}
    with torch.no_grad():
        expected = dense(**probe).logits
    random_rows = routers(moeify.moeify(copy.deepcopy(dense), num_experts=E))
    # The whole-model check on example_inputs runs too (it raises if the outputs differ).
    model = moeify.moeify(
        copy.deepcopy(dense), num_experts=E, router_init="kmeans", calibration_inputs={"input_ids": ids(4, 16)},
        example_inputs=probe,
    )  # fmt: skip
    with torch.no_grad():
        got = model(**probe).logits
    assert (got - expected).abs().max() < 1e-5
    assert not any(torch.equal(a, b) for a, b in zip(routers(model), random_rows))


def test_prompts_rows_are_the_mean_ffn_input_of_each_experts_prompts():
    dense = tiny_llama()
    # Expert 0: one batch of low token ids; expert 1: two batches of high ones.
    domain_a = {"input_ids": ids(2, 10, 3, 50, seed=2)}
    domain_b = [{"input_ids": ids(1, 8, 50, 100, seed=3)}, {"input_ids": ids(3, 6, 50, 100, seed=4)}]
    model = moeify.moeify(
        copy.deepcopy(dense), num_experts=2, top_k=1, router_init="prompts", calibration_inputs=[domain_a, domain_b]
    )
    tokens_a, tokens_b = ffn_inputs(dense, [domain_a]), ffn_inputs(dense, domain_b)
    for rows_ED, x_a, x_b in zip(routers(model), tokens_a, tokens_b):
        directions_ED = F.normalize(torch.stack([x_a.mean(dim=0), x_b.mean(dim=0)]), dim=-1)
        scale = row_scale(directions_ED, torch.cat([x_a, x_b]), STD)
        torch.testing.assert_close(rows_ED, directions_ED * scale, rtol=1e-6, atol=1e-7)
    assert model.moeify_state.router_init["sites"]["model.layers.1.mlp"]["tokens"] == 20 + 8 + 18


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"router_init": "kmeans"}, ConversionError, r"pass moeify\(model, calibration_inputs=\.\.\.\)"),
        ({"calibration_inputs": {"input_ids": ids(1, 8)}}, ConversionError, r"set router_init='kmeans'"),
        ({"router_init": "kmeans", "router": "mlp", "calibration_inputs": {"input_ids": ids(1, 8)}}, ConversionError, r"use router='linear'"),
        ({"router_init": "kmeans", "router": "cross_attention", "calibration_inputs": {"input_ids": ids(1, 8)}}, ConversionError, r"use router='linear'"),
        ({"router_init": "prompts", "calibration_inputs": [{"input_ids": ids(1, 8)}] * 3}, ConversionError, r"has 3 entries, but there are num_experts=4"),
        ({"router_init": "prompts", "calibration_inputs": {"input_ids": ids(1, 8)}}, TypeError, r"one entry per routed expert"),
        ({"router_init": "prompts", "calibration_inputs": [[]] * 4}, TypeError, r"calibration_inputs\[0\] must be one batch or a non-empty list"),
        ({"router_init": "kmeans", "calibration_inputs": "some text"}, TypeError, r"one batch \(a dict of keyword arguments"),
        ({"router_init": "kmeans", "calibration_inputs": [{"input_ids": ids(1, 8)}, "text"]}, TypeError, r"got a str"),
        ({"router_init": "kmeans", "calibration_inputs": {"input_ids": ids(1, 3)}}, ConversionError, r"gave 3 real \(unpadded\) token\(s\) at model\.layers\.0\.mlp.*at least one per cluster"),
        ({"router_init": "kmeans", "calibration_inputs": {"not_an_arg": ids(1, 8)}}, ConversionError, r"batch 0 does not run the dense LlamaForCausalLM"),
    ],
)  # fmt: skip
def test_refusals_leave_the_model_untouched(overrides, error, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = len(model._forward_pre_hooks)
    with pytest.raises(error, match=match):
        moeify.moeify(model, num_experts=E, **overrides)
    assert not any(isinstance(m, MoeLayer) for m in model.modules())
    assert not hasattr(model, "moeify_state") and len(model._forward_pre_hooks) == hooks_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_padding_is_left_out_of_the_clustering():
    dense = tiny_llama()
    full, short = ids(1, 8, seed=5), ids(1, 5, seed=6)
    # Right padding: the real tokens of the short row see exactly what they see alone (causal attention).
    padded = {
        "input_ids": torch.cat([full, F.pad(short, (0, 3), value=0)]),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
    }
    trimmed = [{"input_ids": full}, {"input_ids": short}]
    kw = dict(num_experts=E, router_init="kmeans")
    with_mask = moeify.moeify(copy.deepcopy(dense), calibration_inputs=padded, **kw)
    without_pads = moeify.moeify(copy.deepcopy(dense), calibration_inputs=trimmed, **kw)
    pads_counted = moeify.moeify(copy.deepcopy(dense), calibration_inputs={"input_ids": padded["input_ids"]}, **kw)
    assert with_mask.moeify_state.router_init["sites"]["model.layers.0.mlp"]["tokens"] == 13
    assert pads_counted.moeify_state.router_init["sites"]["model.layers.0.mlp"]["tokens"] == 16
    for a, b, c in zip(routers(with_mask), routers(without_pads), routers(pads_counted)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same tokens, same order: same clusters
        assert (a - c).abs().max() > 1e-3  # the three padding tokens do move the centroids


def test_save_and_load_are_bit_exact_without_calibration_inputs(tmp_path):
    model = moeify.moeify(
        tiny_llama(), num_experts=E, router_init="kmeans", calibration_inputs={"input_ids": ids(4, 16)}
    )
    probe = {"input_ids": ids(2, 12, seed=9)}
    moeify.save_pretrained(model, tmp_path / "moe")
    loaded = moeify.from_pretrained(tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, loaded(**probe).logits)
    assert all(torch.equal(a, b) for a, b in zip(routers(model), routers(loaded)))
    assert loaded.moeify_state.config.router_init == "kmeans"  # the recipe as saved
    card = str(moeify.model_card(loaded))
    assert "| router init | k-means centroids of the FFN inputs on calibration data |" in card


def test_fine_grained_experts_keep_their_virtual_groups_tied():
    dense = tiny_llama()
    probe = {"input_ids": ids(2, 12, seed=7)}
    model = moeify.moeify(
        copy.deepcopy(dense), num_experts=4, top_k=2, granularity=2, router_init="kmeans",
        calibration_inputs={"input_ids": ids(4, 16)}, example_inputs=probe,
    )  # fmt: skip
    for rows_ED in routers(model):
        assert torch.equal(rows_ED[0::2], rows_ED[1::2])  # a copy's two slices share its centroid
        assert not torch.equal(rows_ED[0], rows_ED[2])
    with pytest.raises(ConversionError, match=r"2 copies of the FFN"):
        moeify.moeify(
            copy.deepcopy(dense), num_experts=4, top_k=2, granularity=2, router_init="prompts",
            calibration_inputs=[{"input_ids": ids(1, 8)}] * 4,
        )  # fmt: skip


def test_spherical_kmeans_finds_separated_directions_and_refuses_too_few_tokens():
    generator = torch.Generator().manual_seed(0)
    axes_ED = torch.eye(3, 8)
    x_TD = torch.cat([axes_ED[e] * (1 + torch.rand(20, 1, generator=generator)) for e in range(3)])
    x_TD = x_TD + 0.01 * torch.randn(x_TD.shape, generator=generator)
    result = spherical_kmeans(x_TD, 3, seed=0)
    assert result.converged
    clusters = [set(result.assignment_T[20 * e : 20 * (e + 1)].tolist()) for e in range(3)]
    assert all(len(c) == 1 for c in clusters) and len(set.union(*clusters)) == 3
    assert (result.centroids_ED @ axes_ED.T).max(dim=1).values.min() > 0.99
    with pytest.raises(ValueError, match="k-means of 2 token"):
        spherical_kmeans(x_TD[:2], 3, seed=0)


def test_progress_bar_only_on_a_terminal_and_for_enough_batches(monkeypatch):
    from huggingface_hub.utils import tqdm

    from moeify.recipes import calibration

    batches = [{"input_ids": ids(1, 4)}] * calibration.PROGRESS_MIN_BATCHES
    monkeypatch.setattr(calibration.sys.stderr, "isatty", lambda: False, raising=False)
    assert calibration._progress(batches, len(batches), "x") is batches
    monkeypatch.setattr(calibration.sys.stderr, "isatty", lambda: True, raising=False)
    assert not isinstance(calibration._progress(batches[:-1], len(batches) - 1, "x"), tqdm)
    bar = calibration._progress(batches, len(batches), "x")
    assert isinstance(bar, tqdm) and bar.total == len(batches)
    bar.close()
