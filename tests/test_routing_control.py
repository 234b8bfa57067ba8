"""Routing control: sigmoid scores, top-1 that learns, auxiliary-loss-free bias balancing, live
settings and schedules (`moeify.set_routing`), and their round trips through checkpoints."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from core_helpers import llama_config, logits, tiny_llama, tokens
from transformers import AutoModelForCausalLM

import moeify
from moeify import Schedule, set_routing
from moeify.control import routing_control
from moeify.integrations.accelerate import MoeifyCheckpoint
from moeify.layers import moe as moe_module
from moeify.layers.scoring import choose, scores

NO_AUX = {"balance_loss_weight": 0.0, "z_loss_weight": 0.0}


def _convert(seed: int = 0, layers: int = 2, **recipe) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(num_hidden_layers=layers))
    return moeify.moeify(model, **{"num_experts": 4, "top_k": 2} | recipe)


def _train(model: torch.nn.Module, steps: int, optimizer: torch.optim.Optimizer, seed: int = 1) -> None:
    model.train()
    for step in range(steps):
        ids = tokens(seed=seed + step, batch=4, seq=16)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ------------------------------------------------------------------ identity at conversion


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("bias_rate", [0.0, 1e-3])
def test_converted_model_reproduces_dense(score, top_k, bias_rate):
    model, ids = tiny_llama(), tokens()
    dense = logits(model, ids)
    moeify.moeify(model, num_experts=4, top_k=top_k, router_score=score, balance_bias_rate=bias_rate)
    torch.testing.assert_close(logits(model, ids), dense, atol=1e-5, rtol=0)
    for _, layer in moeify.moe_layers(model):
        assert layer.router_score == score
        assert (layer.expert_bias is not None) == (bias_rate > 0)
        if bias_rate:
            assert torch.equal(layer.expert_bias, torch.zeros(4))  # law 3: only the routers are random


def test_sigmoid_scores_renormalise_the_chosen_experts():
    logits_TE = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    scores_TE, probs_TE = scores(logits_TE, 1.0, "sigmoid")
    torch.testing.assert_close(scores_TE, torch.sigmoid(logits_TE))
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(1))
    idx_TK, weights_TK, top_TK1 = choose(scores_TE, probs_TE, 2, None)
    assert idx_TK.tolist() == [[0, 3]]
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights_TK, (s / s.sum()).unsqueeze(0))
    torch.testing.assert_close(top_TK1, probs_TE.topk(3).values)


def test_sigmoid_weights_stay_finite_when_scores_underflow():
    scores_TE, probs_TE = scores(torch.full((1, 4), -200.0), 1.0, "sigmoid")
    assert scores_TE.eq(0).all()
    for k in (1, 2):
        _, weights_TK, _ = choose(scores_TE, probs_TE, k, None)
        assert torch.isfinite(weights_TK).all()


# ------------------------------------------------------------------ top-1 that learns


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_top1_router_gets_a_task_gradient_without_router_losses(score):
    model = _convert(top_k=1, router_score=score, **NO_AUX)
    model.train()
    ids = tokens(batch=4, seq=16)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.abs().max().item() for n, p in model.named_parameters() if ".router." in n]
    assert min(grads) > 1e-5  # renormalised s / s gave exactly 0
    layer = moeify.moe_layers(model)[0][1]
    x_TD = torch.randn(6, 32)
    weights_TK = layer.route(x_TD, x_TD.shape[:-1])[4]
    assert torch.equal(weights_TK, torch.ones(6, 1))  # value exactly 1: the clone identity holds


# ------------------------------------------------------------------ bias balancing


def test_bias_moves_by_the_rate_against_each_steps_counts():
    model = _convert(balance_bias_rate=0.01, **NO_AUX)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the routers stay: only the bias moves
    control = set_routing(model, optimizer=optimizer)
    layers = [layer for _, layer in moeify.moe_layers(model)]
    model.train()
    ids = tokens(batch=4, seq=16)
    model(input_ids=ids, labels=ids).loss.backward()
    counts = [layer.bias_counts.clone().float() for layer in layers]
    assert all(c.sum().item() == 4 * 16 * 2 for c in counts)  # every training token, top-2
    optimizer.step()
    assert control.steps == 1
    for layer, c in zip(layers, counts):
        delta = 0.01 * torch.sign(c.mean() - c)
        torch.testing.assert_close(layer.expert_bias, delta - delta.mean())
        assert layer.bias_counts.sum().item() == 0
    # Evaluation forwards do not count, and no step: no move.
    before = [layer.expert_bias.clone() for layer in layers]
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(layer.bias_counts.sum().item() == 0 for layer in layers)
    assert all(torch.equal(b, layer.expert_bias) for b, layer in zip(before, layers))


def test_bias_changes_the_choice_never_the_weights():
    model = _convert(balance_bias_rate=1e-3)
    layer = moeify.moe_layers(model)[0][1]
    x_TD = torch.randn(10, 32)
    _, probs_TE, _, _, _ = layer.route(x_TD, x_TD.shape[:-1])
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))
    _, probs2_TE, _, idx_TK, weights_TK = layer.route(x_TD, x_TD.shape[:-1])
    assert torch.equal(probs2_TE, probs_TE)
    assert sorted(set(idx_TK.flatten().tolist())) == [2, 3]
    expected = probs_TE[:, 2:] / probs_TE[:, 2:].sum(-1, keepdim=True)
    torch.testing.assert_close(weights_TK.sort(-1).values, expected.sort(-1).values)


def _load_cv(model: torch.nn.Module, steps: int, seed: int) -> float:
    """Mean coefficient of variation of the layers' load over the last steps of training."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    set_routing(model, optimizer=optimizer)
    _train(model, steps - 5, optimizer, seed=seed)
    layers = [layer for _, layer in moeify.moe_layers(model)]
    for layer in layers:
        layer.tokens_per_expert.zero_()
    _train(model, 5, optimizer, seed=seed + 100)
    cvs = [(c.float().std(unbiased=False) / c.float().mean()).item() for c in (x.tokens_per_expert for x in layers)]
    return sum(cvs) / len(cvs)


def test_bias_balances_a_skewed_router_without_router_losses():
    def skewed(rate: float) -> torch.nn.Module:
        model = _convert(balance_bias_rate=rate, **NO_AUX)
        for _, layer in moeify.moe_layers(model):  # a gate whose bias favours experts 0 and 1 for every token
            gate = torch.nn.Linear(32, 4)
            with torch.no_grad():
                gate.weight.copy_(layer.router.gate.weight)
                gate.bias.copy_(torch.tensor([2.0, 1.0, 0.0, 0.0]))
            layer.router.gate = gate
        return model

    off, on = _load_cv(skewed(0.0), 30, seed=3), _load_cv(skewed(0.02), 30, seed=3)
    assert off > 0.5  # measured 1.0: experts 0 and 1 take every token
    assert on < 0.3 * off  # measured 0.13


def test_warns_when_nothing_steps_the_bias(monkeypatch):
    monkeypatch.setattr(moe_module, "_warned_unstepped", False)
    model = _convert(balance_bias_rate=1e-3)
    model.train()
    ids = tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(moe_module.MAX_UNSTEPPED_FORWARDS + 1):
                model(input_ids=ids)
    assert any("nothing steps them" in str(w.message) and "optimizer=optimizer" in str(w.message) for w in caught)


def test_bias_stays_fp32_and_survives_deepcopy():
    model = _convert(balance_bias_rate=1e-3)
    layer = moeify.moe_layers(model)[0][1]
    layer.expert_bias.fill_(0.25)
    model.to(torch.bfloat16)
    assert layer.expert_bias.dtype == torch.float32
    copied = copy.deepcopy(model)
    assert torch.equal(moeify.moe_layers(copied)[0][1].expert_bias, torch.full((4,), 0.25))


# ------------------------------------------------------------------ live settings and schedules


def test_set_routing_changes_named_layers_live():
    model = _convert(layers=3)
    names = [name for name, _ in moeify.moe_layers(model)]
    control = set_routing(model, balance_loss_weight=0.1, router_temperature=2.0)
    assert all(s["balance_loss_weight"] == 0.1 and s["router_temperature"] == 2.0 for s in control.settings().values())
    set_routing(model, layers=[names[1]], balance_bias_rate=0.01, z_loss_weight=0.0)
    layers = dict(moeify.moe_layers(model))
    assert layers[names[1]].balance_bias_rate == 0.01 and layers[names[1]].expert_bias is not None
    assert layers[names[0]].expert_bias is None and layers[names[0]].loss_weights["z_loss"] == 1e-3
    assert layers[names[1]].temperature == 2.0  # untouched settings keep their values


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"balance_loss_weight": -0.1}, "balance_loss_weight must be a finite number >= 0"),
        ({"router_temperature": 0.0}, "router_temperature must be a finite number > 0"),
        ({"z_loss_weight": float("nan")}, "z_loss_weight"),
        ({"entropy_loss_weight": True}, "entropy_loss_weight"),
        ({"balance_bias_rate": Schedule(((0, 0.1), (5, -1.0)))}, "balance_bias_rate"),
        ({"top_k": 1}, "unknown setting 'top_k'"),
        ({"layers": ["model.layers.9.mlp"], "balance_loss_weight": 0.1}, "are not MoE layers"),
        ({"optimizer": object(), "balance_loss_weight": 0.1}, "must be a torch.optim.Optimizer"),
    ],
)
def test_set_routing_refuses_bad_input_before_any_change(kwargs, match):
    model = _convert()
    before = routing_control(model).state_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        set_routing(model, balance_loss_weight=0.5, **kwargs) if "balance_loss_weight" not in kwargs else set_routing(
            model, **kwargs
        )
    assert routing_control(model).state_dict() == before


def test_set_routing_needs_a_converted_model():
    with pytest.raises(ValueError, match="call moeify"):
        set_routing(tiny_llama(), balance_loss_weight=0.1)


def test_schedule_values():
    linear = Schedule.linear(0.1, 0.0, steps=10, begin=5)
    assert [linear(s) for s in (0, 5, 10, 15, 99)] == pytest.approx([0.1, 0.1, 0.05, 0.0, 0.0])
    assert [Schedule.warmup(1.0, steps=4)(s) for s in (0, 1, 4, 8)] == pytest.approx([0.0, 0.25, 1.0, 1.0])
    steps = Schedule(((0, 0.0), (3, 0.5), (6, 0.2)), "step")
    assert [steps(s) for s in range(8)] == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.2, 0.2]
    assert Schedule.from_dict(json.loads(json.dumps(steps.to_dict()))) == steps
    for bad in [(), ((0, 1.0), (0, 2.0)), ((-1, 1.0),), ((0, float("inf")),), ((0.5, 1.0),)]:
        with pytest.raises(ValueError, match="Schedule"):
            Schedule(bad)
    with pytest.raises(ValueError, match="interpolation"):
        Schedule(((0, 1.0),), "cosine")


def test_schedules_follow_optimizer_steps_and_a_value_replaces_them():
    model = _convert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = Schedule.linear(0.1, 0.0, steps=4)
    control = set_routing(
        model, optimizer=optimizer, balance_loss_weight=schedule, entropy_loss_weight=Schedule.warmup(0.01, steps=2)
    )
    set_routing(model, optimizer=optimizer)  # hooking twice steps once
    layer = moeify.moe_layers(model)[0][1]
    seen = [layer.loss_weights["balance"]]
    for step in range(5):
        _train(model, 1, optimizer, seed=step)
        seen.append(layer.loss_weights["balance"])
    assert control.steps == 5
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0, 0.0])
    assert layer.loss_weights["entropy"] == pytest.approx(0.01)
    set_routing(model, balance_loss_weight=0.3)
    _train(model, 1, optimizer)
    assert (
        layer.loss_weights["balance"] == 0.3
        and "balance_loss_weight" not in control.schedules[moeify.moe_layers(model)[0][0]]
    )


# ------------------------------------------------------------------ saved with the model and the run


def _steered(optimizer_steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _convert(balance_bias_rate=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    set_routing(
        model, optimizer=optimizer, balance_loss_weight=Schedule.linear(0.1, 0.0, steps=10), router_temperature=0.5
    )
    names = [name for name, _ in moeify.moe_layers(model)]
    set_routing(model, layers=names[:1], balance_bias_rate=0.0)  # its bias stays, frozen
    _train(model, optimizer_steps, optimizer)
    return model.eval(), optimizer


def test_routing_state_round_trips_through_save_pretrained(tmp_path):
    model, _ = _steered()
    control = routing_control(model)
    moeify.save_pretrained(model, tmp_path / "ckpt")
    loaded = moeify.from_pretrained(tmp_path / "ckpt")
    again = routing_control(loaded)
    assert again.state_dict() == control.state_dict()
    for (_, a), (_, b) in zip(moeify.moe_layers(model), moeify.moe_layers(loaded)):
        assert torch.equal(a.expert_bias, b.expert_bias)
    assert moeify.moe_layers(loaded)[1][1].expert_bias.abs().sum() > 0  # layer 0's stayed at zero: rate 0
    ids = tokens()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    # The schedule goes on from the saved step.
    again.step()
    assert moeify.moe_layers(loaded)[1][1].loss_weights["balance"] == pytest.approx(0.1 * (1 - 4 / 10))


def test_routing_state_rides_the_accelerate_checkpoint():
    model, _ = _steered()
    saved = json.loads(json.dumps(MoeifyCheckpoint(model).state_dict()))  # accelerate pickles primitives
    fresh = _convert(balance_bias_rate=0.01)
    MoeifyCheckpoint(fresh).load_state_dict(saved)
    assert routing_control(fresh).state_dict() == routing_control(model).state_dict()


def test_prepare_hooks_the_optimizer_once_per_real_step(fresh_accelerate):
    from accelerate import Accelerator

    from moeify.integrations.accelerate import prepare

    model = _convert(balance_bias_rate=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = prepare(accelerator, model, optimizer)
    model.train()
    for step in range(4):  # 4 micro-batches, 2 optimizer steps
        with accelerator.accumulate(model):
            ids = tokens(seed=step, batch=2, seq=8)
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert routing_control(model).steps == 2


def test_trainer_callback_steps_the_routing_control():
    from moeify.sinks import MoeifyCallback

    model = _convert(balance_bias_rate=0.01)
    callback = MoeifyCallback(model=model)
    model.train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    callback.on_step_end(None, None, None)
    assert routing_control(model).steps == 1
    assert moeify.moe_layers(model)[0][1].expert_bias.abs().sum() > 0
    with pytest.raises(ValueError, match="monitor runner"):
        MoeifyCallback()


def test_export_refuses_what_native_routers_cannot_do(tmp_path):
    from moeify import ExportError, export

    for recipe, match in [
        ({"router_score": "sigmoid"}, "router_score='sigmoid'"),
        ({"balance_bias_rate": 0.01}, "nonzero expert bias"),
    ]:
        model = _convert(num_shared_experts=0, **recipe)
        if "balance_bias_rate" in recipe:
            moeify.moe_layers(model)[0][1].expert_bias.fill_(0.5)
        with pytest.raises(ExportError, match=match):
            export(model, tmp_path / "out", "mixtral")
    model = _convert(num_shared_experts=0, balance_bias_rate=0.01)  # a zero bias exports
    export(model, tmp_path / "ok", "mixtral")


def test_model_card_shows_routing_changed_during_training():
    model, _ = _steered()
    card = str(moeify.model_card(model))
    assert "Routing settings changed during training" in card and "after 3 optimizer" in card
    assert '"router_temperature": 0.5' in card and '"balance_bias_rate": 0.0' in card
    assert '"balance_loss_weight"' in card and '"points"' in card  # the schedule
    plain = _convert()
    assert "changed during training" not in str(moeify.model_card(plain))
    set_routing(plain, balance_loss_weight=0.01)  # the recipe's own value: nothing changed
    assert "changed during training" not in str(moeify.model_card(plain))


def test_a_deep_copy_is_hooked_to_its_own_optimizer_only():
    model = _convert(balance_bias_rate=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    set_routing(model, optimizer=optimizer, balance_loss_weight=Schedule.linear(0.1, 0.0, steps=10))
    _train(model, 1, optimizer)
    copied, copied_optimizer = copy.deepcopy((model, optimizer))
    assert not routing_control(copied).hooked  # torch's optimizers do not copy their hooks
    set_routing(copied, optimizer=copied_optimizer)
    _train(copied, 2, copied_optimizer)
    assert routing_control(copied).steps == 3 and routing_control(model).steps == 1
    assert moeify.moe_layers(copied)[0][1].loss_weights["balance"] == pytest.approx(0.07)
    assert moeify.moe_layers(model)[0][1].loss_weights["balance"] == pytest.approx(0.09)
