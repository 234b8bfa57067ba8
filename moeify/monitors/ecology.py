"""The ecology number E = T·H / (O + B) of each MoE layer, next to its dead-expert count.

From "E = T*H/(O+B): A Dimensionless Control Parameter for Mixture-of-Experts Ecology":
  T  routing temperature (`router_temperature`: logits are divided by it)
  H  weight of the routing-entropy regulariser (`entropy_loss_weight`)
  B  weight of the load-balancing loss (`balance_loss_weight`)
  O  weight of an oracle / target-routing loss (e.g. class label -> expert). moeify trains no
     oracle loss, so O is not read from the model: it is the constructor's `oracle_weight`, the
     same for every layer, default 0 (pass the weight of your own oracle loss if you add one).
     The router z-loss is not a term of E.
T, H and B are read from each MoeLayer (`temperature`, `loss_weights`), which carry the
MoeifyConfig they were converted with, so layers converted with different recipes each get
theirs. E = 0 when T·H = 0, which includes moeify's default entropy_loss_weight = 0; otherwise
E = inf when O + B = 0.

What the paper claims, and what it does not: over 12 runs (8 vision, 4 language) it reports
E >= 0.5 SUFFICIENT for zero dead experts, and notes that the critical value shifts with task
complexity. It makes no prediction below 0.5: a low E is outside the region the paper covers,
not a forecast of dead experts. Its dead experts have zero routing probability for > 100
consecutive batches; moeify's are counted by `DeadExperts` (zero top-k assignments, see `dead`).

Events, and why:
  "low_ecology" (`severity` "info") once at the first observation when some layer has
      E < `threshold` (0.5), and again only if those layers or their E values change. E moves
      only when the settings do (`moeify.set_routing`, a schedule), so between such changes
      nothing happens that a repeated event would report; the note says once, where every sink shows it, that the paper's guarantee does
      not cover the run. It claims nothing about dead experts.
  "ecology_contradicted" (`severity` "warning") the first time a layer with E >= `threshold`
      has an expert without any top-k assignment for more than the paper's 100 steps: the one
      outcome its sufficient condition rules out. Judged on the zero streaks of `DeadExperts`
      whatever its `dead_after`, so a shorter `dead_after` (dead events sooner) does not make
      the paper say more; assignments stand in for its zero probability (see `dead`).
      `threshold` defaults to the paper's 0.5; set another where your task moves the critical
      value.
The dead count comes from the `DeadExperts` monitor passed as `dead=` (list it before this one)
or from a private one built with `dead_after`.
"""

from __future__ import annotations

import math
from typing import Any

from moeify.checks import in_range
from moeify.monitors.base import CardColumn, CardFigure, Event, Monitor, StepStats, event, register_monitor
from moeify.monitors.dead import PAPER, PAPER_DEAD_BATCHES, DeadExperts

CLAIM = (
    f'"{PAPER}" reports E >= 0.5 sufficient for zero dead experts (12 runs; the critical value shifts with task '
    "complexity); below 0.5 it predicts nothing"
)


def ecology_number(temperature: float, entropy_weight: float, oracle_weight: float, balance_weight: float) -> float:
    """E = T·H / (O + B); inf when O + B = 0 and T·H > 0, and 0 when T·H = 0."""
    numerator, denominator = temperature * entropy_weight, oracle_weight + balance_weight
    if numerator == 0:
        return 0.0
    return numerator / denominator if denominator else math.inf


class Ecology(Monitor):
    name = "ecology"
    card_columns = (CardColumn("ecology E", "E", last_key="E", order=80),)
    card_figures = (CardFigure("ecology_E_min", key="E", last_key="E", reduce="min", order=30),)

    def __init__(
        self,
        *,
        oracle_weight: float = 0.0,
        threshold: float = 0.5,
        dead: DeadExperts | None = None,
        dead_after: int = 100,
    ) -> None:
        in_range("oracle_weight", oracle_weight, ">= 0")
        in_range("threshold", threshold, "> 0")
        self.oracle_weight, self.threshold = oracle_weight, threshold
        self._external = dead is not None
        self.dead = dead if dead is not None else DeadExperts(dead_after=dead_after)
        self._noted: tuple[tuple[str, float], ...] = ()
        self._contradicted: list[str] = []  # layers with E >= threshold that had a dead expert, in order
        self._last: dict[str, dict[str, Any]] = {}
        self._modules: dict[str, Any] = {}

    def layer_terms(self, stats: StepStats, name: str) -> dict[str, float]:
        if name not in self._modules:
            self._modules[name] = stats.model.get_submodule(name)
        module = self._modules[name]
        terms = {
            "T": float(module.temperature),
            "H": float(module.loss_weights.get("entropy", 0.0)),
            "O": float(self.oracle_weight),
            "B": float(module.loss_weights.get("balance", 0.0)),
        }
        terms["E"] = ecology_number(terms["T"], terms["H"], terms["O"], terms["B"])
        return terms

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        if not self._external:
            self.dead.observe(stats)  # private: its events are not ours
        elif self.dead.last_step != stats.step:
            raise RuntimeError(
                "ecology reads the DeadExperts monitor passed to it, which has not seen this step yet: "
                "list that DeadExperts monitor before ecology in attach_monitors(monitors=[...])"
            )
        metrics: dict[str, dict[str, float]] = {}
        for layer in stats.layers:
            terms = self.layer_terms(stats, layer.name)
            self._last[layer.name] = {**terms, "dead": len(self.dead.dead_now(layer.name))}
            metrics[layer.name] = {"E": terms["E"], "dead_experts": float(self._last[layer.name]["dead"])}
        if not metrics:
            return metrics, []
        metrics["model"] = {
            "E_min": min(m["E"] for m in metrics.values()),
            "dead_experts": float(self.dead.num_dead()),
        }
        return metrics, self._note(stats.step) + self._contradictions(stats)

    def _note(self, step: int) -> list[Event]:
        low = tuple((name, t["E"]) for name, t in self._last.items() if t["E"] < self.threshold)
        if not low or low == self._noted:
            return []
        self._noted = low
        values = sorted({e for _, e in low})
        which = f"all {len(low)} MoE layers" if len(low) == len(self._last) else ", ".join(name for name, _ in low)
        t = self._last[low[0][0]]
        detail = (
            f"ecology number E = T·H/(O+B) = {', '.join(f'{v:.3g}' for v in values)} < {self.threshold} in {which} "
            f"(e.g. T={t['T']:g}, H={t['H']:g}, B={t['B']:g}, O={t['O']:g}: moeify has no oracle loss, O is the "
            f"oracle_weight given to this monitor). {CLAIM}. This note forecasts no dead experts (the "
            f"dead_experts monitor counts them)"
        )
        layers = [name for name, _ in low]
        return [event(step, self.name, None, "low_ecology", detail, severity="info", E=values[0], layers=layers)]

    def _contradictions(self, stats: StepStats) -> list[Event]:
        out = []
        for layer in stats.layers:
            t = self._last[layer.name]
            zero = self.dead.zero_steps(layer.name)
            starved = [e for e, steps in enumerate(zero) if steps > PAPER_DEAD_BATCHES]
            if t["E"] < self.threshold or not starved or layer.name in self._contradicted:
                continue
            self._contradicted.append(layer.name)
            detail = (
                f"layer {layer.depth} ({layer.name}): expert(s) {starved} without any top-k assignment for "
                f'{max(zero[e] for e in starved)} steps at E = {t["E"]:.3g} >= {self.threshold}, where "{PAPER}" '
                f"reports no dead expert at E >= 0.5 (its dead experts: zero routing probability for "
                f"> {PAPER_DEAD_BATCHES} batches)"
            )
            out.append(
                event(
                    stats.step,
                    self.name,
                    layer.name,
                    "ecology_contradicted",
                    detail,
                    severity="warning",
                    E=t["E"],
                    experts=starved,
                )
            )
        return out

    def summary(self) -> dict[str, Any]:
        values = [t["E"] for t in self._last.values()]
        model = {
            "E_min": min(values) if values else None,
            "threshold": self.threshold,
            "oracle_weight": self.oracle_weight,  # O: moeify has no oracle loss of its own
            "below_threshold": [name for name, t in self._last.items() if t["E"] < self.threshold],
            "covered_by_claim": [name for name, t in self._last.items() if t["E"] >= self.threshold],
            "contradicted": list(self._contradicted),
            "dead_experts": self.dead.num_dead(),
            "claim": CLAIM,
        }
        return {"model": model, "layers": {name: dict(t) for name, t in self._last.items()}}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "noted": [list(pair) for pair in self._noted],
            "contradicted": list(self._contradicted),
            "last": {name: dict(t) for name, t in self._last.items()},
        }
        if not self._external:  # a shared DeadExperts is saved by the runner under its own name
            state["dead"] = self.dead.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A tuple of tuples again: `_note` compares it with ==. "warned": the key before the note.
        self._noted = tuple((name, e) for name, e in state.get("noted", state.get("warned", [])))
        self._contradicted = list(state.get("contradicted", []))
        self._last = {name: dict(t) for name, t in state["last"].items()}
        if not self._external and "dead" in state:
            self.dead.load_state_dict(state["dead"])


register_monitor("ecology", Ecology, default=True)
