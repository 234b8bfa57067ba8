"""Dead experts and their revival ("resuscitation").

moeify's definition: an expert is dead once it has received zero top-k assignments for
`dead_after` (default 100) consecutive optimizer steps. Each observation adds
`steps_in_window` to the streak; windows in which the layer routed no tokens at all (padding
only, or the layer not run) are skipped, neither extending nor breaking it.

"E = T*H/(O+B): A Dimensionless Control Parameter for Mixture-of-Experts Ecology" defines a dead
expert as one with zero routing probability for > 100 consecutive batches (in the authors' reply
to its review; the abstract gives none), and reports that dead experts can revive. The two definitions differ in three ways:
  what counts   a softmax probability is never exactly 0, so moeify counts top-k assignments
                (what decides whether the expert's weights get any gradient). An expert dead by
                this count can still hold routing probability: `dead_prob_max` (metric and
                summary) is the largest mean router probability among the layer's dead experts
                in the last window, so the gap to the paper's definition is measured, not assumed.
  the clock     optimizer steps observed in windows of `every_n_steps`, not batches: with
                gradient accumulation one step spans several micro-batches, and one assignment
                anywhere in a window breaks the streak, so with `every_n_steps` > 1 a streak can
                start up to one window later than a per-batch count would.
  the bound     the event fires when the streak reaches `dead_after` steps (>=); the paper's
                "> 100" is `dead_after=101`.
Events:
  "dead"     the zero streak reaches `dead_after` steps (`since` = its first step).
  "revived"  a dead expert receives tokens again (`dead_for` = how many steps it had none).
Summary per layer: the experts dead now, every expert that was ever dead, the number of
revivals, the longest zero streak and `dead_prob_max`; model-wide: the count of dead experts
now and the definition used ("definition").
"""

from __future__ import annotations

from typing import Any

from moeify.checks import in_range
from moeify.monitors.base import CardColumn, CardFigure, Event, Monitor, StepStats, event, register_monitor
from moeify.monitors.streak import Streak

PAPER = "E = T*H/(O+B): A Dimensionless Control Parameter for Mixture-of-Experts Ecology"
PAPER_DEAD_BATCHES = 100  # its dead experts: zero routing for more than this many consecutive batches


class DeadExperts(Monitor):
    name = "dead_experts"
    card_columns = (
        CardColumn("dead experts", "dead_now", last_key="dead", format="count", order=40),
        CardColumn("ever dead", "ever_dead", format="count", order=50),
    )
    card_figures = (CardFigure("dead_experts", key="dead_now", last_key="dead", reduce="sum", order=10),)
    resolved_events = ("revived",)

    def __init__(self, *, dead_after: int = 100) -> None:
        in_range("dead_after", dead_after, ">= 1", unit="step")
        self.dead_after = dead_after
        self.last_step = 0  # the step of the last observation (other monitors check it)
        self._streaks: dict[str, list[Streak]] = {}
        self._ever: dict[str, set[int]] = {}
        self._revived: dict[str, int] = {}
        self._longest: dict[str, int] = {}
        self._dead_prob: dict[str, float] = {}  # largest mean probability of a dead expert, last window

    def dead_now(self, layer: str) -> list[int]:
        """The experts of `layer` that are dead at the last observation."""
        return [e for e, s in enumerate(self._streaks.get(layer, [])) if s.active]

    def zero_steps(self, layer: str) -> list[int]:
        """Per expert of `layer`: the steps of its current run without any top-k assignment."""
        return [s.steps for s in self._streaks.get(layer, [])]

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
                    events.append(
                        event(stats.step, self.name, layer.name, "dead", detail, expert=expert, since=streak.since)
                    )
                elif change == "end":
                    self._revived[layer.name] = self._revived.get(layer.name, 0) + 1
                    detail = (
                        f"expert {expert} of layer {layer.depth} ({layer.name}) revived after "
                        f"{streak.ended_steps} steps without tokens"
                    )
                    events.append(
                        event(
                            stats.step,
                            self.name,
                            layer.name,
                            "revived",
                            detail,
                            expert=expert,
                            dead_for=streak.ended_steps,
                        )
                    )
                self._longest[layer.name] = max(self._longest.get(layer.name, 0), streak.steps)
            dead = self.dead_now(layer.name)
            self._dead_prob[layer.name] = max((layer.prob_mean[e] for e in dead), default=0.0)
            metrics[layer.name] = {
                "dead": float(len(dead)),
                "zero_steps_max": float(max(s.steps for s in streaks)),
                "dead_prob_max": self._dead_prob[layer.name],
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
                "dead_prob_max": self._dead_prob.get(name, 0.0),
            }
            for name in self._streaks
        }
        return {"dead_now": self.num_dead(), "definition": self.definition(), "layers": layers}

    def definition(self) -> dict[str, str]:
        """The dead-expert definition used, next to the paper's (see the module docstring)."""
        return {
            "moeify": f"zero top-k assignments for >= {self.dead_after} consecutive optimizer steps",
            "paper": f'zero routing probability for > {PAPER_DEAD_BATCHES} consecutive batches ("{PAPER}")',
            "differences": (
                "assignments, not probability (a dead expert may hold probability: dead_prob_max); optimizer "
                "steps observed per window, not batches; >= dead_after, not > 100 (dead_after=101 matches)"
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "streaks": {name: [s.state_dict() for s in streaks] for name, streaks in self._streaks.items()},
            "ever": {name: sorted(experts) for name, experts in self._ever.items()},
            "revived": dict(self._revived),
            "longest": dict(self._longest),
            "dead_prob": dict(self._dead_prob),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        self._streaks = {name: [Streak.from_state(s) for s in streaks] for name, streaks in state["streaks"].items()}
        self._ever = {name: set(experts) for name, experts in state["ever"].items()}
        self._revived = dict(state["revived"])
        self._longest = dict(state["longest"])
        self._dead_prob = dict(state.get("dead_prob", {}))


register_monitor("dead_experts", DeadExperts, default=True)
