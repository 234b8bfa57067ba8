"""Monitor state across save / resume: a run of N steps and a run of k steps, saved (through
JSON), loaded into fresh monitors on a model in the same state and continued for N - k steps,
give the same events, records and summary — streaks, windows and references included."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from core_helpers import TimestepToy, monitored_llama
from torch import Tensor, nn

from moeify import aux_loss, moe_layers, moeify
from moeify.integrations import accelerate as integration
from moeify.monitors import (
    DeadExperts,
    Deadlock,
    Ecology,
    ExpertHomogenization,
    ExpertLoad,
    ImbalanceEarlyWarning,
    LostUpdates,
    Monitor,
    RouterEntropy,
    SharedMaturity,
    TimestepRouting,
    attach_monitors,
)

OUTER = ("model.layers.0.mlp", "model.layers.3.mlp")  # the layers the router bias deadlocks


tiny_model = monitored_llama


def lm_loss(model: nn.Module, step: int) -> Tensor:
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(step))
    return model(input_ids=ids, labels=ids).loss  # includes the router losses


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return moeify(TimestepToy(), target_modules=["ff"], num_experts=4, top_k=1, router_init_std=1.0)


def toy_loss(model: nn.Module, step: int) -> Tensor:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(step))
    return model(x, torch.tensor([100.0 + 250 * (step % 4), 900.0])).square().mean() + aux_loss(model)


@dataclass
class Scenario:
    monitors: Callable[[nn.Module, torch.optim.Optimizer], list[Monitor]]
    steps: int
    save_at: int
    check: Callable[[Any], None]  # asserts what the uninterrupted run must show
    model: Callable[[], nn.Module] = tiny_model
    loss: Callable[[nn.Module, int], Tensor] = lm_loss
    bias: dict[str, Any] = field(default_factory=dict)  # {"layers", "value", "until"}: a router logit bias
    lr: float = 1e-3
    every_n_steps: int = 1


def setup(scenario: Scenario) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, int]]:
    model, phase = scenario.model(), {"step": 0}
    if scenario.bias:
        bias_E = torch.tensor([scenario.bias["value"], 0.0, 0.0, 0.0])
        layers = moe_layers(model)
        for i in scenario.bias["layers"]:
            layers[i][1].router.register_forward_hook(
                lambda module, args, out: out + bias_E if phase["step"] < scenario.bias["until"] else out
            )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=scenario.lr)
    return model, optimizer, phase


def train(scenario: Scenario, model: nn.Module, optimizer: torch.optim.Optimizer, phase: dict, steps: range) -> None:
    for step in steps:
        phase["step"] = step
        scenario.loss(model, step).backward()
        optimizer.step()  # the runner steps from the optimizer's post hook
        optimizer.zero_grad()


def uninterrupted(scenario: Scenario):
    model, optimizer, phase = setup(scenario)
    runner = attach_monitors(model, scenario.monitors(model, optimizer), every_n_steps=scenario.every_n_steps)
    runner.attach_optimizer(optimizer)
    train(scenario, model, optimizer, phase, range(scenario.steps))
    return runner


def resumed(scenario: Scenario, *, load: bool = True):
    """k steps, save (runner state through JSON, weights, optimizer), then fresh everything."""
    model, optimizer, phase = setup(scenario)
    runner = attach_monitors(model, scenario.monitors(model, optimizer), every_n_steps=scenario.every_n_steps)
    runner.attach_optimizer(optimizer)
    train(scenario, model, optimizer, phase, range(scenario.save_at))
    saved = json.dumps(runner.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    runner.close()

    model, optimizer, phase = setup(scenario)
    model.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    runner = attach_monitors(model, scenario.monitors(model, optimizer), every_n_steps=scenario.every_n_steps)
    if load:
        runner.load_state_dict(json.loads(saved))
    else:  # what a checkpoint of steps and events alone gives
        runner.steps, runner.events[:] = scenario.save_at, json.loads(saved)["events"]
    runner.attach_optimizer(optimizer)
    train(scenario, model, optimizer, phase, range(scenario.save_at, scenario.steps))
    return runner


def plain(value: Any) -> str:
    """Exact comparison of JSON data (floats by repr; tuples and lists alike)."""
    return json.dumps(value, sort_keys=True)


def assert_same_summary(resumed: Any, full: Any, where: str = "summary") -> None:
    """Equal to the last bit (floats by repr), as everything else a resumed run reports."""
    assert plain(resumed) == plain(full), where


def events_of(runner, kind: str) -> list[tuple]:
    return sorted((e["step"], e["layer"], e.get("expert")) for e in runner.events if e["kind"] == kind)


# ---------------------------------------------------------------- what each uninterrupted run must show


def check_dead_and_deadlock(runner) -> None:
    assert events_of(runner, "deadlocked") == [(5, name, 0) for name in OUTER]
    assert events_of(runner, "dead") == [(6, name, e) for name in OUTER for e in (1, 2, 3)]
    recovered = events_of(runner, "recovered")
    assert [layer for _, layer, _ in recovered] == list(OUTER) and all(step > 8 for step, _, _ in recovered)
    assert sorted(e["layer"] for e in runner.events if e["kind"] == "revived") == sorted(list(OUTER) * 3)
    summary = runner.summary()["monitors"]
    assert summary["deadlock"]["model"]["depth_profile"]["u_thirds"] > 0
    assert summary["dead_experts"]["layers"][OUTER[0]]["ever_dead"] == [1, 2, 3]


def check_maturity(runner) -> None:
    layers = runner.summary()["monitors"]["shared_maturity"]["layers"]
    for name in OUTER:
        (episode,) = layers[name]["episodes"]
        assert (episode["expert"], episode["start"]) == (0, 1) and episode["end"] > 8
    assert layers[OUTER[0]]["ratio_first"] == runner.history[0]["monitors"]["shared_maturity"][OUTER[0]]["ratio"]


def check_ecology(runner) -> None:
    (warning,) = runner.events
    assert (warning["step"], warning["kind"], warning["E"]) == (1, "low_ecology", 0.0)
    assert runner.summary()["monitors"]["ecology"]["model"]["dead_experts"] == 6  # the private DeadExperts


def check_entropy(runner) -> None:
    names = [name for name, _ in runner.layers]
    assert events_of(runner, "saturated") == [(4, names[0], None)]
    # The flat routers never left their start, and soft saturation is judged against it
    # (its streak across a save: tests/test_monitor_claims.py); the start is saved.
    assert events_of(runner, "soft_saturation") == []
    layers = runner.summary()["monitors"]["router_entropy"]["layers"]
    assert layers[names[0]]["saturated_steps"] == 6 and layers[names[1]]["reference"]["steps"] == 8


def check_homogeneous(runner) -> None:
    assert events_of(runner, "homogeneous") == [(3, name, None) for name, _ in runner.layers]


def check_drift(runner) -> None:
    reads = [r for r in runner.history if r["monitors"]["expert_homogenization"]]
    assert [r["step"] for r in reads] == [1, 4, 7]
    drifts = [r["monitors"]["expert_homogenization"][OUTER[0]]["drift"] for r in reads]
    assert 0 < drifts[0] < drifts[1] < drifts[2]  # measured from the clones, not from the resume


def check_early_warning(runner) -> None:
    metrics = runner.history[4]["monitors"]["imbalance_early_warning"][OUTER[0]]
    assert {"variance", "ac1", "variance_ratio"} <= set(metrics)  # the window is full at step 5
    assert runner.summary()["monitors"]["imbalance_early_warning"]["layers"][OUTER[0]]["baseline_variance"] > 0


def check_load(runner) -> None:
    cvs = [r["monitors"]["expert_load"][OUTER[0]]["cv"] for r in runner.history]
    # Deadlocked (cv = sqrt(3)) before the save only: the worst cv is in the saved state.
    assert runner.summary()["monitors"]["expert_load"][OUTER[0]]["worst_cv"] == max(cvs[:2]) > max(cvs[2:])


def check_lost_updates(runner) -> None:
    assert [(e["step"], e["kind"]) for e in runner.events] == [(1, "updates_lost")]
    model = runner.summary()["monitors"]["lost_updates"]["model"]
    assert model["intended"] == sum(r["monitors"]["lost_updates"]["model"]["intended"] for r in runner.history) > 0


def check_timesteps(runner) -> None:
    buckets = runner.summary()["monitors"]["timestep_routing"]["timesteps"]
    assert [(b["timestep"], b["count"]) for b in buckets] == [
        (900.0, 4),
        (850.0, 1),
        (600.0, 1),
        (350.0, 1),
        (100.0, 1),
    ]


def _frozen_routers(**overrides: Any) -> nn.Module:
    model = tiny_model(top_k=2, **overrides)
    for _, layer in moe_layers(model):
        with torch.no_grad():
            layer.router.gate.weight.mul_(1e-4)
        layer.router.requires_grad_(False)
    return model


def _frozen_experts() -> nn.Module:
    model = tiny_model()
    for _, layer in moe_layers(model):
        layer.experts.requires_grad_(False)
    return model


DEADLOCK = {"layers": (0, 3), "value": 3.0, "until": 8}  # p(expert 0) ~ 0.87: every token's top-1

SCENARIOS = {
    # Saved at 3: in the middle of the deadlock (5) and dead (6) streaks; at 6: deadlocked and dead, before recovery.
    "dead_and_deadlock@3": Scenario(
        lambda m, o: [DeadExperts(dead_after=6), Deadlock(patience=5)], 12, 3, check_dead_and_deadlock, bias=DEADLOCK
    ),
    "dead_and_deadlock@6": Scenario(
        lambda m, o: [DeadExperts(dead_after=6), Deadlock(patience=5)], 12, 6, check_dead_and_deadlock, bias=DEADLOCK
    ),
    "shared_maturity": Scenario(
        lambda m, o: [SharedMaturity(patience=5)],
        11,
        4,
        check_maturity,
        model=lambda: tiny_model(num_shared_experts=1),
        bias=DEADLOCK,
    ),
    "ecology": Scenario(
        lambda m, o: [Ecology(dead_after=6)],
        8,
        3,
        check_ecology,
        model=lambda: tiny_model(entropy_loss_weight=0.0),
        bias={**DEADLOCK, "until": 99},
    ),
    # Layer 0 one-hot (bias 10), the others flat: observed every 2 steps, the hard streak and the
    # references of the start cross a save at 2.
    "router_entropy": Scenario(
        lambda m, o: [RouterEntropy(soft_patience=4, hard_patience=3)],
        8,
        2,
        check_entropy,
        model=_frozen_routers,
        bias={"layers": (0,), "value": 10.0, "until": 99},
        every_n_steps=2,
    ),
    "homogenization_patience": Scenario(
        lambda m, o: [ExpertHomogenization(every_n_steps=1, warmup=2, patience=2)],
        5,
        2,
        check_homogeneous,
        model=_frozen_experts,
    ),
    # Trained experts read every 3 steps (1, 4, 7): saved at 2, the reference and the stride survive.
    "homogenization_drift": Scenario(lambda m, o: [ExpertHomogenization(every_n_steps=3)], 7, 2, check_drift, lr=1e-2),
    "imbalance_early_warning": Scenario(
        lambda m, o: [ImbalanceEarlyWarning(window=3, warmup=1, patience=1, variance_ratio=1.01, ac1_rise=0.0)],
        8,
        4,
        check_early_warning,
        lr=1e-2,
    ),
    "expert_load": Scenario(lambda m, o: [ExpertLoad()], 5, 2, check_load, bias={**DEADLOCK, "until": 2}),
    "lost_updates": Scenario(
        lambda m, o: [LostUpdates(o, model=m, sample_size=256)],
        4,
        2,
        check_lost_updates,
        model=lambda: tiny_model().to(torch.bfloat16),
        lr=1e-5,
    ),
    "timestep_routing": Scenario(
        lambda m, o: [TimestepRouting(num_buckets=20)], 4, 2, check_timesteps, model=toy_model, loss=toy_loss
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resumed_run_matches_the_uninterrupted_run(name):
    scenario = SCENARIOS[name]
    full = uninterrupted(scenario)
    scenario.check(full)
    runner = resumed(scenario)
    assert runner.steps == full.steps == scenario.steps
    records_after_save = [r for r in full.history if r["step"] > scenario.save_at]
    assert records_after_save and plain(runner.history) == plain(records_after_save)
    assert plain(runner.events) == plain(full.events)
    assert_same_summary(runner.summary(), full.summary())
    json.dumps(runner.state_dict(), allow_nan=False)  # plain JSON, even strict


def test_without_the_state_a_streak_event_fires_again_late():
    """The failure the state fixes: a deadlock streak restarted at the resume fires 3 steps late,
    and the revived experts report how long they were dead wrongly."""
    scenario = SCENARIOS["dead_and_deadlock@3"]
    runner = resumed(scenario, load=False)
    assert events_of(runner, "deadlocked") == [(8, name, 0) for name in OUTER]
    assert events_of(runner, "deadlocked") != events_of(uninterrupted(scenario), "deadlocked")


# ---------------------------------------------------------------- refusals


def test_other_monitors_or_layers_are_refused_before_anything_changes():
    model = tiny_model()
    runner = attach_monitors(model, ["expert_load", "dead_experts"])
    for step in range(2):
        lm_loss(model, step).backward()
        runner.step()
    state = json.loads(json.dumps(runner.state_dict()))
    dead = DeadExperts()
    other = attach_monitors(tiny_model(), [ExpertLoad(), dead, Deadlock()])
    with pytest.raises(ValueError, match=r"monitors differ(.|\n)*not saved: \['deadlock'\]"):
        other.load_state_dict(state)
    assert (other.steps, other.events, dead.state_dict()["streaks"]) == (0, [], {})
    shallow = attach_monitors(tiny_model(layers=2), ["expert_load", "dead_experts"])
    with pytest.raises(ValueError, match="MoE layers"):
        shallow.load_state_dict(state)
    assert shallow.steps == 0


def test_a_monitor_refusing_its_state_undoes_the_others():
    model = toy_model()
    load = ExpertLoad()
    runner = attach_monitors(model, [load, TimestepRouting(num_buckets=4)])
    toy_loss(model, 0).backward()
    runner.step()
    state = runner.state_dict()
    fresh_load = ExpertLoad()
    other = attach_monitors(toy_model(), [fresh_load, TimestepRouting(num_buckets=8)])
    with pytest.raises(ValueError, match="num_buckets"):
        other.load_state_dict(state)
    assert fresh_load.state_dict() == {"last": {}, "worst_cv": {}} and other.steps == 0


# ---------------------------------------------------------------- through accelerate


def _accelerate_run(tmp_path: Path, steps: int, *, save_at: int | None = None, resume: bool = False):
    accelerator = Accelerator(cpu=True)
    scenario = SCENARIOS["dead_and_deadlock@3"]
    model, optimizer, phase = setup(scenario)
    runner = attach_monitors(model, scenario.monitors(model, optimizer))
    integration.register_state(accelerator, model, runner)
    model, optimizer = integration.prepare(accelerator, model, optimizer)
    if resume:
        accelerator.load_state(str(tmp_path / "checkpoint"))
    for step in range(runner.steps, steps):
        phase["step"] = step
        accelerator.backward(lm_loss(model, step))
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
        if step + 1 == save_at:
            accelerator.save_state(str(tmp_path / "checkpoint"))
    return runner


def test_accelerate_resume_does_not_repeat_a_streak_event(tmp_path, fresh_accelerate):
    full = _accelerate_run(tmp_path, 8, save_at=3)
    AcceleratorState._reset_state(reset_partial_state=True)
    runner = _accelerate_run(tmp_path, 8, resume=True)
    assert [r["step"] for r in runner.history] == [4, 5, 6, 7, 8]
    assert events_of(runner, "deadlocked") == [(5, name, 0) for name in OUTER]  # once, on time
    assert plain(runner.events) == plain(full.events)
    assert_same_summary(runner.summary(), full.summary())
    saved = torch.load(tmp_path / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=True)
    streak = json.loads(saved["monitor_state"])["monitors"]["deadlock"]["layers"][OUTER[0]]["streak"]
    assert (streak["steps"], streak["since"], streak["active"]) == (3, 1, False)


def test_a_checkpoint_of_steps_and_events_alone_still_loads():
    model = tiny_model()
    runner = attach_monitors(model, ["dead_experts"])
    checkpoint = integration.MoeifyCheckpoint(model, runner)
    old = {k: v for k, v in checkpoint.state_dict().items() if k != "monitor_state"}
    old["monitor_steps"], old["monitor_events"] = 7, json.dumps([{"step": 5, "kind": "dead"}])
    checkpoint.load_state_dict(old)
    assert runner.steps == 7 and runner.events == [{"step": 5, "kind": "dead"}]
