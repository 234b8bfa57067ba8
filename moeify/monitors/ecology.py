"""The ecology number E = T·H / (O + B) of each MoE layer, next to its dead-expert count.

  T  routing temperature (`router_temperature`: logits are divided by it)
  H  weight of the routing-entropy regulariser (`entropy_loss_weight`)
  B  weight of the load-balancing loss (`balance_loss_weight`)
  O  weight of an oracle / target-routing loss (e.g. class labels -> expert). moeify has none of
     its own: pass the weight of yours as `oracle_weight` (default 0).
The values are read from each MoeLayer (`temperature`, `loss_weights`), which carry the
MoeifyConfig they were converted with, so layers converted with different recipes each get
theirs. E = 0 when T·H = 0, which includes moeify's default entropy_loss_weight = 0 (so the
default recipe warns); otherwise E = inf when O + B = 0 (nothing pulls routing toward a target
or toward balance, so nothing opposes the entropy term).

The paper behind it reports E >= 0.5 sufficient for zero dead experts (12 runs, vision and
language; the critical value shifted with task complexity, so treat 0.5 as a guide).
Event "low_ecology" (a warning) when some layer has E < `threshold` (0.5): once at the first
observation, and again only if the hyperparameters change to another value below it. The dead
count comes from the `DeadExperts` monitor passed as `dead=` (list it before this one) or from
a private one built with `dead_after`.
"""

from __future__ import annotations

import math
from typing import Any

from moeify.monitors.base import Event, Monitor, StepStats, event, register_monitor
from moeify.monitors.dead import DeadExperts


def ecology_number(temperature: float, entropy_weight: float, oracle_weight: float, balance_weight: float) -> float:
    """E = T·H / (O + B); inf when O + B = 0 and T·H > 0, and 0 when T·H = 0."""
    numerator, denominator = temperature * entropy_weight, oracle_weight + balance_weight
    if numerator == 0:
        return 0.0
    return numerator / denominator if denominator else math.inf


class Ecology(Monitor):
    name = "ecology"

    def __init__(
        self,
        *,
        oracle_weight: float = 0.0,
        threshold: float = 0.5,
        dead: DeadExperts | None = None,
        dead_after: int = 100,
    ) -> None:
        if oracle_weight < 0:
            raise ValueError(f"oracle_weight must be >= 0, got {oracle_weight}")
        self.oracle_weight, self.threshold = oracle_weight, threshold
        self._external = dead is not None
        self.dead = dead if dead is not None else DeadExperts(dead_after=dead_after)
        self._warned: tuple[tuple[str, float], ...] = ()
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
        return metrics, self._warn(stats.step)

    def _warn(self, step: int) -> list[Event]:
        low = tuple((name, t["E"]) for name, t in self._last.items() if t["E"] < self.threshold)
        if not low or low == self._warned:
            return []
        self._warned = low
        values = sorted({e for _, e in low})
        which = f"all {len(low)} MoE layers" if len(low) == len(self._last) else ", ".join(name for name, _ in low)
        t = self._last[low[0][0]]
        detail = (
            f"ecology number E = T·H/(O+B) = {', '.join(f'{v:.3g}' for v in values)} < {self.threshold} in {which} "
            f"(e.g. T={t['T']:g}, H={t['H']:g}, O={t['O']:g}, B={t['B']:g}): dead experts are likely; raise "
            f"router_temperature or entropy_loss_weight, or lower balance_loss_weight"
        )
        return [event(step, self.name, None, "low_ecology", detail, E=values[0], layers=[name for name, _ in low])]

    def summary(self) -> dict[str, Any]:
        values = [t["E"] for t in self._last.values()]
        model = {
            "E_min": min(values) if values else None,
            "threshold": self.threshold,
            "below_threshold": [name for name, t in self._last.items() if t["E"] < self.threshold],
            "dead_experts": self.dead.num_dead(),
        }
        return {"model": model, "layers": {name: dict(t) for name, t in self._last.items()}}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "warned": [list(pair) for pair in self._warned],
            "last": {name: dict(t) for name, t in self._last.items()},
        }
        if not self._external:  # a shared DeadExperts is saved by the runner under its own name
            state["dead"] = self.dead.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A tuple of tuples again: `_warn` compares it with ==.
        self._warned = tuple((name, e) for name, e in state["warned"])
        self._last = {name: dict(t) for name, t in state["last"].items()}
        if not self._external and "dead" in state:
            self.dead.load_state_dict(state["dead"])


register_monitor("ecology", Ecology, default=True)
