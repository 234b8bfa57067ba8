"""The two-expert mean-field model of adaptive softmax routing.

Discrete rule: two experts with scores s_1, s_2; a token goes to expert i with probability
p_i = softmax(beta * s)_i; the selected expert's score grows by eta * alpha, and every score decays
by eta * gamma * s_i. As eta -> 0 the expected dynamics are

    ds_i/dt = alpha * p_i - gamma * s_i.

The score difference u = s_1 - s_2 (with an external input asymmetry h favouring expert 1) obeys

    du/dt = alpha * tanh(beta * (u + h) / 2) - gamma * u,

and in the reduced variable x = beta * u / 2 (time rescaled by gamma):

    dx/dt = kappa * tanh(x + a) - x,     kappa = alpha * beta / (2 * gamma),  a = beta * h / 2.

kappa is the feedback strength. For a = 0: kappa < 1 has one stable balanced state x = 0;
at kappa_c = 1 a supercritical pitchfork gives two stable imbalanced states +-x*, x* = kappa tanh x*
(x* ~ sqrt(3 (kappa - 1)) just above it). For a != 0 the pitchfork unfolds into two fold curves
meeting at a cusp at (kappa, a) = (1, 0); parametrised by y = x + a:

    kappa = cosh(y)^2,    a = y - sinh(2 y) / 2,

and the normal form near the cusp is dx/dt ~ (kappa - 1) x - x^3 / 3 + a. Expert 1's load share
is (1 + tanh(x + a)) / 2.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def feedback_strength(alpha: float, beta: float, gamma: float) -> float:
    """kappa = alpha * beta / (2 gamma): the reinforcement gain against the decay."""
    if beta <= 0 or gamma <= 0:
        raise ValueError(f"beta and gamma must be > 0, got beta={beta}, gamma={gamma}")
    return alpha * beta / (2.0 * gamma)


def critical_feedback(beta: float, gamma: float) -> float:
    """The critical score increment alpha_c = 2 gamma / beta (kappa = 1): above it, balance breaks."""
    feedback_strength(1.0, beta, gamma)  # validates beta, gamma
    return 2.0 * gamma / beta


def drift(x: float, kappa: float, asymmetry: float = 0.0) -> float:
    """dx/dt of the reduced model."""
    return kappa * math.tanh(x + asymmetry) - x


@dataclass(frozen=True)
class Equilibrium:
    x: float  # reduced score difference
    stable: bool
    load: float  # expert 1's share of the tokens, (1 + tanh(x + a)) / 2


def equilibria(kappa: float, asymmetry: float = 0.0, *, tol: float = 1e-12) -> list[Equilibrium]:
    """Every equilibrium of dx/dt = kappa tanh(x + a) - x, sorted by x, with its stability.

    Roots lie in |x| <= |kappa| (tanh is bounded); they are bracketed on a fine grid and refined
    by bisection. Stability: d(drift)/dx = kappa sech^2(x + a) - 1 < 0.
    """
    bound = abs(kappa) + 1.0
    n = 4000
    grid = [-bound + 2 * bound * i / n for i in range(n + 1)]
    roots: list[float] = []
    for left, right in zip(grid, grid[1:]):
        f_left, f_right = drift(left, kappa, asymmetry), drift(right, kappa, asymmetry)
        if f_left == 0.0:
            roots.append(left)
        elif f_left * f_right < 0:
            roots.append(_bisect(left, right, kappa, asymmetry, tol))
    out = []
    for x in roots:
        slope = kappa / math.cosh(x + asymmetry) ** 2 - 1.0
        out.append(Equilibrium(x, slope < 0, (1.0 + math.tanh(x + asymmetry)) / 2.0))
    return out


def _bisect(left: float, right: float, kappa: float, asymmetry: float, tol: float) -> float:
    f_left = drift(left, kappa, asymmetry)
    while right - left > tol:
        mid = (left + right) / 2.0
        f_mid = drift(mid, kappa, asymmetry)
        if (f_mid < 0) == (f_left < 0):
            left, f_left = mid, f_mid
        else:
            right = mid
    return (left + right) / 2.0


def bifurcation_set(y_max: float = 2.0, points: int = 201) -> list[tuple[float, float]]:
    """The fold curves (kappa, a) = (cosh^2 y, y - sinh(2y)/2) for y in [-y_max, y_max]; they meet
    at the cusp (1, 0). Inside (kappa > 1, |a| below the curve) the model is bistable."""
    ys = [-y_max + 2 * y_max * i / (points - 1) for i in range(points)]
    return [(math.cosh(y) ** 2, y - math.sinh(2 * y) / 2.0) for y in ys]


def bistable(kappa: float, asymmetry: float) -> bool:
    """Whether (kappa, a) lies inside the cusp: three equilibria, two of them stable."""
    return sum(e.stable for e in equilibria(kappa, asymmetry)) == 2


def simulate(
    alpha: float, beta: float, gamma: float, *, bias: float = 0.0, eta: float = 0.01, steps: int = 20000, seed: int = 0
) -> list[float]:
    """The discrete rule (stochastic, one token per step); `bias` is h, the input asymmetry in
    score units (a = beta h / 2). Returns expert 1's selection frequency over each block of 1000
    steps — the mean-field limit predicts it with `equilibria(feedback_strength(...), beta*h/2)`."""
    rng = random.Random(seed)
    s1 = s2 = 0.0
    shares, hits = [], 0
    for step in range(1, steps + 1):
        p1 = 1.0 / (1.0 + math.exp(-beta * (s1 - s2 + bias)))
        chose_1 = rng.random() < p1
        hits += chose_1
        s1 += eta * (alpha * chose_1 - gamma * s1)
        s2 += eta * (alpha * (not chose_1) - gamma * s2)
        if step % 1000 == 0:
            shares.append(hits / 1000.0)
            hits = 0
    return shares


def plot_phase_diagram(path: str, *, kappa_max: float = 3.0) -> str:
    """Two panels: the pitchfork (equilibrium load vs kappa at a = 0) and the cusp bifurcation set
    in the (kappa, a) plane. Needs matplotlib (`pip install "moeify[plots]"`). Returns `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('plotting needs matplotlib: pip install "moeify[plots]"') from error
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    kappas = [0.05 + (kappa_max - 0.05) * i / 300 for i in range(301)]
    for kappa in kappas:
        for e in equilibria(kappa):
            left.plot(kappa, e.load, "k." if e.stable else "r.", markersize=2)
    left.axvline(1.0, color="gray", linestyle="--", linewidth=0.8)
    left.set(xlabel="feedback strength kappa", ylabel="expert 1 load share", title="pitchfork (a = 0)")
    curve = [(k, a) for k, a in bifurcation_set() if k <= kappa_max]
    right.plot([k for k, _ in curve], [a for _, a in curve], "b-")
    right.plot([1.0], [0.0], "ko")
    right.set(xlabel="feedback strength kappa", ylabel="input asymmetry a", title="cusp: bistable inside")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
