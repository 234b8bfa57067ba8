"""The mean-field routing model reproduces its analytic critical point, pitchfork and cusp."""

from __future__ import annotations

import math

import pytest

from moeify.theory import (
    bifurcation_set,
    bistable,
    critical_feedback,
    equilibria,
    feedback_strength,
    plot_phase_diagram,
    simulate,
)


def test_critical_feedback_is_kappa_one():
    beta, gamma = 4.0, 0.5
    alpha_c = critical_feedback(beta, gamma)
    assert alpha_c == pytest.approx(0.25)
    assert feedback_strength(alpha_c, beta, gamma) == pytest.approx(1.0)


@pytest.mark.parametrize("kappa", [0.3, 0.8, 0.99])
def test_below_critical_only_balance_is_stable(kappa):
    eq = equilibria(kappa)
    assert len(eq) == 1 and eq[0].stable
    assert eq[0].x == pytest.approx(0.0, abs=1e-9) and eq[0].load == pytest.approx(0.5)


@pytest.mark.parametrize("kappa", [1.01, 1.5, 3.0])
def test_above_critical_pitchfork_gives_two_stable_imbalanced_states(kappa):
    eq = equilibria(kappa)
    assert [e.stable for e in eq] == [True, False, True]
    low, mid, high = (e.x for e in eq)
    assert mid == pytest.approx(0.0, abs=1e-9) and low == pytest.approx(-high, abs=1e-9)
    assert high == pytest.approx(kappa * math.tanh(high), abs=1e-9)  # x* = kappa tanh x*


def test_supercritical_normal_form_amplitude():
    # Just above kappa_c the stable branch grows like sqrt(3 (kappa - 1)).
    for eps in (1e-3, 1e-4):
        x_star = equilibria(1 + eps)[-1].x
        assert x_star == pytest.approx(math.sqrt(3 * eps), rel=2e-3)


def test_cusp_bifurcation_set():
    curve = bifurcation_set(y_max=1.5, points=301)
    kappas = [k for k, _ in curve]
    assert min(kappas) == pytest.approx(1.0)  # the cusp point
    assert curve[150] == pytest.approx((1.0, 0.0))
    for (k1, a1), (k2, a2) in zip(curve, reversed(curve)):  # symmetric in a
        assert k1 == pytest.approx(k2) and a1 == pytest.approx(-a2)
    # On the fold curve the drift and its slope both vanish.
    for y in (0.3, 0.8):
        kappa, a = math.cosh(y) ** 2, y - math.sinh(2 * y) / 2
        x = y - a
        assert kappa * math.tanh(x + a) - x == pytest.approx(0.0, abs=1e-12)
        assert kappa / math.cosh(x + a) ** 2 - 1 == pytest.approx(0.0, abs=1e-12)


def test_bistability_inside_the_cusp_only():
    kappa = 2.0
    y = math.acosh(math.sqrt(kappa))
    a_fold = abs(y - math.sinh(2 * y) / 2)
    assert bistable(kappa, 0.5 * a_fold)
    assert not bistable(kappa, 1.5 * a_fold)
    assert not bistable(0.9, 0.0)


def test_discrete_rule_follows_the_mean_field_prediction():
    beta, gamma = 2.0, 1.0  # alpha_c = 1
    balanced = simulate(0.5, beta, gamma, steps=30000, eta=0.01, seed=1)
    assert sum(balanced[5:]) / len(balanced[5:]) == pytest.approx(0.5, abs=0.05)
    broken = simulate(2.0, beta, gamma, steps=30000, eta=0.01, seed=1)
    predicted = equilibria(feedback_strength(2.0, beta, gamma))[-1].load  # ~0.98
    late = sum(broken[10:]) / len(broken[10:])
    assert max(late, 1 - late) == pytest.approx(predicted, abs=0.05)


def test_phase_diagram_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_phase_diagram(str(tmp_path / "phase.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="beta and gamma must be > 0"):
        critical_feedback(0.0, 1.0)
