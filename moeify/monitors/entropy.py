"""Router entropy and saturation: can the router still tell its experts apart?

Per layer and window (all means over the routed tokens of the window):
  entropy     mean per-token routing entropy H(p_t) / log E, in [0, 1] (1 = uniform).
  max_prob    mean of max_e p_te (1/E when uniform, 1 when one-hot).
  margin      mean of p_(k) - p_(k+1), the gap between the last chosen and the first
              unchosen expert's probability.
  margin_rel  E * margin: the margin in units of the uniform probability 1/E, so that one
              threshold fits every E.

Events (thresholds are constructor arguments; streaks count optimizer steps, see `streak`):
  "soft_saturation"  entropy >= `entropy_threshold` (0.9) and margin_rel <= `margin_threshold`
                     (0.05) for `soft_patience` (100) consecutive steps: the router stays
                     near-uniform and the top-k choice is decided by probability gaps below 5% of
                     1/E, so a tiny perturbation flips it and no expert is preferred for any token
                     (the linear-router failure: soft saturation with homogeneous experts). Routers
                     start near-uniform, so the patience doubles as a warmup. Needs top_k < E.
  "saturated"        max_prob >= `saturation_threshold` (0.99) for `hard_patience` (10)
                     consecutive steps: hard one-hot routing, where the softmax gradient vanishes
                     and the router can no longer learn.
  "soft_saturation_ended" / "saturation_ended" when the condition stops holding.
"""

from __future__ import annotations

from typing import Any

from moeify.monitors.base import Event, LayerStats, Monitor, StepStats, event, register_monitor
from moeify.monitors.streak import Streak


class RouterEntropy(Monitor):
    name = "router_entropy"

    def __init__(
        self,
        *,
        entropy_threshold: float = 0.9,
        margin_threshold: float = 0.05,
        soft_patience: int = 100,
        saturation_threshold: float = 0.99,
        hard_patience: int = 10,
    ) -> None:
        if not 0.0 <= entropy_threshold <= 1.0:
            raise ValueError(f"entropy_threshold must be in [0, 1], got {entropy_threshold}")
        if margin_threshold < 0:
            raise ValueError(f"margin_threshold must be >= 0, got {margin_threshold}")
        if not 0.0 < saturation_threshold <= 1.0:
            raise ValueError(f"saturation_threshold must be in (0, 1], got {saturation_threshold}")
        if soft_patience < 1 or hard_patience < 1:
            raise ValueError(f"patience must be >= 1 step, got {soft_patience} and {hard_patience}")
        self.entropy_threshold, self.margin_threshold = entropy_threshold, margin_threshold
        self.saturation_threshold = saturation_threshold
        self.soft_patience, self.hard_patience = soft_patience, hard_patience
        self._soft: dict[str, Streak] = {}
        self._hard: dict[str, Streak] = {}
        self._soft_steps: dict[str, int] = {}  # total steps flagged in each state
        self._hard_steps: dict[str, int] = {}
        self._last: dict[str, dict[str, float]] = {}

    def _is_soft(self, layer: LayerStats, margin_rel: float) -> bool:
        return (
            layer.top_k < layer.num_experts
            and layer.entropy >= self.entropy_threshold
            and margin_rel <= self.margin_threshold
        )

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        n = stats.steps_in_window
        for layer in stats.layers:
            if not layer.tokens or layer.num_experts < 2:
                continue
            margin_rel = layer.margin * layer.num_experts
            soft = self._soft.setdefault(layer.name, Streak())
            hard = self._hard.setdefault(layer.name, Streak())
            soft_change = soft.update(self._is_soft(layer, margin_rel), stats.step, n, self.soft_patience)
            hard_change = hard.update(layer.max_prob >= self.saturation_threshold, stats.step, n, self.hard_patience)
            self._soft_steps[layer.name] = self._soft_steps.get(layer.name, 0) + (n if soft.active else 0)
            self._hard_steps[layer.name] = self._hard_steps.get(layer.name, 0) + (n if hard.active else 0)
            events += self._events(stats.step, layer, margin_rel, soft_change, hard_change, soft, hard)
            metrics[layer.name] = {
                "entropy": layer.entropy,
                "max_prob": layer.max_prob,
                "margin": layer.margin,
                "margin_rel": margin_rel,
                "soft_saturated": float(soft.active),
                "saturated": float(hard.active),
            }
        self._last.update(metrics)
        if metrics:
            metrics["model"] = {
                "soft_saturated_fraction": sum(m["soft_saturated"] for m in metrics.values()) / len(metrics),
                "saturated_fraction": sum(m["saturated"] for m in metrics.values()) / len(metrics),
            }
        return metrics, events

    def _events(
        self,
        step: int,
        layer: LayerStats,
        margin_rel: float,
        soft_change: str | None,
        hard_change: str | None,
        soft: Streak,
        hard: Streak,
    ) -> list[Event]:
        out = []
        where = f"layer {layer.depth} ({layer.name})"
        if soft_change == "start":
            detail = (
                f"{where}: routing near-uniform (entropy {layer.entropy:.3f} >= {self.entropy_threshold}) with "
                f"top-{layer.top_k} margin {margin_rel:.3f}/E <= {self.margin_threshold}/E for {soft.steps} steps"
            )
            out.append(event(step, self.name, layer.name, "soft_saturation", detail, since=soft.since))
        elif soft_change == "end":
            detail = f"{where}: router separates experts again after {soft.ended_steps} steps of soft saturation"
            out.append(event(step, self.name, layer.name, "soft_saturation_ended", detail, steps=soft.ended_steps))
        if hard_change == "start":
            detail = f"{where}: one-hot routing (mean max prob {layer.max_prob:.4f}) for {hard.steps} steps"
            out.append(event(step, self.name, layer.name, "saturated", detail, since=hard.since))
        elif hard_change == "end":
            detail = f"{where}: routing no longer one-hot after {hard.ended_steps} steps"
            out.append(event(step, self.name, layer.name, "saturation_ended", detail, steps=hard.ended_steps))
        return out

    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                "entropy": m["entropy"],
                "max_prob": m["max_prob"],
                "margin_rel": m["margin_rel"],
                "soft_saturated": bool(m["soft_saturated"]),
                "saturated": bool(m["saturated"]),
                "soft_saturated_steps": self._soft_steps.get(name, 0),
                "saturated_steps": self._hard_steps.get(name, 0),
            }
            for name, m in self._last.items()
        }
        model = {
            "soft_saturated_layers": sum(1 for v in layers.values() if v["soft_saturated"]),
            "saturated_layers": sum(1 for v in layers.values() if v["saturated"]),
        }
        return {"model": model, "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        return {
            "soft": {name: s.state_dict() for name, s in self._soft.items()},
            "hard": {name: s.state_dict() for name, s in self._hard.items()},
            "soft_steps": dict(self._soft_steps),
            "hard_steps": dict(self._hard_steps),
            "last": {name: dict(m) for name, m in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._soft = {name: Streak.from_state(s) for name, s in state["soft"].items()}
        self._hard = {name: Streak.from_state(s) for name, s in state["hard"].items()}
        self._soft_steps = dict(state["soft_steps"])
        self._hard_steps = dict(state["hard_steps"])
        self._last = {name: dict(m) for name, m in state["last"].items()}


register_monitor("router_entropy", RouterEntropy, default=True)
