"""Theory behind the monitors: the two-expert mean-field routing model, and kappa_hat, its
feedback strength estimated from an observed imbalance series."""

from moeify.theory.estimate import (
    KappaEstimate,
    Relaxation,
    autocorrelation_interval,
    block_autocorrelation,
    estimate_kappa,
    kappa_from_rate,
    lag1_autocorrelation,
    relaxation_rate,
    simulate_windows,
    step_multiplier,
)
from moeify.theory.meanfield import (
    Equilibrium,
    bifurcation_set,
    bistable,
    critical_feedback,
    drift,
    equilibria,
    feedback_strength,
    plot_phase_diagram,
    simulate,
)

__all__ = [
    "Equilibrium",
    "KappaEstimate",
    "Relaxation",
    "autocorrelation_interval",
    "bifurcation_set",
    "bistable",
    "block_autocorrelation",
    "critical_feedback",
    "drift",
    "equilibria",
    "estimate_kappa",
    "feedback_strength",
    "kappa_from_rate",
    "lag1_autocorrelation",
    "plot_phase_diagram",
    "relaxation_rate",
    "simulate",
    "simulate_windows",
    "step_multiplier",
]
