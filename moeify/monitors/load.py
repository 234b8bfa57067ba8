"""Expert load: how the top-k assignments of each layer spread over its experts.

Per layer and window:
  share_e   = assignments to expert e / all assignments (sums to 1)
  cv        = std(share) / mean(share) (coefficient of variation; 0 when perfectly balanced)
  max_mean  = max(share) / mean(share) (1 when balanced, E/k when one expert takes every token:
              with top-k a single expert can hold at most 1/k of the assignments)
"""

from __future__ import annotations

import math
from typing import Any

from moeify.monitors.base import CardColumn, CardPlot, Event, LayerStats, Monitor, StepStats, register_monitor


def imbalance(shares: tuple[float, ...]) -> float:
    """Coefficient of variation of the load shares (std / mean; 0 = balanced)."""
    mean = 1.0 / len(shares)
    return math.sqrt(sum((s - mean) ** 2 for s in shares) / len(shares)) / mean


def load_cv(layer: LayerStats) -> float:
    """`imbalance` of a layer's load shares; 0 for a window without tokens."""
    return imbalance(layer.load_share) if layer.tokens else 0.0


class ExpertLoad(Monitor):
    name = "expert_load"
    card_columns = (
        CardColumn("load cv", "cv", last_key="cv", order=10),
        CardColumn("max/mean load", "max_mean", last_key="max_mean", order=20),
    )
    card_plots = (
        CardPlot(
            "load_heatmap.png",
            "Expert load share per layer and expert over training",
            style="expert_heatmap",
            metric="share_",
            title="expert load share (layer x expert over time)",
            order=10,
        ),
        # Drawn from the load shares (k x the largest share per layer: 1 = one expert takes every
        # token it can), the deadlock monitor's events marked on it.
        CardPlot(
            "deadlock_map.png",
            "Deadlock map: the top expert's share of its maximum over depth and time",
            style="deadlock_map",
            metric="share_",
            marks="deadlocked",
            title="deadlock map: top expert's share of its maximum (k x max share)",
            order=30,
        ),
    )

    def __init__(self) -> None:
        self._last: dict[str, dict[str, float]] = {}
        self._worst_cv: dict[str, float] = {}

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        metrics: dict[str, dict[str, float]] = {}
        for layer in stats.layers:
            share = layer.load_share
            mean = 1.0 / layer.num_experts
            cv = load_cv(layer)
            values = {"cv": cv, "max_mean": (max(share) / mean) if layer.tokens else 0.0, "top_k": float(layer.top_k)}
            values.update({f"share_{e}": s for e, s in enumerate(share)})
            metrics[layer.name] = values
            self._worst_cv[layer.name] = max(cv, self._worst_cv.get(layer.name, 0.0))
        self._last = metrics
        return metrics, []

    def summary(self) -> dict[str, Any]:
        return {
            name: {"cv": m["cv"], "max_mean": m["max_mean"], "worst_cv": self._worst_cv[name]}
            for name, m in self._last.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"last": {name: dict(m) for name, m in self._last.items()}, "worst_cv": dict(self._worst_cv)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = {name: dict(m) for name, m in state["last"].items()}
        self._worst_cv = dict(state["worst_cv"])


register_monitor("expert_load", ExpertLoad, default=True)
