"""Theory behind the monitors: the two-expert mean-field routing model."""

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
    "bifurcation_set",
    "bistable",
    "critical_feedback",
    "drift",
    "equilibria",
    "feedback_strength",
    "plot_phase_diagram",
    "simulate",
]
