"""Deadlocked layers: one expert takes (almost) every token and most of the routing probability,
with recovery and a depth profile.

"Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers: Diagnosis, Boundary
Calibration and Evolutionary Roadmap from Routing Collapse to Selective Deadlock" reports
selective deadlock in a converted video DiT: with MLP routers roughly one-third of the layers
degenerate into a single-expert mode that a larger auxiliary loss does not prevent; with
cross-attention routers about nine layers stay deadlocked; deadlocked layers concentrate in
shallow and deep layers (a U over depth). It gives no numeric definition of a single-expert mode
and no uncertainty for the U; the definitions below are moeify's.

Two shares of the dominant expert e (the one with the most top-k assignments in the window):
  dominance       k · e's share of the top-k assignments, in [k/E, 1]: one expert can take at
                  most 1/k of them (once per token); 1 = e is in every token's top-k.
  prob_share      e's mean router probability (`LayerStats.prob_mean`; 1/E when uniform).
  prob_dominance  (prob_share - 1/E) / (1 - 1/E): 0 when uniform, 1 when e takes all of it.
Why both: counts alone call a layer deadlocked when one expert wins every token's top-k by a
hair. In controlled runs of a converted DiT (6 blocks, 8 experts top-2 + 1 shared), 78% of the
layer-steps that counts alone called deadlocked still had normalised routing entropy >= 0.9.
That expert does get every token's gradient, but the router has not collapsed onto it: a small
change of the logits sends the tokens elsewhere. So a layer is deadlocked once dominance >=
`tau` (0.9) AND prob_dominance >= `prob_tau` (0.5: e holds at least half the way from uniform to
all the probability) for `patience` (50) consecutive optimizer steps on the same expert (a change
of dominant expert restarts the count). `prob_tau=None` judges the counts alone. Windows where
the counts hold and the probability does not are "assignment-only": counted per layer
(`assignment_only_steps`) and shown as the metric `assignment_locked` (counts alone). Layers
with top_k >= E are skipped: every expert takes 1/k there by construction. Events:
  "deadlocked"  naming the expert (`expert`, `since` = first step of the run, `dominance`,
                `prob_share`).
  "recovered"   at the first observation where that expert's dominance falls below `tau` or its
                prob_dominance below `prob_tau` (`steps` = how long the deadlock lasted).

Depth profile (summary "depth_profile"). Depth d of L MoE layers maps to x = d / (L - 1) in
[0, 1]; each layer's y = fraction of its observed steps spent deadlocked. Layers split into
thirds by depth, symmetric under d -> L-1-d: shallow 3d < L-1, deep 3d > 2(L-1), middle otherwise.
  thirds      mean y per third.
  u_thirds    mean y of the shallow and deep layers - mean y of the middle layers, in [-1, 1];
              > 0 means the outer layers deadlock more (U), < 0 an inverted U.
  u_quadratic the coefficient c of the least-squares fit y = a + b x + c x² (needs >= 3 layers);
              > 0 is U-shaped (with 3 layers, ends always deadlocked and middle never: c = 4).
  ever_deadlocked_fraction  fraction of layers deadlocked at some point (the paper: about a third).
  u_thirds_interval, u_quadratic_interval  percentile bootstrap intervals (`interval_confidence`,
              0.95) over layers: the (depth, y) points resampled with replacement
              `bootstrap_resamples` (1000) times from `bootstrap_seed` (0), so the same run
              always gives the same interval. Resamples where a statistic is undefined (no middle
              or no outer layer; < 3 distinct depths) are left out and counted ("bootstrap").
              It shows how much the statistic depends on which layers are in, nothing more:
              neighbouring layers are not independent (so it is if anything too narrow), and
              when few layers agree perfectly it collapses (3 layers at 1, 0, 1 give [1, 1], with
              u_thirds undefined in 315 of 1000 resamples), so read it with the layer count.
              Six layers at 1, .5, 0, .1, .6, .9 give u_thirds 0.7 in [0.475, 0.94].
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from moeify.checks import in_range
from moeify.monitors.base import CardColumn, CardFigure, Event, LayerStats, Monitor, StepStats, event, register_monitor
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
    assignment_locked_steps: int = 0  # steps with dominance >= tau (counts alone)
    assignment_only_steps: int = 0  # of those, steps whose probability did not follow
    last: dict[str, float] = field(default_factory=dict)  # dominance and prob_share of the last window

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
            "assignment_locked_steps": self.assignment_locked_steps,
            "assignment_only_steps": self.assignment_only_steps,
            "last": dict(self.last),
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
            # Absent from states saved before probability shares were tracked.
            assignment_locked_steps=state.get("assignment_locked_steps", 0),
            assignment_only_steps=state.get("assignment_only_steps", 0),
            last=dict(state.get("last", {})),
        )


def dominance(layer: LayerStats) -> tuple[int, float]:
    """The dominant expert and k · its share of the top-k assignments (1 = in every token's top-k)."""
    share = layer.load_share
    expert = max(range(layer.num_experts), key=share.__getitem__)
    return expert, layer.top_k * share[expert]


def prob_dominance(layer: LayerStats, expert: int) -> float:
    """(p_e - 1/E) / (1 - 1/E) of the expert's mean router probability p_e: 0 uniform, 1 all of it."""
    uniform = 1.0 / layer.num_experts
    return (layer.prob_mean[expert] - uniform) / (1.0 - uniform)


class Deadlock(Monitor):
    name = "deadlock"
    card_columns = (CardColumn("deadlocked", "deadlocked", last_key="deadlocked", format="flag", order=60),)
    card_figures = (
        CardFigure("deadlocked_layers", key="deadlocked", last_key="deadlocked", reduce="layers", order=20),
        CardFigure("ever_deadlocked_fraction", path=("model", "depth_profile", "ever_deadlocked_fraction"), order=50),
        CardFigure("deadlock_u_thirds", path=("model", "depth_profile", "u_thirds"), order=60),
        # Its bootstrap interval over layers: a U read off a handful of layers is weak evidence.
        CardFigure("deadlock_u_thirds_interval", path=("model", "depth_profile", "u_thirds_interval"), order=70),
        # Of the layer-steps that top-k counts alone call deadlocked, the share the router's probability did not follow.
        CardFigure("deadlock_assignment_only_share", path=("model", "assignment_only_share"), order=80),
    )
    resolved_events = ("recovered",)

    def __init__(
        self,
        *,
        tau: float = 0.9,
        patience: int = 50,
        prob_tau: float | None = 0.5,
        bootstrap_resamples: int = 1000,
        bootstrap_seed: int = 0,
        interval_confidence: float = 0.95,
    ) -> None:
        in_range("tau", tau, "(0, 1]")
        in_range("patience", patience, ">= 1", unit="step")
        if prob_tau is not None:  # None: counts alone
            in_range("prob_tau", prob_tau, "[0, 1]")
        in_range("bootstrap_resamples", bootstrap_resamples, ">= 1")
        in_range("interval_confidence", interval_confidence, "(0, 1)")
        self.tau, self.patience, self.prob_tau = tau, patience, prob_tau
        self.bootstrap_resamples, self.bootstrap_seed = bootstrap_resamples, bootstrap_seed
        self.interval_confidence = interval_confidence
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
            new_event = self._update(state, layer, expert, stats)
            if new_event is not None:
                events.append(new_event)
            metrics[layer.name] = {
                "dominance": dom,
                "dominant_expert": float(expert),
                "prob_share": layer.prob_mean[expert],
                "prob_dominance": prob_dominance(layer, expert),
                "assignment_locked": float(dom >= self.tau),
                "deadlocked": float(state.active),
                "deadlock_steps": float(state.streak.steps if state.active else 0),
            }
        if metrics:
            metrics["model"] = {
                "deadlocked_fraction": sum(m["deadlocked"] for m in metrics.values()) / len(metrics),
                "assignment_locked_fraction": sum(m["assignment_locked"] for m in metrics.values()) / len(metrics),
            }
        return metrics, events

    def _holds(self, layer: LayerStats, expert: int) -> tuple[bool, bool]:
        """(counts hold, probability holds) for `expert` in this window."""
        counts = layer.top_k * layer.load_share[expert] >= self.tau
        return counts, self.prob_tau is None or prob_dominance(layer, expert) >= self.prob_tau

    def _update(self, state: LayerDeadlock, layer: LayerStats, expert: int, stats: StepStats) -> Event | None:
        n, step = stats.steps_in_window, stats.step
        state.observed_steps += n
        counts, probability = self._holds(layer, expert)
        state.assignment_locked_steps += n if counts else 0
        state.assignment_only_steps += n if counts and not probability else 0
        state.last = self._shares(layer, expert)
        holds = counts and probability
        out = None
        if state.streak.steps and (not holds or expert != state.expert):
            # The run ends: its expert lost dominance (counts or probability), or another took over.
            if state.streak.update(False, step, n, self.patience) == "end":
                state.episodes[-1]["end"] = step
                out = self._recovered(state, layer, step)
        if holds:
            state.expert = expert
            if state.streak.update(True, step, n, self.patience) == "start":
                state.deadlocked_steps += state.streak.steps - n  # the steps before the event
                state.episodes.append({"expert": expert, "start": state.streak.since, "end": None})
                out = self._deadlocked(state, layer, step)
        if state.active:
            state.deadlocked_steps += n
        return out

    def _shares(self, layer: LayerStats, expert: int) -> dict[str, float]:
        return {"dominance": layer.top_k * layer.load_share[expert], "prob_share": layer.prob_mean[expert]}

    def _deadlocked(self, state: LayerDeadlock, layer: LayerStats, step: int) -> Event:
        expert, streak = state.expert, state.streak
        shares = self._shares(layer, expert)
        detail = (
            f"layer {layer.depth} ({layer.name}) deadlocked on expert {expert}: it takes {shares['dominance']:.3f} of "
            f"the maximum assignment share 1/{layer.top_k} and a mean router probability of {shares['prob_share']:.3f} "
            f"(uniform 1/{layer.num_experts}) for {streak.steps} steps (since step {streak.since})"
        )
        return event(step, self.name, layer.name, "deadlocked", detail, expert=expert, since=streak.since, **shares)

    def _recovered(self, state: LayerDeadlock, layer: LayerStats, step: int) -> Event:
        expert, steps = state.expert, state.streak.ended_steps
        shares = self._shares(layer, expert)
        counts, _ = self._holds(layer, expert)
        why = (
            f"its mean router probability fell to {shares['prob_share']:.3f}"
            if counts
            else f"it fell to {shares['dominance']:.3f} of its maximum assignment share"
        )
        detail = f"layer {layer.depth} ({layer.name}) recovered: expert {expert} {why} after {steps} deadlocked steps"
        return event(step, self.name, layer.name, "recovered", detail, expert=expert, steps=steps, **shares)

    def depth_profile(self) -> dict[str, Any]:
        """The deadlock fraction over depth, the U-shape statistics and their bootstrap intervals
        (see the module docstring)."""
        num = max(self._num_layers, 1)
        points = sorted(
            (s.depth, s.deadlocked_steps / s.observed_steps) for s in self.layers.values() if s.observed_steps
        )
        means, u_thirds = _thirds(points, num)
        intervals = _bootstrap(points, num, self.bootstrap_resamples, self.bootstrap_seed, self.interval_confidence)
        return {
            "depth": [_x(d, num) for d, _ in points],
            "deadlocked_fraction": [f for _, f in points],
            "thirds": means,
            "u_thirds": u_thirds,
            "u_quadratic": _quadratic(points, num),
            "u_thirds_interval": intervals.pop("u_thirds"),
            "u_quadratic_interval": intervals.pop("u_quadratic"),
            "bootstrap": intervals,
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
                "assignment_locked_steps": s.assignment_locked_steps,
                "assignment_only_steps": s.assignment_only_steps,
                **s.last,
                "episodes": [dict(e) for e in s.episodes],
            }
            for name, s in self.layers.items()
        }
        locked = sum(s.assignment_locked_steps for s in self.layers.values())
        model = {
            "depth_profile": self.depth_profile(),
            "criterion": {"tau": self.tau, "prob_tau": self.prob_tau, "patience": self.patience},
            # Of the layer-steps that counts alone call deadlocked, the share whose probability did not follow.
            "assignment_only_share": (
                sum(s.assignment_only_steps for s in self.layers.values()) / locked if locked else None
            ),
        }
        return {"model": model, "layers": layers}

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


# ---------------------------------------------------------------------------------------------
# The depth profile: points are (depth, fraction of steps deadlocked) of num MoE layers.


def _x(depth: int, num: int) -> float:
    return depth / (num - 1) if num > 1 else 0.0


def _thirds(points: list[tuple[int, float]], num: int) -> tuple[dict[str, float | None], float | None]:
    """Mean y per third of the depth, and u_thirds (None without an outer or a middle layer)."""
    thirds: dict[str, list[float]] = {"shallow": [], "middle": [], "deep": []}
    for d, f in points:
        key = "shallow" if 3 * d < num - 1 else "deep" if 3 * d > 2 * (num - 1) else "middle"
        thirds[key].append(f)
    means = {k: (sum(v) / len(v) if v else None) for k, v in thirds.items()}
    outer = thirds["shallow"] + thirds["deep"]
    middle = means["middle"]
    return means, (sum(outer) / len(outer) - middle if outer and middle is not None else None)


def _quadratic(points: list[tuple[int, float]], num: int) -> float | None:
    return _quadratic_coefficient([_x(d, num) for d, _ in points], [f for _, f in points])


def _bootstrap(
    points: list[tuple[int, float]], num: int, resamples: int, seed: int, confidence: float
) -> dict[str, Any]:
    """Percentile intervals of u_thirds and u_quadratic over layers resampled with replacement.

    One `random.Random(seed)` draws every resample, so the interval is a function of the run's
    points alone (the same bits on every machine and call)."""
    draws: dict[str, list[float]] = {"u_thirds": [], "u_quadratic": []}
    if points:
        rng = random.Random(seed)
        for _ in range(resamples):
            sample = [points[rng.randrange(len(points))] for _ in points]
            for key, value in (("u_thirds", _thirds(sample, num)[1]), ("u_quadratic", _quadratic(sample, num))):
                if value is not None:
                    draws[key].append(value)
    alpha = (1.0 - confidence) / 2
    out: dict[str, Any] = {
        key: ([_quantile(v, alpha), _quantile(v, 1.0 - alpha)] if v else None) for key, v in draws.items()
    }
    out.update(
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        defined={key: len(v) for key, v in draws.items()},  # resamples where each statistic exists
    )
    return out


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile, interpolated linearly between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


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
