"""Remedies: monitors that act on other monitors' events through the routing control."""

from __future__ import annotations

import json

import pytest
import torch
from core_helpers import llama_config, tokens
from transformers import AutoModelForCausalLM

import moeify
from moeify.control import BreakDeadlock, ReviveDeadExperts, SharedWarmup, reinit_router_rows, routing_control
from moeify.monitors import DeadExperts, attach_monitors
from moeify.monitors.base import StepStats, event


def _convert(**recipe) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(num_hidden_layers=2))
    return moeify.moeify(model, **{"num_experts": 4, "top_k": 2} | recipe)


def _names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in moeify.moe_layers(model)]


def _observe(remedy, model, step: int, events: list) -> list:
    stats = StepStats(step, 1, [], model, events=events)
    return remedy.observe(stats)[1]


@pytest.mark.parametrize(("remedy_type", "trigger"), [(ReviveDeadExperts, "dead"), (BreakDeadlock, "deadlocked")])
@pytest.mark.parametrize(
    ("action", "setting", "value"), [("balance", "balance_loss_weight", 0.1), ("bias", "balance_bias_rate", 0.01)]
)
def test_boost_on_the_trigger_then_back(remedy_type, trigger, action, setting, value):
    model = _convert()
    names = _names(model)
    remedy = remedy_type(action=action, duration=3)
    remedy.attach(model, names)
    control = routing_control(model)
    before = control.settings()[names[0]][setting]
    other = event(1, "x", names[0], "something_else", "")
    applied = _observe(remedy, model, 1, [other, event(1, "m", names[0], trigger, "", expert=2)])
    assert [e["kind"] for e in applied] == ["remedy_applied"] and applied[0]["value"] == value
    assert control.settings()[names[0]][setting] == value and control.settings()[names[1]][setting] == before
    # A second trigger while boosted changes nothing; the boost ends after `duration` steps.
    assert _observe(remedy, model, 2, [event(2, "m", names[0], trigger, "", expert=2)]) == []
    assert _observe(remedy, model, 3, []) == []
    ended = _observe(remedy, model, 4, [])
    assert [e["kind"] for e in ended] == ["remedy_ended"]
    assert control.settings()[names[0]][setting] == before
    assert remedy.summary()["applied"] == 1


def test_boost_state_resumes_exactly():
    model = _convert()
    names = _names(model)
    remedy = BreakDeadlock(duration=5)
    remedy.attach(model, names)
    _observe(remedy, model, 1, [event(1, "deadlock", names[1], "deadlocked", "", expert=0)])
    state = json.loads(json.dumps(remedy.state_dict()))
    again = BreakDeadlock(duration=5)
    again.attach(model, names)
    again.load_state_dict(state)
    assert [e["kind"] for e in _observe(again, model, 6, [])] == ["remedy_ended"]
    assert routing_control(model).settings()[names[1]]["balance_loss_weight"] == 0.01


def test_reinit_router_rows_redraws_only_the_dead_experts_rows():
    for router in ("linear", "mlp"):
        model = _convert(router=router, balance_bias_rate=1e-3)
        layer = moeify.moe_layers(model)[0][1]
        layer.expert_bias.copy_(torch.tensor([0.1, -0.3, 0.0, 0.2]))
        before = {n: p.clone() for n, p in layer.router.named_parameters()}
        torch.manual_seed(5)
        assert reinit_router_rows(layer, 1) == 1
        for n, p in layer.router.named_parameters():
            if p.shape[0] == 4:  # the projection onto the experts
                assert not torch.equal(p[1], before[n][1])
                assert torch.equal(p[[0, 2, 3]], before[n][[0, 2, 3]])
            else:
                assert torch.equal(p, before[n])
        assert layer.expert_bias[1].item() == pytest.approx(0.0, abs=1e-6)  # the mean of the biases


def test_revive_by_router_reinit_in_a_real_run():
    """Expert 3's gate has a logit bias of -100, so it is never chosen: dead_experts names it after
    3 steps and the remedy re-draws its router row (bias 0), after which it gets tokens again."""
    model = _convert(balance_loss_weight=0.0, z_loss_weight=0.0)
    for _, layer in moeify.moe_layers(model):
        gate = torch.nn.Linear(32, 4)
        with torch.no_grad():
            gate.weight.copy_(layer.router.gate.weight)
            gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))
        layer.router.gate = gate
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # only the remedy changes the routers
    runner = attach_monitors(model, [DeadExperts(dead_after=3), ReviveDeadExperts(action="reinit_router")])
    runner.attach_optimizer(optimizer)
    model.train()
    for step in range(6):
        ids = tokens(seed=step, batch=4, seq=16)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    kinds = [(e["monitor"], e["kind"]) for e in runner.events]
    assert ("dead_experts", "dead") in kinds and ("revive_dead_experts", "remedy_applied") in kinds
    assert ("dead_experts", "revived") in kinds  # it got tokens after the re-draw
    applied = [e for e in runner.events if e["kind"] == "remedy_applied"]
    dead = [e for e in runner.events if e["kind"] == "dead"]
    assert applied[0]["step"] == dead[0]["step"] and applied[0]["expert"] == 3


def test_a_remedy_needs_the_monitor_it_acts_on():
    model = _convert()
    with pytest.raises(ValueError, match=r"acts on the events of \['dead_experts'\]"):
        attach_monitors(model, ["expert_load", "revive_dead_experts"])
    with pytest.raises(ValueError, match="action must be one of"):
        BreakDeadlock(action="reinit_router")
    with pytest.raises(ValueError, match="duration"):
        ReviveDeadExperts(duration=0)


def test_shared_warmup_freezes_routers_until_the_shared_expert_matures():
    model = _convert(shared_expert_init="zero_out")
    names = _names(model)
    remedy = SharedWarmup(max_steps=10)
    remedy.attach(model, names)
    routers = [layer.router for _, layer in moeify.moe_layers(model)]
    assert all(not p.requires_grad for r in routers for p in r.parameters())
    released = _observe(remedy, model, 2, [event(2, "shared_maturity", names[0], "matured", "")])
    assert [e["layer"] for e in released] == [names[0]]
    assert all(p.requires_grad for p in routers[0].parameters())
    assert all(not p.requires_grad for p in routers[1].parameters())
    assert [e["layer"] for e in _observe(remedy, model, 10, [])] == [names[1]]  # max_steps
    assert remedy.summary()["released_at"] == {names[0]: 2, names[1]: 10}
