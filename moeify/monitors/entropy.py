"""Router entropy and saturation: can the router still tell its experts apart?

Per layer and window (all means over the routed tokens of the window):
  entropy     mean per-token routing entropy H(p_t) / log E, in [0, 1] (1 = uniform).
  max_prob    mean of max_e p_te (1/E when uniform, 1 when one-hot).
  margin      mean of p_(k) - p_(k+1), the gap between the last chosen and the first
              unchosen expert's probability.
  margin_rel  E * margin: the margin in units of the uniform probability 1/E, so that one
              threshold fits every E.

"Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers: Diagnosis, Boundary
Calibration and Evolutionary Roadmap from Routing Collapse to Selective Deadlock" reports that
linear routers of a converted video DiT fall into global soft saturation with complete expert
homogenization (experts that stay clones: `expert_homogenization`). It gives no numeric
definition; the thresholds below are moeify's.

Soft saturation is judged relative to the start of training. Converted routers start
near-uniform (the tiny test Llama: entropy 0.996 at step 1 at moeify's default router init), so
the absolute condition alone holds for an untrained router and for one that is still learning
slowly; neither has saturated. The reference is each layer's step-weighted mean entropy and
max_prob over its first observations covering `reference_steps` (10) optimizer steps; a
router that never leaves its start is not reported here (its experts are, by homogenization,
if they stay clones). Moving toward uniform means both
  entropy_shift    entropy - reference entropy                    >= `min_shift` (0.05)
  max_prob_shift   reference peak - peak, peak = (max_prob - 1/E) / (1 - 1/E) in [0, 1],
                                                                  >= `min_shift`
Events (thresholds are constructor arguments; streaks count optimizer steps, see `streak`):
  "soft_saturation"  for `soft_patience` (100) consecutive steps: the router moved toward
                     uniform as above, entropy >= `entropy_threshold` (0.9) and margin_rel <=
                     `margin_threshold` (0.05): the top-k choice is decided by probability gaps
                     below 5% of 1/E, so a tiny perturbation flips it and no expert is preferred
                     for any token. Needs top_k < E.
  "saturated"        max_prob >= `saturation_threshold` (0.99) for `hard_patience` (10)
                     consecutive steps: hard one-hot routing, where the softmax gradient vanishes
                     and the router can no longer learn. Absolute: the vanishing gradient depends
                     on the probability, not on how the router got there (a uniform start never
                     meets it).
  "soft_saturation_ended" / "saturation_ended" when the condition stops holding.
The references are part of `state_dict`, so a resumed run judges against the same start.
"""

from __future__ import annotations

from typing import Any

from moeify.checks import in_range
from moeify.monitors.base import (
    CardColumn,
    CardFigure,
    CardPlot,
    Event,
    LayerStats,
    Monitor,
    StepStats,
    event,
    register_monitor,
)
from moeify.monitors.streak import Streak


class RouterEntropy(Monitor):
    name = "router_entropy"
    card_columns = (CardColumn("entropy", "entropy", last_key="entropy", order=30),)
    card_figures = (
        CardFigure("soft_saturated_layers", path=("model", "soft_saturated_layers"), order=90),
        CardFigure("saturated_layers", path=("model", "saturated_layers"), order=100),
    )
    card_plots = (
        CardPlot(
            "entropy.png",
            "Router entropy per layer over training",
            style="lines",
            metric="entropy",
            title="router entropy per layer",
            ylabel="entropy / log E",
            ylim=(0.0, 1.05),
            order=20,
        ),
    )
    resolved_events = ("soft_saturation_ended", "saturation_ended")

    def __init__(
        self,
        *,
        entropy_threshold: float = 0.9,
        margin_threshold: float = 0.05,
        soft_patience: int = 100,
        saturation_threshold: float = 0.99,
        hard_patience: int = 10,
        min_shift: float = 0.05,
        reference_steps: int = 10,
    ) -> None:
        in_range("entropy_threshold", entropy_threshold, "[0, 1]")
        in_range("margin_threshold", margin_threshold, ">= 0")
        in_range("saturation_threshold", saturation_threshold, "(0, 1]")
        in_range("soft_patience", soft_patience, ">= 1", unit="step")
        in_range("hard_patience", hard_patience, ">= 1", unit="step")
        in_range("min_shift", min_shift, "[0, 1]")
        in_range("reference_steps", reference_steps, ">= 1", unit="step")
        self.entropy_threshold, self.margin_threshold = entropy_threshold, margin_threshold
        self.min_shift, self.reference_steps = min_shift, reference_steps
        self.saturation_threshold = saturation_threshold
        self.soft_patience, self.hard_patience = soft_patience, hard_patience
        self._soft: dict[str, Streak] = {}
        self._hard: dict[str, Streak] = {}
        self._soft_steps: dict[str, int] = {}  # total steps flagged in each state
        self._hard_steps: dict[str, int] = {}
        self._last: dict[str, dict[str, float]] = {}
        # Per layer: steps, entropy_sum and max_prob_sum (step-weighted) of the first observations.
        self._reference: dict[str, dict[str, float]] = {}

    def _update_reference(self, layer: LayerStats, steps: int) -> dict[str, float] | None:
        """Add this window to the layer's reference until it covers `reference_steps`; the
        reference means once it does, else None."""
        ref = self._reference.setdefault(layer.name, {"steps": 0, "entropy_sum": 0.0, "max_prob_sum": 0.0})
        if ref["steps"] < self.reference_steps:
            ref["steps"] += steps
            ref["entropy_sum"] += steps * layer.entropy
            ref["max_prob_sum"] += steps * layer.max_prob
            return None
        return {"entropy": ref["entropy_sum"] / ref["steps"], "max_prob": ref["max_prob_sum"] / ref["steps"]}

    def _is_soft(self, layer: LayerStats, margin_rel: float, shifts: dict[str, float] | None) -> bool:
        return (
            shifts is not None
            and layer.top_k < layer.num_experts
            and layer.entropy >= self.entropy_threshold
            and margin_rel <= self.margin_threshold
            and shifts["entropy_shift"] >= self.min_shift
            and shifts["max_prob_shift"] >= self.min_shift
        )

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        n = stats.steps_in_window
        for layer in stats.layers:
            if not layer.tokens or layer.num_experts < 2:
                continue
            margin_rel = layer.margin * layer.num_experts
            reference = self._update_reference(layer, n)
            shifts = (
                None
                if reference is None
                else {
                    "entropy_shift": layer.entropy - reference["entropy"],
                    "max_prob_shift": _peak(reference["max_prob"], layer.num_experts)
                    - _peak(layer.max_prob, layer.num_experts),
                }
            )
            soft = self._soft.setdefault(layer.name, Streak())
            hard = self._hard.setdefault(layer.name, Streak())
            soft_change = soft.update(self._is_soft(layer, margin_rel, shifts), stats.step, n, self.soft_patience)
            hard_change = hard.update(layer.max_prob >= self.saturation_threshold, stats.step, n, self.hard_patience)
            self._soft_steps[layer.name] = self._soft_steps.get(layer.name, 0) + (n if soft.active else 0)
            self._hard_steps[layer.name] = self._hard_steps.get(layer.name, 0) + (n if hard.active else 0)
            events += self._events(stats.step, layer, margin_rel, soft_change, hard_change, soft, hard)
            metrics[layer.name] = {
                "entropy": layer.entropy,
                "max_prob": layer.max_prob,
                "margin": layer.margin,
                "margin_rel": margin_rel,
                **(shifts or {}),
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
            ref = self.reference(layer.name)
            detail = (
                f"{where}: routing moved toward uniform since its first {ref['steps']} steps (entropy "
                f"{ref['entropy']:.3f} -> {layer.entropy:.3f} >= {self.entropy_threshold}, max prob {ref['max_prob']:.3f} -> "
                f"{layer.max_prob:.3f}) with top-{layer.top_k} margin {margin_rel:.3f}/E <= {self.margin_threshold}/E for "
                f"{soft.steps} steps"
            )
            out.append(
                event(
                    step,
                    self.name,
                    layer.name,
                    "soft_saturation",
                    detail,
                    since=soft.since,
                    reference_entropy=ref["entropy"],
                )
            )
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

    def reference(self, layer: str) -> dict[str, Any]:
        """The layer's start of training: mean entropy and max_prob over its first `steps` steps."""
        ref = self._reference.get(layer)
        if not ref or not ref["steps"]:
            return {"steps": 0, "entropy": None, "max_prob": None}
        return {
            "steps": ref["steps"],
            "entropy": ref["entropy_sum"] / ref["steps"],
            "max_prob": ref["max_prob_sum"] / ref["steps"],
        }

    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                "reference": self.reference(name),
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
            "reference": {name: dict(r) for name, r in self._reference.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._soft = {name: Streak.from_state(s) for name, s in state["soft"].items()}
        self._hard = {name: Streak.from_state(s) for name, s in state["hard"].items()}
        self._soft_steps = dict(state["soft_steps"])
        self._hard_steps = dict(state["hard_steps"])
        self._last = {name: dict(m) for name, m in state["last"].items()}
        # A state saved before references existed: each layer takes its reference from here on.
        self._reference = {name: dict(r) for name, r in state.get("reference", {}).items()}


def _peak(max_prob: float, num_experts: int) -> float:
    """max_prob rescaled to [0, 1]: 0 when uniform (1/E), 1 when one-hot."""
    uniform = 1.0 / num_experts
    return (max_prob - uniform) / (1.0 - uniform)


register_monitor("router_entropy", RouterEntropy, default=True)
