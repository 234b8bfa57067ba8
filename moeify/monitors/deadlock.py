"""Deadlocked layers: one expert takes (almost) every token, with recovery and a depth profile.

Shares are over top-k assignments: share_e = assignments to e / (tokens · k). One expert can
take at most 1/k of them (once per token), so the dominant share is judged relative to that:
  dominance = k · max_e share_e, in [k/E, 1] (1 = the expert is in every token's top-k).
A layer is deadlocked once dominance >= `tau` (0.9) for `patience` (50) consecutive optimizer
steps on the same expert (a change of dominant expert restarts the count). Layers with
top_k >= E are skipped: every expert takes 1/k there by construction. Events:
  "deadlocked"  naming the expert (`expert`, `since` = first step of the run).
  "recovered"   at the first observation where that expert's dominance falls below `tau`
                (`steps` = how long the deadlock lasted, counted from its first step).

Depth profile (summary "depth_profile"; the papers report deadlocked layers concentrated at the
shallow and deep ends, a U shape). Depth d of L MoE layers maps to x = d / (L - 1) in [0, 1];
each layer's y = fraction of its observed steps spent deadlocked. Layers split into thirds by
depth, symmetric under d -> L-1-d: shallow 3d < L-1, deep 3d > 2(L-1), middle otherwise.
  thirds      mean y per third.
  u_thirds    mean y of the shallow and deep layers - mean y of the middle layers, in [-1, 1];
              > 0 means the outer layers deadlock more (U), < 0 an inverted U.
  u_quadratic the coefficient c of the least-squares fit y = a + b x + c x² (needs >= 3 layers);
              > 0 is U-shaped (with 3 layers, ends always deadlocked and middle never: c = 4).
  ever_deadlocked_fraction  fraction of layers deadlocked at some point (papers: about a third).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeify.monitors.base import Event, LayerStats, Monitor, StepStats, event, register_monitor
from moeify.monitors.streak import Streak


@dataclass
class LayerDeadlock:
    """One layer's deadlock state (read by `SharedMaturity`)."""

    depth: int
    streak: Streak = field(default_factory=Streak)
    expert: int | None = None  # the dominant expert of the current run
    deadlocked_steps: int = 0  # total steps spent deadlocked (from each run's first step)
    observed_steps: int = 0
    episodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.streak.active

    def state_dict(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "streak": self.streak.state_dict(),
            "expert": self.expert,
            "deadlocked_steps": self.deadlocked_steps,
            "observed_steps": self.observed_steps,
            "episodes": [dict(e) for e in self.episodes],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LayerDeadlock:
        return cls(
            depth=state["depth"],
            streak=Streak.from_state(state["streak"]),
            expert=state["expert"],
            deadlocked_steps=state["deadlocked_steps"],
            observed_steps=state["observed_steps"],
            episodes=[dict(e) for e in state["episodes"]],
        )


def dominance(layer: LayerStats) -> tuple[int, float]:
    """The dominant expert and k · its share of the top-k assignments (1 = in every token's top-k)."""
    share = layer.load_share
    expert = max(range(layer.num_experts), key=share.__getitem__)
    return expert, layer.top_k * share[expert]


class Deadlock(Monitor):
    name = "deadlock"

    def __init__(self, *, tau: float = 0.9, patience: int = 50) -> None:
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1 step, got {patience}")
        self.tau, self.patience = tau, patience
        self.last_step = 0  # the step of the last observation (other monitors check it)
        self.layers: dict[str, LayerDeadlock] = {}
        self._num_layers = 0

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        self.last_step = stats.step
        self._num_layers = max(self._num_layers, len(stats.layers))
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        for layer in stats.layers:
            if not layer.tokens or layer.top_k >= layer.num_experts:
                continue
            state = self.layers.setdefault(layer.name, LayerDeadlock(layer.depth))
            expert, dom = dominance(layer)
            new_event = self._update(state, layer, expert, dom, stats)
            if new_event is not None:
                events.append(new_event)
            metrics[layer.name] = {
                "dominance": dom,
                "dominant_expert": float(expert),
                "deadlocked": float(state.active),
                "deadlock_steps": float(state.streak.steps if state.active else 0),
            }
        if metrics:
            metrics["model"] = {"deadlocked_fraction": sum(m["deadlocked"] for m in metrics.values()) / len(metrics)}
        return metrics, events

    def _update(self, state: LayerDeadlock, layer: LayerStats, expert: int, dom: float, stats: StepStats) -> Event | None:
        n, step = stats.steps_in_window, stats.step
        state.observed_steps += n
        holds = dom >= self.tau
        out = None
        if state.streak.steps and (not holds or expert != state.expert):
            # The run ends: its expert lost dominance, or another expert took over.
            if state.streak.update(False, step, n, self.patience) == "end":
                state.episodes[-1]["end"] = step
                own = layer.top_k * layer.load_share[state.expert]
                detail = (
                    f"layer {layer.depth} ({layer.name}) recovered: expert {state.expert} fell to {own:.3f} "
                    f"of its maximum share after {state.streak.ended_steps} deadlocked steps"
                )
                out = event(step, self.name, layer.name, "recovered", detail, expert=state.expert, steps=state.streak.ended_steps)
        if holds:
            state.expert = expert
            if state.streak.update(True, step, n, self.patience) == "start":
                state.deadlocked_steps += state.streak.steps - n  # the steps before the event
                state.episodes.append({"expert": expert, "start": state.streak.since, "end": None})
                detail = (
                    f"layer {layer.depth} ({layer.name}) deadlocked on expert {expert}: it takes {dom:.3f} of "
                    f"the maximum share 1/{layer.top_k} for {state.streak.steps} steps (since step {state.streak.since})"
                )
                out = event(step, self.name, layer.name, "deadlocked", detail, expert=expert, since=state.streak.since)
        if state.active:
            state.deadlocked_steps += n
        return out

    def depth_profile(self) -> dict[str, Any]:
        """The deadlock fraction over depth and the U-shape statistics (see the module docstring)."""
        num = max(self._num_layers, 1)
        points = sorted(
            (s.depth, s.deadlocked_steps / s.observed_steps) for s in self.layers.values() if s.observed_steps
        )
        x = [d / (num - 1) if num > 1 else 0.0 for d, _ in points]
        y = [f for _, f in points]
        thirds: dict[str, list[float]] = {"shallow": [], "middle": [], "deep": []}
        for (d, f) in points:
            key = "shallow" if 3 * d < num - 1 else "deep" if 3 * d > 2 * (num - 1) else "middle"
            thirds[key].append(f)
        means = {k: (sum(v) / len(v) if v else None) for k, v in thirds.items()}
        outer = thirds["shallow"] + thirds["deep"]
        u_thirds = (
            sum(outer) / len(outer) - means["middle"] if outer and means["middle"] is not None else None
        )
        return {
            "depth": x,
            "deadlocked_fraction": y,
            "thirds": means,
            "u_thirds": u_thirds,
            "u_quadratic": _quadratic_coefficient(x, y),
            "ever_deadlocked_fraction": (
                sum(1 for s in self.layers.values() if s.episodes) / len(self.layers) if self.layers else 0.0
            ),
        }

    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                "depth": s.depth,
                "deadlocked": s.active,
                "expert": s.expert if s.active else None,
                "deadlocked_steps": s.deadlocked_steps,
                "observed_steps": s.observed_steps,
                "episodes": [dict(e) for e in s.episodes],
            }
            for name, s in self.layers.items()
        }
        return {"model": {"depth_profile": self.depth_profile()}, "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        # The depth profile is computed from these on demand: nothing else accumulates.
        return {
            "last_step": self.last_step,
            "num_layers": self._num_layers,
            "layers": {name: s.state_dict() for name, s in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        self._num_layers = state["num_layers"]
        self.layers = {name: LayerDeadlock.from_state(s) for name, s in state["layers"].items()}


def _quadratic_coefficient(x: list[float], y: list[float]) -> float | None:
    """c of the least-squares fit y = a + b x + c x², or None with fewer than 3 distinct depths.

    Plain Python on the normal equations (Cramer's rule), so the same data always gives the same
    bits (LAPACK's lstsq varied in the last bits between calls). Centring x leaves c unchanged and
    keeps the 3x3 system well conditioned at any depth."""
    if len(set(x)) < 3:
        return None
    mean = sum(x) / len(x)
    u = [xi - mean for xi in x]
    s = [sum(ui**k for ui in u) for k in range(5)]
    t = [sum(yi * ui**k for ui, yi in zip(u, y)) for k in range(3)]
    normal = [[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]]
    with_t = [row[:2] + [t[i]] for i, row in enumerate(normal)]
    return _det3(with_t) / _det3(normal)


def _det3(m: list[list[float]]) -> float:
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


register_monitor("deadlock", Deadlock, default=True)
