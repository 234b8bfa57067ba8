"""Dead experts and their revival ("resuscitation").

An expert is dead once it has received zero top-k assignments for `dead_after` (default 100)
consecutive optimizer steps (the E = T·H/(O+B) paper's definition, counted in steps: each
observation adds `steps_in_window`; windows in which the layer routed no tokens at all are
skipped). Events:
  "dead"     the zero streak reaches `dead_after` steps (`since` = its first step).
  "revived"  a dead expert receives tokens again (`dead_for` = how many steps it had none).
Summary per layer: the experts dead now, every expert that was ever dead, the number of
revivals and the longest zero streak; model-wide: the count of dead experts now.
"""

from __future__ import annotations

from typing import Any

from moeify.monitors.base import Event, Monitor, StepStats, event, register_monitor
from moeify.monitors.streak import Streak


class DeadExperts(Monitor):
    name = "dead_experts"

    def __init__(self, *, dead_after: int = 100) -> None:
        if dead_after < 1:
            raise ValueError(f"dead_after must be >= 1 step, got {dead_after}")
        self.dead_after = dead_after
        self.last_step = 0  # the step of the last observation (other monitors check it)
        self._streaks: dict[str, list[Streak]] = {}
        self._ever: dict[str, set[int]] = {}
        self._revived: dict[str, int] = {}
        self._longest: dict[str, int] = {}

    def dead_now(self, layer: str) -> list[int]:
        """The experts of `layer` that are dead at the last observation."""
        return [e for e, s in enumerate(self._streaks.get(layer, [])) if s.active]

    def num_dead(self) -> int:
        return sum(len(self.dead_now(name)) for name in self._streaks)

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        self.last_step = stats.step
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        for layer in stats.layers:
            if not layer.tokens:
                continue
            streaks = self._streaks.setdefault(layer.name, [Streak() for _ in range(layer.num_experts)])
            for expert, (count, streak) in enumerate(zip(layer.tokens_per_expert, streaks)):
                change = streak.update(count == 0, stats.step, stats.steps_in_window, self.dead_after)
                if change == "start":
                    self._ever.setdefault(layer.name, set()).add(expert)
                    detail = (
                        f"expert {expert} of layer {layer.depth} ({layer.name}) received no tokens for "
                        f"{streak.steps} steps (since step {streak.since})"
                    )
                    events.append(event(stats.step, self.name, layer.name, "dead", detail, expert=expert, since=streak.since))
                elif change == "end":
                    self._revived[layer.name] = self._revived.get(layer.name, 0) + 1
                    detail = (
                        f"expert {expert} of layer {layer.depth} ({layer.name}) revived after "
                        f"{streak.ended_steps} steps without tokens"
                    )
                    events.append(
                        event(stats.step, self.name, layer.name, "revived", detail, expert=expert, dead_for=streak.ended_steps)
                    )
                self._longest[layer.name] = max(self._longest.get(layer.name, 0), streak.steps)
            metrics[layer.name] = {
                "dead": float(len(self.dead_now(layer.name))),
                "zero_steps_max": float(max(s.steps for s in streaks)),
            }
        if metrics:
            metrics["model"] = {"dead": float(self.num_dead())}
        return metrics, events

    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                "dead_now": self.dead_now(name),
                "ever_dead": sorted(self._ever.get(name, ())),
                "revived": self._revived.get(name, 0),
                "longest_zero_steps": self._longest.get(name, 0),
            }
            for name in self._streaks
        }
        return {"dead_now": self.num_dead(), "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "streaks": {name: [s.state_dict() for s in streaks] for name, streaks in self._streaks.items()},
            "ever": {name: sorted(experts) for name, experts in self._ever.items()},
            "revived": dict(self._revived),
            "longest": dict(self._longest),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        self._streaks = {name: [Streak.from_state(s) for s in streaks] for name, streaks in state["streaks"].items()}
        self._ever = {name: set(experts) for name, experts in state["ever"].items()}
        self._revived = dict(state["revived"])
        self._longest = dict(state["longest"])


register_monitor("dead_experts", DeadExperts, default=True)
