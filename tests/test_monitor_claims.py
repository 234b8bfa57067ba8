"""The routing monitors say what their papers say, and no more: the ecology number's sufficient
condition (and nothing below it), soft saturation judged against the start of training, deadlock
judged on router probabilities as well as top-k counts, an interval for the depth profile, and
the dead-expert definition next to the paper's. Hand-made `LayerStats` give every number exactly;
one end-to-end run on a tiny converted Llama."""

from __future__ import annotations

import json

import pytest
import torch
from core_helpers import monitored_llama
from torch import nn

from moeify import moe_layers
from moeify.hub.card import routing_health
from moeify.monitors import DeadExperts, Deadlock, Ecology, LayerStats, RouterEntropy, StepStats, attach_monitors


def layer_stats(
    counts, probs=None, *, name="l0", depth=0, top_k=1, entropy=0.5, max_prob=0.5, margin=0.1
) -> LayerStats:
    """One layer's window: top-k assignment counts and mean router probabilities (default: the
    count shares)."""
    total = float(sum(counts))
    probs = probs if probs is not None else tuple(c / total for c in counts)
    return LayerStats(
        name, depth, len(counts), top_k, total / top_k, tuple(counts), tuple(probs), entropy, max_prob, margin, 1.0, 0.0
    )


def drive(monitor, windows, *, model=None, first_step=0):
    events = []
    for i, layers in enumerate(windows, 1):
        events += monitor.observe(StepStats(first_step + i, 1, list(layers), model))[1]
    return events


def resumed(make, windows, save_at, *, model=None):
    """Run `windows` through make(), saved (through JSON) after `save_at` and loaded into a fresh
    make(): (events, monitor) of the resumed run, and of an uninterrupted one."""
    full = make()
    full_events = drive(full, windows, model=model)
    first = make()
    events = drive(first, windows[:save_at], model=model)
    second = make()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    events += drive(second, windows[save_at:], model=model, first_step=save_at)
    return (events, second), (full_events, full)


def plain(value) -> str:
    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------- ecology


class _Layer(nn.Module):
    """What the ecology monitor reads from a MoeLayer."""

    def __init__(self, entropy_weight: float) -> None:
        super().__init__()
        self.temperature = 1.0
        self.loss_weights = {"balance": 0.01, "z_loss": 0.001, "entropy": entropy_weight}


def test_default_recipe_gets_one_note_that_forecasts_nothing():
    model = monitored_llama(entropy_loss_weight=0.0)  # moeify's default H = 0, so E = 0
    runner = attach_monitors(model, ["dead_experts", "ecology"])
    for _ in range(3):
        model(input_ids=torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0)))
        runner.step()
    (note,) = runner.events
    assert (note["step"], note["kind"], note["severity"], note["E"]) == (1, "low_ecology", "info", 0.0)
    assert "E >= 0.5 sufficient for zero dead experts" in note["detail"]
    assert "below 0.5 it predicts nothing" in note["detail"] and "forecasts no dead experts" in note["detail"]
    assert "T=1, H=0, B=0.01, O=0: moeify has no oracle loss" in note["detail"]
    assert "likely" not in note["detail"]
    model_summary = runner.close()["monitors"]["ecology"]["model"]
    assert model_summary["oracle_weight"] == 0.0 and model_summary["covered_by_claim"] == []
    assert len(model_summary["below_threshold"]) == 4 and model_summary["contradicted"] == []


def test_contradiction_needs_a_zero_streak_longer_than_the_papers_100_at_e_above_one_half():
    # l0: E = 1·0.01/0.01 = 1, covered by the claim; l1: E = 0, not covered. Expert 1 of both
    # gets no assignment from step 1 on; dead_after=6 reports it dead long before the paper would.
    model = nn.ModuleDict({"l0": _Layer(0.01), "l1": _Layer(0.0)})
    dead = DeadExperts(dead_after=6)
    ecology = Ecology(dead=dead)
    windows = [[layer_stats([10, 0, 5, 5]), layer_stats([10, 0, 5, 5], name="l1", depth=1)]] * 102
    events = []
    for i, layers in enumerate(windows, 1):
        stats = StepStats(i, 1, layers, model)
        events += dead.observe(stats)[1] + ecology.observe(stats)[1]
    seen = [(e["step"], e["kind"], e["layer"]) for e in events]
    assert seen == [(1, "low_ecology", None), (6, "dead", "l0"), (6, "dead", "l1"), (101, "ecology_contradicted", "l0")]
    contradiction = events[-1]
    assert (contradiction["severity"], contradiction["E"], contradiction["experts"]) == ("warning", 1.0, [1])
    assert "for 101 steps at E = 1 >= 0.5" in contradiction["detail"]
    assert ecology.summary()["model"]["contradicted"] == ["l0"]
    assert ecology.summary()["model"]["covered_by_claim"] == ["l0"]


def test_ecology_contradiction_survives_a_resume():
    model = nn.ModuleDict({"l0": _Layer(0.01)})
    windows = [[layer_stats([10, 0, 5, 5])]] * 110
    for save_at in (50, 105):  # in the private DeadExperts' zero streak; after the contradiction
        (events, monitor), (full_events, full) = resumed(lambda: Ecology(dead_after=6), windows, save_at, model=model)
        assert [(e["step"], e["kind"]) for e in full_events] == [(101, "ecology_contradicted")]  # E = 1: no note
        assert plain(events) == plain(full_events)  # once, on time
        assert plain(monitor.summary()) == plain(full.summary())


# ---------------------------------------------------------------- soft saturation against the start


UNIFORM = {"entropy": 0.999, "max_prob": 0.126, "margin": 0.0005}  # 8 experts: margin_rel 0.004


def test_a_uniform_untrained_start_does_not_soft_saturate():
    windows = [[layer_stats([13] * 8, top_k=2, **UNIFORM)]] * 300
    monitor = RouterEntropy(soft_patience=100)
    assert drive(monitor, windows) == []
    layer = monitor.summary()["layers"]["l0"]
    # The absolute condition holds all along (what fired before): entropy >= 0.9, margin_rel <= 0.05.
    assert layer["entropy"] >= 0.9 and layer["margin_rel"] == pytest.approx(0.004)
    assert layer["reference"] == {"steps": 10, "entropy": pytest.approx(0.999), "max_prob": pytest.approx(0.126)}
    assert layer["soft_saturated_steps"] == 0


def test_a_router_that_flattens_soft_saturates():
    start = layer_stats([40, 20, 30, 10, 0, 0, 0, 0], top_k=2, entropy=0.7, max_prob=0.5, margin=0.08)
    windows = [[start]] * 10 + [[layer_stats([13] * 8, top_k=2, **UNIFORM)]] * 100
    monitor = RouterEntropy(soft_patience=100)
    events = drive(monitor, windows)
    assert [(e["step"], e["kind"]) for e in events] == [(110, "soft_saturation")]
    assert events[0]["since"] == 11 and events[0]["reference_entropy"] == pytest.approx(0.7)
    assert "entropy 0.700 -> 0.999" in events[0]["detail"] and "max prob 0.500 -> 0.126" in events[0]["detail"]
    metrics = monitor.observe(StepStats(111, 1, windows[-1], None))[0]["l0"]
    assert metrics["entropy_shift"] == pytest.approx(0.299)
    assert metrics["max_prob_shift"] == pytest.approx((0.5 - 0.125) / 0.875 - (0.126 - 0.125) / 0.875)


def test_a_small_move_toward_uniform_is_not_enough():
    # Entropy 0.93 -> 0.96 (shift 0.03 < min_shift 0.05): a router still learning, not saturating.
    start = layer_stats([13] * 8, top_k=2, entropy=0.93, max_prob=0.2, margin=0.001)
    later = layer_stats([13] * 8, top_k=2, entropy=0.96, max_prob=0.15, margin=0.001)
    windows = [[start]] * 10 + [[later]] * 50
    assert drive(RouterEntropy(soft_patience=5), windows) == []
    loose = drive(RouterEntropy(soft_patience=5, min_shift=0.02), windows)
    assert [(e["step"], e["kind"]) for e in loose] == [(15, "soft_saturation")]


@pytest.mark.parametrize("save_at", [5, 30])  # while the reference forms; in the middle of the streak
def test_the_soft_saturation_reference_survives_a_resume(save_at):
    start = layer_stats([40, 20, 30, 10, 0, 0, 0, 0], top_k=2, entropy=0.7, max_prob=0.5, margin=0.08)
    windows = [[start]] * 10 + [[layer_stats([13] * 8, top_k=2, **UNIFORM)]] * 40

    def make():
        return RouterEntropy(soft_patience=25)

    (events, monitor), (full_events, full) = resumed(make, windows, save_at)
    assert [(e["step"], e["kind"]) for e in full_events] == [(35, "soft_saturation")]
    assert plain(events) == plain([e for e in full_events if e["step"] > save_at])
    assert plain(monitor.summary()) == plain(full.summary())
    # Without the state the reference is taken after the resume (from the flat part at 30: no event).
    fresh = drive(make(), windows[save_at:], first_step=save_at)
    assert [(e["step"], e["kind"]) for e in fresh] == ([(40, "soft_saturation")] if save_at == 5 else [])


def test_a_flattened_llama_router_soft_saturates_end_to_end():
    """Routers of a tiny converted Llama made sharp (logits x20) for 2 steps, then flat (x1e-4)."""
    model = monitored_llama(top_k=2)
    scale = {"logits": 20.0}
    for _, layer in moe_layers(model):
        layer.router.requires_grad_(False)
        layer.router.register_forward_hook(lambda module, args, out: out * scale["logits"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    runner = attach_monitors(model, [RouterEntropy(soft_patience=3, reference_steps=2)]).attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(0)
    for step in range(8):
        scale["logits"] = 20.0 if step < 2 else 1e-4
        ids = torch.randint(3, 100, (4, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    names = [name for name, _ in moe_layers(model)]
    assert sorted((e["step"], e["kind"], e["layer"]) for e in runner.events) == [
        (5, "soft_saturation", name) for name in names
    ]
    layers = runner.close()["monitors"]["router_entropy"]["layers"]
    assert layers[names[0]]["reference"]["entropy"] == pytest.approx(0.5165, abs=1e-3)
    assert all(v["entropy"] > 0.999 and v["soft_saturated_steps"] == 4 for v in layers.values())


# ---------------------------------------------------------------- deadlock: counts and probability


NEAR_UNIFORM = (0.28, 0.24, 0.24, 0.24)  # prob_dominance (0.28 - 0.25) / 0.75 = 0.04


def test_one_hot_assignments_with_near_uniform_probabilities_are_not_deadlock():
    stats = layer_stats([100, 0, 0, 0], NEAR_UNIFORM, entropy=0.998, max_prob=0.29)
    deadlock = Deadlock(patience=50)
    assert drive(deadlock, [[stats]] * 100) == []
    metrics = deadlock.observe(StepStats(101, 1, [stats], None))[0]
    assert metrics["l0"]["dominance"] == 1.0 and metrics["l0"]["prob_share"] == 0.28
    assert metrics["l0"]["prob_dominance"] == pytest.approx(0.04)
    assert (metrics["l0"]["assignment_locked"], metrics["l0"]["deadlocked"]) == (1.0, 0.0)
    assert metrics["model"] == {"deadlocked_fraction": 0.0, "assignment_locked_fraction": 1.0}
    summary = deadlock.summary()
    layer = summary["layers"]["l0"]
    assert layer["assignment_locked_steps"] == layer["assignment_only_steps"] == 101
    assert layer["deadlocked_steps"] == 0
    assert summary["model"]["assignment_only_share"] == 1.0
    assert summary["model"]["criterion"] == {"tau": 0.9, "prob_tau": 0.5, "patience": 50}
    # Counts alone (the rule before probabilities were read) call it deadlocked at step 50.
    counts_alone = drive(Deadlock(patience=50, prob_tau=None), [[stats]] * 100)
    assert [(e["step"], e["kind"]) for e in counts_alone] == [(50, "deadlocked")]


def test_deadlock_and_recovery_report_both_shares():
    locked = layer_stats([100, 0, 0, 0], (0.9, 0.04, 0.03, 0.03), entropy=0.2, max_prob=0.9)
    loosened = layer_stats([100, 0, 0, 0], (0.4, 0.2, 0.2, 0.2), entropy=0.95, max_prob=0.41)
    deadlock = Deadlock(patience=50)
    events = drive(deadlock, [[locked]] * 60 + [[loosened]])
    assert [(e["step"], e["kind"], e["expert"]) for e in events] == [(50, "deadlocked", 0), (61, "recovered", 0)]
    assert (events[0]["dominance"], events[0]["prob_share"]) == (1.0, 0.9)
    assert "mean router probability of 0.900 (uniform 1/4)" in events[0]["detail"]
    # Still in every token's top-1, but the router no longer puts its probability there.
    assert (events[1]["dominance"], events[1]["prob_share"], events[1]["steps"]) == (1.0, 0.4, 60)
    assert "its mean router probability fell to 0.400" in events[1]["detail"]
    layer = deadlock.summary()["layers"]["l0"]
    assert (layer["dominance"], layer["prob_share"], layer["assignment_only_steps"]) == (1.0, 0.4, 1)


def test_deadlock_refuses_bad_probability_thresholds():
    for bad in ({"prob_tau": 1.5}, {"prob_tau": -0.1}, {"interval_confidence": 1.0}, {"bootstrap_resamples": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Deadlock(**bad)


# ---------------------------------------------------------------- the depth profile's interval


def _profile_monitor(fractions, **kwargs) -> Deadlock:
    """Layer d deadlocked (one-hot counts and probabilities) for round(10 · fractions[d]) of 10 steps."""
    deadlock = Deadlock(patience=1, **kwargs)
    windows = []
    for step in range(10):
        windows.append(
            [
                layer_stats([100, 0, 0, 0] if step < round(10 * f) else [25, 25, 25, 25], name=f"l{d}", depth=d)
                for d, f in enumerate(fractions)
            ]
        )
    drive(deadlock, windows)
    return deadlock


U6 = (1.0, 0.5, 0.0, 0.1, 0.6, 0.9)  # six layers: a U, as read off a 6-block DiT
U_THIRDS_INTERVAL = (0.475, 0.94)  # measured: 1000 resamples from seed 0
DEFINED = {"u_thirds": 920, "u_quadratic": 975}  # resamples with a middle and an outer layer; >= 3 depths


def test_the_depth_profile_carries_a_seeded_bootstrap_interval():
    profile = _profile_monitor(U6).depth_profile()
    assert profile["thirds"] == {"shallow": 0.75, "middle": pytest.approx(0.05), "deep": 0.75}
    assert profile["u_thirds"] == pytest.approx(0.7)
    low, high = profile["u_thirds_interval"]
    assert low < profile["u_thirds"] < high
    assert (low, high) == (
        pytest.approx(U_THIRDS_INTERVAL[0], abs=1e-12),
        pytest.approx(U_THIRDS_INTERVAL[1], abs=1e-12),
    )
    q_low, q_high = profile["u_quadratic_interval"]
    assert profile["u_quadratic"] == pytest.approx(25 / 7) and q_high == pytest.approx(77 / 12)
    assert q_low == pytest.approx(0.0, abs=1e-12)  # a resample can lose the U: c >= 0 only just
    boot = profile["bootstrap"]
    assert (boot["resamples"], boot["seed"], boot["confidence"]) == (1000, 0, 0.95)
    assert boot["defined"] == DEFINED
    # The same run gives the same bits; another seed another interval.
    assert _profile_monitor(U6).depth_profile()["u_thirds_interval"] == [low, high]
    assert _profile_monitor(U6, bootstrap_seed=1).depth_profile()["u_thirds_interval"] != [low, high]


def test_clean_profiles_give_point_intervals_and_few_layers_many_undefined_resamples():
    flat = _profile_monitor((0.0,) * 6).depth_profile()
    assert flat["u_thirds_interval"] == [0.0, 0.0] and flat["u_quadratic_interval"] == [0.0, 0.0]
    # Three layers in a perfect U: every resample that has an end and the middle says 1, but
    # resampling 3 layers often loses one of them: the interval is read with `defined`.
    three = _profile_monitor((1.0, 0.0, 1.0)).depth_profile()
    assert three["u_thirds"] == 1.0 and three["u_thirds_interval"] == [1.0, 1.0]
    assert three["u_quadratic_interval"] == [pytest.approx(4.0), pytest.approx(4.0)]
    assert three["bootstrap"]["defined"] == {"u_thirds": 685, "u_quadratic": 228}


def test_the_card_shows_the_interval_next_to_the_u_statistic():
    deadlock = _profile_monitor(U6)
    summary = {"steps": 10, "layers": [f"l{d}" for d in range(6)], "monitors": {"deadlock": deadlock.summary()}}
    health = routing_health({"history": [{"step": 10, "monitors": {}}], "events": [], "summary": summary})
    low, high = deadlock.depth_profile()["u_thirds_interval"]
    assert health["yaml"]["deadlock_u_thirds"] == pytest.approx(0.7)
    assert health["yaml"]["deadlock_u_thirds_interval"] == [float(f"{low:.4g}"), float(f"{high:.4g}")]


# ---------------------------------------------------------------- the dead-expert definition


def test_dead_experts_state_their_definition_and_how_much_probability_they_hold():
    starving = layer_stats([10, 0, 5, 5], (0.5, 0.1, 0.2, 0.2))  # no assignment, yet probability 0.1
    dead = DeadExperts()
    events = drive(dead, [[starving]] * 100)
    assert [(e["step"], e["kind"], e["expert"]) for e in events] == [(100, "dead", 1)]  # >= 100 steps
    assert dead.observe(StepStats(101, 1, [starving], None))[0]["l0"]["dead_prob_max"] == 0.1
    summary = dead.summary()
    assert summary["layers"]["l0"]["dead_prob_max"] == 0.1
    definition = summary["definition"]
    assert definition["moeify"] == "zero top-k assignments for >= 100 consecutive optimizer steps"
    assert definition["paper"].startswith("zero routing probability for > 100 consecutive batches")
    assert "dead_after=101" in definition["differences"]
    # The paper's "> 100": dead_after=101.
    strict = DeadExperts(dead_after=101)
    assert [e["step"] for e in drive(strict, [[starving]] * 101)] == [101]
