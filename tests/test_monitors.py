"""The built-in monitors: each failure mode forced, the right monitor fires on the expected step
and the others stay quiet. Two ways: hand-made `LayerStats` for exact control of every number,
and end to end on a tiny converted Llama through `attach_monitors` + the optimizer hook."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from core_helpers import monitored_llama
from host_reads import HostReads
from torch import nn

from moeify import moe_layers
from moeify.layers.experts import ModuleExperts
from moeify.monitors import (
    DeadExperts,
    Deadlock,
    Ecology,
    ExpertHomogenization,
    ImbalanceEarlyWarning,
    LayerStats,
    RouterEntropy,
    SharedMaturity,
    StepStats,
    attach_monitors,
    ecology_number,
    monitor_names,
)
from moeify.monitors.base import DEFAULT_MONITORS
from moeify.monitors.homogenization import distances, expert_weights, fingerprint, group_size, sample_indices

BUILT_IN = (
    "router_entropy",
    "expert_homogenization",
    "dead_experts",
    "deadlock",
    "shared_maturity",
    "ecology",
    "imbalance_early_warning",
)
EVENT_KEYS = {"step", "monitor", "layer", "kind", "detail"}


# ---------------------------------------------------------------- hand-made statistics


def stats_for(
    counts, *, name="l0", depth=0, top_k=1, entropy=0.5, max_prob=0.5, margin=0.1, routed=1.0, shared=0.0
) -> LayerStats:
    """One layer's window with the given top-k assignment counts (tokens = sum / k)."""
    total = float(sum(counts))
    probs = tuple(c / total for c in counts) if total else tuple(0.0 for _ in counts)
    return LayerStats(
        name,
        depth,
        len(counts),
        top_k,
        total / top_k,
        tuple(float(c) for c in counts),
        probs,
        entropy,
        max_prob,
        margin,
        routed,
        shared,
    )


def drive(monitor, windows, *, steps_in_window=1, model=None, first_step=0):
    """Feed one observation per item of `windows` (each a list of LayerStats); return the events."""
    events = []
    for i, layers in enumerate(windows, 1):
        step = first_step + i * steps_in_window
        _, new = monitor.observe(StepStats(step, steps_in_window, list(layers), model))
        events += new
    return events


def kinds(events):
    return [(e["step"], e["kind"], e["layer"], e.get("expert")) for e in events]


def assert_well_formed(events, summary):
    for e in events:
        assert EVENT_KEYS <= set(e), e
        assert isinstance(e["detail"], str) and e["detail"]
    json.dumps(summary)
    json.dumps(events)


def test_built_in_monitors_are_registered_and_on_by_default():
    assert set(BUILT_IN) <= set(monitor_names())
    assert set(BUILT_IN) <= set(DEFAULT_MONITORS)


@pytest.mark.parametrize("steps_in_window", [1, 10])
def test_dead_after_n_steps_then_revived(steps_in_window):
    dead = DeadExperts(dead_after=100)
    starving = [[stats_for([10, 0, 5, 5])]] * (100 // steps_in_window)
    assert drive(dead, starving[1:], steps_in_window=steps_in_window) == []  # one window short
    events = drive(dead, starving[:1], steps_in_window=steps_in_window, first_step=100 - steps_in_window)
    assert kinds(events) == [(100, "dead", "l0", 1)]
    assert events[0]["since"] == 1
    assert dead.summary()["layers"]["l0"]["dead_now"] == [1]
    # A window without any token in the layer neither counts nor breaks the streak.
    windows = [[stats_for([0, 0, 0, 0])], [stats_for([10, 2, 5, 5])]]
    events = drive(dead, windows, steps_in_window=steps_in_window, first_step=100)
    assert kinds(events) == [(100 + 2 * steps_in_window, "revived", "l0", 1)]
    assert events[0]["dead_for"] == 100
    layer = dead.summary()["layers"]["l0"]
    assert layer == {"dead_now": [], "ever_dead": [1], "revived": 1, "longest_zero_steps": 100, "dead_prob_max": 0.0}


def test_deadlock_share_is_relative_to_one_over_k():
    # top-2 over 4 experts: expert 2 in 92% of the tokens' top-2 = share 0.46 = 0.92 of the max 1/2.
    locked = stats_for([30, 24, 92, 54], top_k=2)
    near = stats_for([30, 26, 88, 56], top_k=2)  # 0.88 < tau
    deadlock = Deadlock(tau=0.9, patience=50, prob_tau=None)  # counts alone (probabilities: test_monitor_claims)
    assert drive(deadlock, [[near]] * 100) == []
    events = drive(deadlock, [[locked]] * 60, first_step=100)
    assert kinds(events) == [(150, "deadlocked", "l0", 2)]
    assert events[0]["since"] == 101
    events = drive(deadlock, [[near]], first_step=160)
    assert kinds(events) == [(161, "recovered", "l0", 2)]
    assert events[0]["steps"] == 60
    assert deadlock.summary()["layers"]["l0"]["episodes"] == [{"expert": 2, "start": 101, "end": 161}]


def test_deadlock_restarts_when_the_dominant_expert_changes_and_skips_k_ge_e():
    deadlock = Deadlock(tau=0.9, patience=5)
    flip = [[stats_for([100, 0, 0])]] * 3 + [[stats_for([0, 100, 0])]] * 4
    assert drive(deadlock, flip) == []
    assert drive(deadlock, [[stats_for([0, 100, 0])]]) != []
    assert drive(Deadlock(patience=1), [[stats_for([100, 100], top_k=2)]] * 5) == []


def _profile(deadlocked_depths, num_layers, steps=10):
    deadlock = Deadlock(tau=0.9, patience=1)
    windows = [
        [
            stats_for([100, 0, 0, 0] if d in deadlocked_depths else [25, 25, 25, 25], name=f"l{d}", depth=d)
            for d in range(num_layers)
        ]
    ] * steps
    drive(deadlock, windows)
    return deadlock.summary()["model"]["depth_profile"]


def test_deadlock_depth_profile_u_shape():
    profile = _profile({0, 2}, 3)
    assert profile["deadlocked_fraction"] == [1.0, 0.0, 1.0]
    assert profile["u_thirds"] == 1.0
    assert profile["u_quadratic"] == pytest.approx(4.0)
    u = _profile({0, 1, 5, 6}, 7)
    assert u["thirds"] == {"shallow": 1.0, "middle": 0.0, "deep": 1.0}
    assert u["u_thirds"] == 1.0 and u["u_quadratic"] > 0
    assert u["ever_deadlocked_fraction"] == pytest.approx(4 / 7)
    hump = _profile({3}, 7)
    assert hump["u_thirds"] < 0 and hump["u_quadratic"] < 0


def test_soft_saturation_and_hard_saturation():
    monitor = RouterEntropy(soft_patience=100, hard_patience=10, reference_steps=1)
    # "soft" starts separating its experts (the reference) and flattens from step 2 on.
    start = stats_for([40, 20, 30, 10, 13, 13, 13, 13], name="soft", entropy=0.8, max_prob=0.4, margin=0.05)
    uniform = stats_for([13] * 8, name="soft", entropy=0.99, max_prob=0.13, margin=0.001)  # margin_rel 0.008
    onehot = stats_for([100, 0, 0, 0], name="hard", depth=1, entropy=0.01, max_prob=0.995, margin=0.99)
    healthy = stats_for([40, 20, 30, 10], name="ok", depth=2, entropy=0.7, max_prob=0.5, margin=0.05)
    events = drive(monitor, [[start, onehot, healthy]] + [[uniform, onehot, healthy]] * 100)
    assert kinds(events) == [(10, "saturated", "hard", None), (101, "soft_saturation", "soft", None)]
    assert events[1]["reference_entropy"] == 0.8
    recovered = [
        stats_for([13] * 8, name="soft", entropy=0.9, margin=0.05),  # margin_rel 0.4
        stats_for([100, 0, 0, 0], name="hard", depth=1, max_prob=0.9),
        healthy,
    ]
    events = drive(monitor, [recovered], first_step=101)
    assert {e["kind"] for e in events} == {"soft_saturation_ended", "saturation_ended"}
    summary = monitor.summary()
    assert summary["layers"]["soft"]["soft_saturated_steps"] == 1 and summary["layers"]["hard"]["saturated_steps"] == 92
    assert_well_formed(events, summary)


def test_soft_saturation_needs_a_small_margin():
    # Moved toward uniform, but decisive about the k-th choice: the router still separates experts.
    start = stats_for([13] * 8, entropy=0.8, max_prob=0.4, margin=0.01)
    decisive = stats_for([13] * 8, entropy=0.95, max_prob=0.2, margin=0.01)  # margin_rel 0.08
    monitor = RouterEntropy(soft_patience=5, reference_steps=1)
    assert drive(monitor, [[start]] + [[decisive]] * 50) == []
    assert monitor.summary()["layers"]["l0"]["reference"] == {"steps": 1, "entropy": 0.8, "max_prob": 0.4}


def test_ecology_number():
    assert ecology_number(1.0, 0.01, 0.0, 0.01) == pytest.approx(1.0)
    assert ecology_number(2.0, 0.01, 0.03, 0.01) == pytest.approx(0.5)
    assert ecology_number(1.0, 0.0, 0.0, 0.01) == 0.0
    assert ecology_number(1.0, 0.01, 0.0, 0.0) == math.inf


def _ar(n, phi, seed, sigma=0.02):
    """An AR(1) deviation of expert 0's share from 1/2; `phi` may depend on the step."""
    rng, x, out = random.Random(seed), 0.0, []
    for t in range(n):
        x = (phi(t) if callable(phi) else phi) * x + rng.gauss(0.0, sigma)
        out.append(max(-0.45, min(0.45, x)))
    return out


def _two_experts(deviations):
    return [[stats_for([round(1000 * (0.5 + d)), round(1000 * (0.5 - d))])] for d in deviations]


def test_early_warning_fires_on_critical_slowing_down():
    # The AR coefficient ramps 0.1 -> 0.97 after 100 steady observations: fluctuations grow
    # larger and slower, as near the pitchfork of the mean-field routing model.
    ramp = _ar(300, lambda t: min(0.97, 0.1 + 0.87 * max(0, t - 100) / 150), seed=1)
    monitor = ImbalanceEarlyWarning()
    events = drive(monitor, _two_experts(ramp))
    assert [e["kind"] for e in events][:1] == ["imbalance_warning"]
    assert 150 < events[0]["step"] <= 300
    layer = monitor.summary()["layers"]["l0"]
    assert layer["variance_ratio"] >= 3 and layer["ac1_rise"] >= 0.3


@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_early_warning_quiet_on_stationary_noise(phi):
    assert drive(ImbalanceEarlyWarning(), _two_experts(_ar(400, phi, seed=2))) == []


def test_early_warning_quiet_on_constant_and_trending_imbalance():
    trend = [0.001 * t for t in range(300)]  # a smooth drift is detrended away
    assert drive(ImbalanceEarlyWarning(), _two_experts(trend)) == []
    assert drive(ImbalanceEarlyWarning(), [[stats_for([100, 0, 0, 0])]] * 200) == []


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared_experts = nn.Identity()


def test_maturity_records_deadlock_ending_after_the_shared_expert_matures():
    model = nn.ModuleDict({"l0": _Shared(), "l1": nn.Module()})
    deadlock = Deadlock(patience=10)
    maturity = SharedMaturity(deadlock=deadlock, mature_ratio=0.5)
    windows = []
    for t in range(1, 81):  # shared/routed ratio grows 0.01 per step; deadlock ends at step 61
        counts = [100, 0, 0, 0] if t <= 60 else [25, 25, 25, 25]
        windows.append([stats_for(counts, shared=0.01 * t), stats_for([25] * 4, name="l1", depth=1)])
    events = []
    for i, layers in enumerate(windows, 1):
        stats = StepStats(i, 1, layers, model)
        events += deadlock.observe(stats)[1] + maturity.observe(stats)[1]
    assert kinds([e for e in events if e["monitor"] == "shared_maturity"]) == [(50, "matured", "l0", None)]
    summary = maturity.summary()
    layer = summary["layers"]["l0"]
    assert "l1" not in summary["layers"]  # no shared experts there
    assert layer["matured_step"] == 50 and layer["deadlocked_steps"] == 60
    (episode,) = layer["episodes"]
    assert episode["start"] == 1 and episode["end"] == 61 and episode["ended_after_maturity"]
    assert episode["ratio_at_start"] == pytest.approx(0.10) and episode["ratio_at_end"] == pytest.approx(0.61)
    assert summary["model"] == {"mature_ratio": 0.5, "episodes_ended": 1, "ended_after_maturity": 1}
    assert_well_formed(events, summary)


def test_maturity_refuses_a_deadlock_monitor_listed_after_it():
    model = nn.ModuleDict({"l0": _Shared()})
    maturity = SharedMaturity(deadlock=Deadlock())
    with pytest.raises(RuntimeError, match="before shared_maturity"):
        maturity.observe(StepStats(1, 1, [stats_for([1, 1])], model))


# ---------------------------------------------------------------- homogenization pieces


def test_fingerprint_distances_exact_on_module_experts():
    torch.manual_seed(0)
    experts = ModuleExperts(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6)), 3)
    weights = expert_weights(experts)
    idx = sample_indices([group_size(g) for g in weights], 4096, torch.Generator().manual_seed(0))
    start = fingerprint(weights, idx)
    assert start.shape == (3, 6 * 8 + 8 + 8 * 6 + 6)  # few parameters: every coordinate
    assert distances(start, start).tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        for p in experts.experts[2].parameters():
            p.mul_(1.1)
    drift, spread, spread_max = distances(fingerprint(weights, idx), start).tolist()
    assert drift == pytest.approx(0.1 / 3)
    assert spread_max == pytest.approx(0.1 / 1.05) and spread == pytest.approx(2 / 3 * 0.1 / 1.05)


def test_fingerprint_samples_large_experts():
    sizes = [100_000, 30_000, 10]
    idx = sample_indices(sizes, 1000, torch.Generator().manual_seed(0))
    assert [len(i) for i in idx] == [769, 231, 1]
    assert all(int(i.max()) < n for i, n in zip(idx, sizes))


# ---------------------------------------------------------------- end to end on a converted model


def tiny_model(**overrides):
    return monitored_llama(**overrides)


def train(model, optimizer, steps, generator):
    for _ in range(steps):
        ids = torch.randint(3, 100, (4, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def quiet_defaults(**chosen):
    """Every built-in monitor with its default thresholds, except the ones given."""
    dead = chosen.pop("dead_experts", DeadExperts())
    deadlock = chosen.pop("deadlock", Deadlock())
    return [
        chosen.pop("router_entropy", RouterEntropy()),
        chosen.pop("expert_homogenization", ExpertHomogenization()),
        dead,
        deadlock,
        SharedMaturity(deadlock=deadlock),
        Ecology(dead=dead),
        ImbalanceEarlyWarning(),
    ]


def test_biased_routers_deadlock_outer_layers_then_recover():
    """Force deadlock in the first and last layer (a U): deadlock fires after `patience` steps,
    dead_experts after `dead_after`; unbiasing brings recovered and revived; nothing else fires."""
    model = tiny_model()
    layers = moe_layers(model)
    bias_E = torch.tensor([3.0, 0.0, 0.0, 0.0])  # p(expert 0) ~ 0.87: every token's top-1, not one-hot
    hooks = [layers[i][1].router.register_forward_hook(lambda m, i, out: out + bias_E) for i in (0, 3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runner = attach_monitors(
        model, quiet_defaults(dead_experts=DeadExperts(dead_after=6), deadlock=Deadlock(patience=5))
    )
    runner.attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(0)
    train(model, optimizer, 8, generator)
    outer = {layers[0][0], layers[3][0]}
    assert sorted(kinds(runner.events)) == sorted(
        [(5, "deadlocked", name, 0) for name in outer] + [(6, "dead", name, e) for name in outer for e in (1, 2, 3)]
    )
    profile = runner.summary()["monitors"]["deadlock"]["model"]["depth_profile"]
    assert profile["u_thirds"] > 0 and profile["u_quadratic"] > 0
    for hook in hooks:
        hook.remove()
    seen = len(runner.events)
    train(model, optimizer, 4, generator)
    later = runner.events[seen:]
    assert {(e["kind"], e["layer"], e["expert"]) for e in later} == (
        {("recovered", name, 0) for name in outer} | {("revived", name, e) for name in outer for e in (1, 2, 3)}
    )
    summary = runner.close()
    assert summary["monitors"]["dead_experts"]["dead_now"] == 0
    assert_well_formed(runner.events, summary)


def test_frozen_experts_stay_homogeneous_and_a_flat_start_is_not_soft_saturation():
    """Routers that cannot separate experts (tiny, frozen) and experts that never move apart
    (frozen clones), read every 2 steps: the clones are reported; the routers never left their
    uniform start, so soft saturation (judged against the start) stays quiet."""
    model = tiny_model(top_k=2)
    for _, layer in moe_layers(model):
        with torch.no_grad():
            layer.router.gate.weight.mul_(1e-4)
        layer.router.requires_grad_(False)
        layer.experts.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    monitors = quiet_defaults(
        router_entropy=RouterEntropy(soft_patience=4),
        expert_homogenization=ExpertHomogenization(every_n_steps=1, warmup=4, patience=2),
    )
    runner = attach_monitors(model, monitors, every_n_steps=2).attach_optimizer(optimizer)
    train(model, optimizer, 8, torch.Generator().manual_seed(0))
    names = [name for name, _ in moe_layers(model)]
    assert sorted(kinds(runner.events)) == sorted([(6, "homogeneous", n, None) for n in names])
    summary = runner.close()
    entropy = summary["monitors"]["router_entropy"]["layers"]
    assert all(v["reference"]["entropy"] > 0.999 and v["soft_saturated_steps"] == 0 for v in entropy.values())
    assert all(v["spread_max"] == 0.0 for v in summary["monitors"]["expert_homogenization"]["layers"].values())
    assert_well_formed(runner.events, summary)


def test_trained_experts_do_not_read_as_homogeneous():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    homogenization = ExpertHomogenization(every_n_steps=1, warmup=2, patience=2)
    runner = attach_monitors(model, [homogenization]).attach_optimizer(optimizer)
    train(model, optimizer, 5, torch.Generator().manual_seed(0))
    assert runner.events == []
    layers = runner.close()["monitors"]["expert_homogenization"]["layers"]
    assert all(v["spread_max"] > 1e-2 and v["drift"] > 1e-2 for v in layers.values())


@pytest.mark.parametrize(
    ("recipe", "oracle", "expected"),
    [({"entropy_loss_weight": 0.0}, 0.0, 0.0), ({}, 0.03, 0.25), ({}, 0.0, None)],
)
def test_ecology_notes_once_below_one_half(recipe, oracle, expected):
    model = tiny_model(**recipe)
    runner = attach_monitors(model, ["dead_experts", Ecology(oracle_weight=oracle)])
    for _ in range(3):
        model(input_ids=torch.randint(3, 100, (2, 8)))
        runner.step()
    if expected is None:
        assert runner.events == []
        assert runner.summary()["monitors"]["ecology"]["model"]["E_min"] == pytest.approx(1.0)
    else:
        (note,) = runner.events
        assert (note["step"], note["kind"], note["layer"], note["severity"]) == (1, "low_ecology", None, "info")
        assert note["E"] == pytest.approx(expected) and len(note["layers"]) == 4
        assert "predicts nothing" in note["detail"] and "likely" not in note["detail"]
    assert_well_formed(runner.events, runner.close())


def test_default_monitors_run_and_summarise():
    model = tiny_model(num_shared_experts=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runner = attach_monitors(model).attach_optimizer(optimizer)
    train(model, optimizer, 3, torch.Generator().manual_seed(0))
    assert set(BUILT_IN) <= set(runner.history[-1]["monitors"])
    assert runner.events == []  # E = 1 and every patience is longer than 3 steps
    summary = runner.close()
    assert set(BUILT_IN) <= set(summary["monitors"])
    assert_well_formed(runner.events, summary)


def test_collecting_statistics_adds_no_host_read_to_forward():
    model = tiny_model(top_k=2)
    _, layer = moe_layers(model)[0]
    x = torch.randn(2, 8, 32)
    calls = {}
    for collect in (False, True):
        layer.reset_stats()
        layer.collect_stats = collect
        with HostReads() as reads:
            layer(x)
        calls[collect] = reads.calls
    assert calls[True] == calls[False]
    assert layer.stat_sums[0] == 16  # tokens were counted on the device


def test_homogenization_measures_drift_from_the_clones_at_attach_time():
    model = tiny_model()
    runner = attach_monitors(model, [ExpertHomogenization(every_n_steps=1)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    runner.attach_optimizer(optimizer)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    first = runner.history[0]["monitors"]["expert_homogenization"]
    # The reference is the clones as converted, so the first step's move is already measured.
    assert all(m["drift"] > 0 for m in first.values())
    runner.close()


def test_attach_monitors_is_public_at_the_top_level():
    import moeify.monitors

    assert moeify.attach_monitors is moeify.monitors.attach_monitors
    assert "attach_monitors" in moeify.__all__
