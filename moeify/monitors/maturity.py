"""Shared-expert maturity next to deadlock: data to test the Functional Redundancy Hypothesis.

"Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers: Diagnosis, Boundary
Calibration and Evolutionary Roadmap from Routing Collapse to Selective Deadlock" proposes it
from routing time series: deadlock is a waiting strategy that lasts until the shared expert
matures. Its review notes the evidence is observational (no intervention), and the paper gives
no measure of maturity; this monitor records what would test it, and decides nothing.

Per layer with shared experts and window:
  ratio   mean ||shared output|| / mean ||routed output|| over the window's tokens. Shared experts
          start at zero or tiny noise (Law 2), so the ratio starts near 0 and grows as they learn.
  deadlocked, deadlock_steps   the layer's deadlock state (see `deadlock`: counts and router
          probability both): read from the `Deadlock` monitor passed as `deadlock=` (list it
          before this monitor, so that both see the same step), or from a private one built with
          `tau`, `prob_tau` and `patience` otherwise.
Event "matured" the first time ratio >= `mature_ratio` (default 0.5: the shared path carries
half the routed path's magnitude; a convention, not a law — set your own).
Summary per layer: ratio at first observation, now and its maximum, the step it matured, and
every deadlock episode with the ratio at its start and end and whether it ended after the layer
matured; model-wide: episodes ended, and how many of them ended after maturity.
"""

from __future__ import annotations

from typing import Any

from moeify.checks import in_range
from moeify.monitors.base import CardColumn, CardFigure, Event, Monitor, StepStats, event, register_monitor
from moeify.monitors.deadlock import Deadlock


class SharedMaturity(Monitor):
    name = "shared_maturity"
    card_columns = (CardColumn("shared/routed", "ratio_now", last_key="ratio", order=70),)
    card_figures = (CardFigure("shared_matured_layers", key="matured_step", reduce="count", order=40),)
    resolved_events = ("matured",)

    def __init__(
        self,
        *,
        deadlock: Deadlock | None = None,
        mature_ratio: float = 0.5,
        tau: float = 0.9,
        patience: int = 50,
        prob_tau: float | None = 0.5,
    ) -> None:
        in_range("mature_ratio", mature_ratio, "> 0")
        self.mature_ratio = mature_ratio
        self._external = deadlock is not None
        self.deadlock = deadlock if deadlock is not None else Deadlock(tau=tau, patience=patience, prob_tau=prob_tau)
        self._has_shared: dict[str, bool] = {}
        self._layers: dict[str, dict[str, Any]] = {}

    def _shared_layers(self, stats: StepStats) -> dict[str, bool]:
        for layer in stats.layers:
            if layer.name not in self._has_shared:
                module = stats.model.get_submodule(layer.name)
                self._has_shared[layer.name] = getattr(module, "shared_experts", None) is not None
        return self._has_shared

    def _deadlock_state(self, stats: StepStats) -> None:
        if not self._external:
            self.deadlock.observe(stats)  # private: its events are not ours
        elif self.deadlock.last_step != stats.step:
            raise RuntimeError(
                "shared_maturity reads the Deadlock monitor passed to it, which has not seen this step yet: "
                "list that Deadlock monitor before shared_maturity in attach_monitors(monitors=[...])"
            )

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        self._deadlock_state(stats)
        has_shared = self._shared_layers(stats)
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        for layer in stats.layers:
            if not layer.tokens or not has_shared[layer.name]:
                continue
            ratio = layer.shared_norm / layer.routed_norm if layer.routed_norm else 0.0
            state = self._layers.setdefault(
                layer.name,
                {"first": ratio, "max": ratio, "now": ratio, "matured_step": None, "episodes": [], "was_locked": False},
            )
            state["now"], state["max"] = ratio, max(state["max"], ratio)
            if state["matured_step"] is None and ratio >= self.mature_ratio:
                state["matured_step"] = stats.step
                detail = (
                    f"shared experts of layer {layer.depth} ({layer.name}) matured: ||shared|| / ||routed|| = "
                    f"{ratio:.3f} >= {self.mature_ratio}"
                )
                events.append(event(stats.step, self.name, layer.name, "matured", detail, ratio=ratio))
            lock = self.deadlock.layers.get(layer.name)
            locked = lock is not None and lock.active
            self._track_episode(state, locked, lock, ratio, stats.step)
            metrics[layer.name] = {
                "ratio": ratio,
                "deadlocked": float(locked),
                "deadlock_steps": float(lock.streak.steps if locked else 0),
            }
        return metrics, events

    @staticmethod
    def _track_episode(state: dict[str, Any], locked: bool, lock: Any, ratio: float, step: int) -> None:
        if locked and not state["was_locked"]:
            state["episodes"].append(
                {
                    "expert": lock.expert,
                    "start": lock.streak.since,
                    "end": None,
                    "ratio_at_start": ratio,
                    "ratio_at_end": None,
                }
            )
        elif state["was_locked"] and not locked:
            episode = state["episodes"][-1]
            episode["end"], episode["ratio_at_end"] = step, ratio
            episode["ended_after_maturity"] = state["matured_step"] is not None and state["matured_step"] <= step
        state["was_locked"] = locked

    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                "ratio_first": s["first"],
                "ratio_now": s["now"],
                "ratio_max": s["max"],
                "matured_step": s["matured_step"],
                "deadlocked": s["was_locked"],
                "deadlocked_steps": self.deadlock.layers[name].deadlocked_steps if name in self.deadlock.layers else 0,
                "episodes": [dict(e) for e in s["episodes"]],
            }
            for name, s in self._layers.items()
        }
        ended = [e for s in self._layers.values() for e in s["episodes"] if e["end"] is not None]
        model = {
            "mature_ratio": self.mature_ratio,
            "episodes_ended": len(ended),
            "ended_after_maturity": sum(1 for e in ended if e["ended_after_maturity"]),
        }
        return {"model": model, "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        # `_has_shared` is read from the model again on the first observation.
        state: dict[str, Any] = {
            "layers": {name: {**s, "episodes": [dict(e) for e in s["episodes"]]} for name, s in self._layers.items()}
        }
        if not self._external:  # a shared Deadlock is saved by the runner under its own name
            state["deadlock"] = self.deadlock.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._layers = {
            name: {**s, "episodes": [dict(e) for e in s["episodes"]]} for name, s in state["layers"].items()
        }
        if not self._external and "deadlock" in state:
            self.deadlock.load_state_dict(state["deadlock"])


register_monitor("shared_maturity", SharedMaturity, default=True)
