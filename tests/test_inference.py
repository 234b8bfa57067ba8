"""Inference paths: without autograd the layers take shortcuts (no router losses in eval, the
single-token expert loop, the gate and up products split on a CPU); each must give the autograd
path's outputs and counts."""

from __future__ import annotations

import pytest
import torch
from core_helpers import tiny_llama, tokens
from test_layers import KINDS, D, E, K, make_pair

import moeify
from moeify import aux_loss, moe_layers
from moeify.layers import expert_loop
from moeify.layers.experts import PackedExperts


def _routes(num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(num_tokens)])
    probs_TK = torch.rand(num_tokens, K, generator=g) + 0.1
    return idx_TK, probs_TK / probs_TK.sum(-1, keepdim=True)


@pytest.mark.parametrize("expert_by_expert", [True, False], ids=["loop", "grouped"])
@pytest.mark.parametrize("num_tokens", [1, 2, 12])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_inference_matches_the_autograd_path(
    kind: str, bias: bool, num_tokens: int, expert_by_expert: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed, _, _ = make_pair(kind, bias)
    if not expert_by_expert:  # the grouped path, as on a GPU (the conftest makes the loop run everywhere)
        monkeypatch.setattr(expert_loop, "applies", lambda *args: False)
    idx_TK, weights_TK = _routes(num_tokens)
    x_TD = torch.randn(num_tokens, D, generator=torch.Generator().manual_seed(1))
    few, splits = [], []
    real_few, real_split = expert_loop.run_few, PackedExperts._splits_gate_up
    monkeypatch.setattr(expert_loop, "run_few", lambda *args: few.append(1) or real_few(*args))
    monkeypatch.setattr(PackedExperts, "_splits_gate_up", lambda *args: splits.append(real_split(*args)) or splits[-1])
    with torch.no_grad():
        y_TD, counts_E = packed(x_TD, idx_TK, weights_TK)
    trained_TD, trained_counts_E = packed(x_TD.clone().requires_grad_(), idx_TK, weights_TK)
    assert trained_TD.grad_fn is not None
    torch.testing.assert_close(y_TD, trained_TD.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(counts_E, trained_counts_E)
    # One token without autograd: the single-token loop (where the expert loop may run at all).
    assert len(few) == int(num_tokens == 1 and expert_by_expert)
    # Gated, several tokens, no autograd: gate and up as two products; never under autograd.
    assert splits == [kind != "mlp" and num_tokens > 1, False]


def test_an_evaluation_forward_computes_no_router_losses() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, shared_expert_init="zero_out")
    ids = tokens()
    trained = model.train()(input_ids=ids).logits
    aux_loss(model)  # take the training forward's losses
    layers = [layer for _, layer in moe_layers(model)]
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids).logits
        assert all(layer.infers() for layer in layers)
    torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="run a forward first"):  # nothing collected: nobody trains on it
        aux_loss(model)
    assert all(int(layer.tokens_per_expert.sum()) == 2 * ids.numel() * K for layer in layers)  # both forwards counted
    for layer in layers:  # monitors read the statistics: the full path again
        layer.collect_stats = True
    with torch.no_grad():
        model(input_ids=ids)
        assert not any(layer.infers() for layer in layers)
        assert torch.isfinite(aux_loss(model))  # logged
    assert all(float(layer.stat_sums[0]) == ids.numel() for layer in layers)


def test_generate_gives_the_same_tokens_as_the_dense_model() -> None:
    """Greedy decoding through every inference path (prefill: several tokens; decode: one at a
    time, the single-token loop) reproduces the dense model while the experts are clones."""
    dense = tiny_llama().eval()
    model = moeify.moeify(tiny_llama().eval(), num_experts=4, top_k=2, shared_expert_init="zero_out").eval()
    ids = tokens()[:1]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), dense.generate(ids, **kwargs))
