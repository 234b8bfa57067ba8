"""kappa_hat, the feedback strength read from critical slowing down: recovered where kappa is known
(the discrete rule of the two-expert model), its pieces exact, and carried by the early warning."""

from __future__ import annotations

import json
import math
import random

import pytest

from moeify.monitors import ImbalanceEarlyWarning, LayerStats, StepStats
from moeify.theory import (
    autocorrelation_interval,
    block_autocorrelation,
    estimate_kappa,
    kappa_from_rate,
    lag1_autocorrelation,
    relaxation_rate,
    simulate_windows,
    step_multiplier,
)

ETA_GAMMA = 0.02  # simulate_windows' default eta * gamma: the no-feedback relaxation rate per step
STEPS = 50  # steps per window (simulate_windows' default)


def _ar(n: int, phi: float, seed: int) -> list[float]:
    rng, x, out = random.Random(seed), 0.0, []
    for _ in range(n + 100):
        x = phi * x + rng.gauss(0.0, 1.0)
        out.append(x)
    return out[100:]


# ---------------------------------------------------------------- the estimator


# Measured |kappa_hat - kappa| over 50 seeds of 2000 windows: max 0.110 / 0.094 / 0.079 / 0.063 /
# 0.047 / 0.034 / 0.026 / 0.021 at kappa 0.3 / 0.4 / ... / 0.9 / 0.95, mean error -0.008..-0.001,
# the 95% interval holding kappa in 47-50 of 50. Here 3000 windows (errors ~ 1 / sqrt(windows)).
@pytest.mark.parametrize("kappa", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
def test_kappa_hat_recovers_the_discrete_rules_kappa(kappa):
    windows = simulate_windows(kappa, 3000, seed=7)
    estimate = estimate_kappa([p for p, _ in windows], ETA_GAMMA, steps=STEPS)
    assert estimate.kappa == pytest.approx(kappa, abs=0.1)
    assert estimate.low <= kappa <= estimate.high
    assert estimate.high - estimate.low < 0.16  # ~0.13 at kappa 0.3, narrowing towards 1


def test_kappa_hat_relative_to_a_measured_reference():
    # No base rate: the rate measured at a known kappa (0.2; at 0 the rule has no noise) is the
    # reference.
    reference = relaxation_rate([p for p, _ in simulate_windows(0.2, 2000, seed=1)], steps=STEPS)
    assert reference.rate == pytest.approx(0.8 * ETA_GAMMA, rel=0.1)
    for kappa in (0.5, 0.8):
        rate = relaxation_rate([p for p, _ in simulate_windows(kappa, 2000, seed=2)], steps=STEPS).rate
        assert kappa_from_rate(rate, reference.rate, reference_kappa=0.2) == pytest.approx(kappa, abs=0.1)
    # The same rate against a reference taken at kappa 0.5 but called 0 reads 2 kappa - 1: only
    # kappa_hat = 1, where relaxation stops, is independent of the reference.
    half = relaxation_rate([p for p, _ in simulate_windows(0.5, 2000, seed=3)], steps=STEPS).rate
    assert kappa_from_rate(0.2 * ETA_GAMMA, half) == pytest.approx(1 - 0.2 * ETA_GAMMA / half)
    assert kappa_from_rate(0.0, half) == 1.0


def test_block_autocorrelation_of_window_means():
    assert block_autocorrelation(0.7, 1) == pytest.approx(0.7)
    assert block_autocorrelation(0.0, 10) == 0.0 and block_autocorrelation(1.0, 10) == 1.0
    # Against the brute-force sums of rho^lag over the pairs of two adjacent windows of 5 steps.
    rho, steps = 0.8, 5
    cov = sum(rho ** (j - i) for i in range(steps) for j in range(steps, 2 * steps))
    var = sum(rho ** abs(j - i) for i in range(steps) for j in range(steps))
    assert block_autocorrelation(rho, steps) == pytest.approx(cov / var, rel=1e-12)
    assert block_autocorrelation(rho, steps) > rho**steps  # window means are smoother than samples
    for rho in (0.1, 0.9, 0.999):
        assert step_multiplier(block_autocorrelation(rho, 50), 50) == pytest.approx(rho, abs=1e-9)
    assert step_multiplier(-0.2, 50) == 0.0 and step_multiplier(1.5, 50) == 1.0


def test_lag1_autocorrelation_is_pooled_over_experts_and_detrended():
    xs = _ar(200, 0.6, seed=0)
    scalar, n = lag1_autocorrelation(xs)
    assert n == 200 and 0.45 < scalar < 0.75
    # Two experts: the vector (p, 1 - p) carries the same autocorrelation as p.
    pairs = [(0.5 + 0.01 * x, 0.5 - 0.01 * x) for x in xs]
    assert lag1_autocorrelation(pairs)[0] == pytest.approx(scalar, abs=1e-9)
    # A line, and a constant, have no fluctuation: 0.
    assert lag1_autocorrelation([0.5 + 0.001 * t for t in range(50)])[0] == 0.0
    assert lag1_autocorrelation([(1.0, 0.0, 0.0)] * 30)[0] == 0.0
    # A trend does not read as memory: white noise on a steep line stays near 0.
    noise = _ar(200, 0.0, seed=1)
    assert abs(lag1_autocorrelation([0.05 * t + x for t, x in enumerate(noise)])[0]) < 0.15


def test_autocorrelation_interval_corrects_the_small_sample_bias():
    # Raw detrended phi_hat of 32 observations at phi = 0.8 averages ~0.58 (bias -(2 + 4 phi + 3 phi²) / n).
    raw, corrected, covered = [], [], 0
    for seed in range(300):
        phi_hat, n = lag1_autocorrelation(_ar(32, 0.8, seed))
        phi, low, high = autocorrelation_interval(phi_hat, n)
        raw.append(phi_hat)
        corrected.append(phi)
        covered += low <= 0.8 <= high
    assert sum(raw) / 300 == pytest.approx(0.58, abs=0.04)
    assert sum(corrected) / 300 == pytest.approx(0.8, abs=0.03)
    assert covered >= 0.93 * 300  # the 95% interval: 0.95 here, 0.95-0.98 over phi 0.5-0.95, n 20-50


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 3 observations"):
        lag1_autocorrelation([0.1, 0.2])
    with pytest.raises(ValueError, match="same, non-zero number of components"):
        lag1_autocorrelation([(0.1, 0.9), (0.2, 0.8), (0.3,)])
    with pytest.raises(ValueError, match="at least 16 observations"):
        autocorrelation_interval(0.5, 15)
    with pytest.raises(ValueError, match="z must be in"):
        autocorrelation_interval(0.5, 50, z=4.0)
    with pytest.raises(ValueError, match="base_rate must be > 0"):
        estimate_kappa([0.5] * 20, 0.0)
    with pytest.raises(ValueError, match="reference_kappa must be < 1"):
        kappa_from_rate(0.1, 0.2, reference_kappa=1.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        block_autocorrelation(0.5, 0)
    with pytest.raises(ValueError, match="windows, steps and tokens"):
        simulate_windows(0.5, 0)
    with pytest.raises(ValueError, match="kappa_start <= kappa_window"):
        ImbalanceEarlyWarning(kappa_start=30, kappa_window=20)
    with pytest.raises(ValueError, match="kappa_start <= kappa_window"):
        ImbalanceEarlyWarning(kappa_start=12)
    with pytest.raises(ValueError, match=r"base_rate must be in \(0, 1\] per step"):
        ImbalanceEarlyWarning(base_rate=0.0)


# ---------------------------------------------------------------- in the early-warning monitor


def _stats(window: int, p: float, share: float) -> StepStats:
    """One observation of the two-expert rule: `STEPS` steps of 16 tokens."""
    total = STEPS * 16
    hits = round(share * total)
    layer = LayerStats("l0", 0, 2, 1, float(total), (hits, total - hits), (p, 1 - p), 0.5, max(p, 1 - p), 0.1, 1.0, 0.0)
    return StepStats(window * STEPS, STEPS, [layer], None)


def _drive(monitor: ImbalanceEarlyWarning, windows, first: int = 1):
    metrics, events = [], []
    for i, (p, share) in enumerate(windows, first):
        m, e = monitor.observe(_stats(i, p, share))
        metrics.append(m["l0"])
        events += e
    return metrics, events


def test_kappa_hat_in_metrics_from_the_20th_observation_and_in_the_summary():
    monitor = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
    metrics, events = _drive(monitor, simulate_windows(0.7, 60, seed=0))
    assert events == []
    assert "kappa" not in metrics[18] and {"kappa", "kappa_low", "kappa_high", "relaxation_rate"} <= set(metrics[19])
    assert "variance" not in metrics[59]  # the legacy indicators are still warming up
    layer = monitor.summary()["layers"]["l0"]
    assert layer["kappa_low"] < 0.7 < layer["kappa_high"]
    assert monitor.summary()["model"]["kappa_max"] == layer["kappa"]


def test_warning_before_the_tip_of_a_slow_ramp():
    # kappa ramps 0.5 -> 1.3 over 800 windows; the rule tips (|p - 1/2| > 0.2) at kappa ~1.01-1.10.
    ramp = simulate_windows(lambda w: 0.5 + 0.8 * w / 800, 800, seed=0)
    tip = next(w for w, (p, _) in enumerate(ramp, 1) if abs(p - 0.5) > 0.2)
    monitor = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
    _, events = _drive(monitor, ramp)
    first = events[0]["step"] // STEPS
    assert first < tip and 0.8 < 0.5 + 0.8 * (first - 1) / 800 < 1.0
    assert events[0]["kind"] == "imbalance_warning" and {"cause", "detail"} <= set(events[0])


def test_kappa_warning_is_not_blind_at_the_start():
    # A layer near critical from its first observation: the legacy indicators (warmup 50 + window
    # 50) cannot speak before the 100th; kappa_hat does, from the 20th.
    monitor = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
    _, events = _drive(monitor, simulate_windows(0.99, 100, seed=3))
    assert [e["cause"] for e in events] == ["kappa"]
    assert 20 * STEPS <= events[0]["step"] < 100 * STEPS
    assert events[0]["kappa_low"] >= 0.8


def test_no_warning_on_a_stationary_balanced_rule():
    for seed in range(2):
        monitor = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
        assert _drive(monitor, simulate_windows(0.5, 400, seed=100 + seed))[1] == []


def test_kappa_state_survives_a_resume_through_json():
    windows = simulate_windows(0.99, 120, seed=3)
    whole = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
    metrics, events = _drive(whole, windows)
    save = events[0]["step"] // STEPS - 2  # inside the streak of 5 that starts the warning
    first = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
    _drive(first, windows[:save])
    resumed = ImbalanceEarlyWarning(base_rate=ETA_GAMMA)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    later, later_events = _drive(resumed, windows[save:], first=save + 1)
    assert later == metrics[save:] and later_events == events
    assert resumed.summary() == whole.summary()
    assert math.isfinite(resumed.summary()["layers"]["l0"]["kappa"])
