"""Imbalance early warning: critical slowing down of the load imbalance before it tips over.

"A Minimal Bifurcation Model of Load Imbalance in a Softmax Mixture-of-Experts Router" models
softmax routing as a feedback loop of strength kappa that breaks balance through a supercritical
pitchfork at kappa = 1. Near it the balanced state loses its restoring force, so fluctuations of
the imbalance grow slower (lag-1 autocorrelation up) and larger (variance up) before the
imbalance itself moves. Two indicators per layer, one observation per monitor step:

kappa_hat (`moeify.theory.estimate`): the feedback strength read from how fast the router
probabilities relax. Series: the layer's mean router probabilities (`prob_mean`, E per
observation: the mean-field state, free of the sampling noise of top-k counts). Window: the last
`kappa_window` (50) observations, growing from `kappa_start` (20), so the monitor speaks from its
20th observation on. kappa_hat = 1 - (1 - rho_hat) / `base_rate`, rho_hat the per-step AR(1)
coefficient of the imbalance, base_rate its relaxation rate per step without feedback (eta*gamma
of the model). A real model does not tell its base rate. The default, 1, says that without
feedback the imbalance keeps nothing from one step to the next (each step routes a fresh batch):
kappa_hat is then rho_hat, the fraction of the imbalance carried over per step, and kappa_hat = 1,
relaxation stopped, is the critical point whatever the base rate. Where the base rate is known
(the model's discrete rule: eta*gamma), pass it and kappa_hat estimates kappa itself. Reported
with the interval at `z` (1.645) standard deviations: kappa_low is a one-sided 95% lower bound.
Why not a base rate measured on the run: calibrating against a layer's first observations, or
its running mean rate, gave kappa_hat far below 0 (the first steps of training drift slowly:
rates 0.01-0.1 per step, later 0.3-1) and no ranking of deadlock onsets (AUC 0.40-0.48, below).

Legacy indicators, on x = cv of the layer's load shares (std / mean of the E shares of top-k
assignments, as in `expert_load`): over the last `window` (50) observations after `warmup` (50),
linearly detrended, variance (mean squared residual) and ac1 (sum r_t r_{t+1} / sum r_t²); baseline
= the first full window, taken once.

Event "imbalance_warning" when, for `patience` (5) consecutive observations, either
  kappa_low >= `kappa_threshold` (0.8)                                    (cause "kappa"), or
  variance >= `variance_ratio` (3) · max(baseline variance, `min_std`²) and
  ac1 >= baseline ac1 + `ac1_rise` (0.3)                                  (cause "indicators").
It can fire again after both have lapsed. Windows count observations: with `every_n_steps=N` an
observation is the mean over N optimizer steps, which kappa_hat accounts for. kappa_hat costs
~0.5 ms of host time per layer and observation at 8 experts, ~1.4 ms at 64 (pure Python);
`kappa_threshold` > 1 turns its warning off (kappa_hat <= 1).

Measured on the model's discrete rule (`simulate_windows`: 16 tokens per step, eta*gamma = 0.02
passed as base_rate, one observation per window of 50 steps; 100 seeds each):
  stationary at kappa 0.5, 400 observations: no warning in 100 of 100 runs. Closer to the
  threshold, a kappa warning in 7 / 19 / 46 of 50 runs at kappa 0.7 / 0.8 / 0.9.
  kappa ramped 0.5 -> 1.3 over 800 observations; the rule tips (|p_1 - 1/2| > 0.2) at kappa
  1.01-1.11 (median 1.07): a warning before the tip in 100 of 100 runs, the first at kappa 0.92
  (median); a kappa warning in 58 runs, at kappa 0.82-1.01 (10-90%, median 0.93). With
  kappa_threshold 0.9 the kappa warning came in 6 of 100 ramps (98 warned before the tip, mostly
  by the indicators): 50 observations rarely bound kappa above 0.9, so 0.8 is the default.
On a tiny converted Llama (6 layers, 8 experts, top-2, MLP routers, no balance / z / entropy loss;
AdamW at lr 0.1, or 0.03 with router temperature 0.5; 4 seeds each, 400 steps; `Deadlock` with
patience 20): 25 deadlock onsets, 4 of them within the first 20 steps, before kappa_hat exists.
Routing there is far from the model: the per-step relaxation rate swings between 0 and 1 from
batch to batch. kappa_hat over the 20 steps before an onset: median 0.43 (deciles 0.12-0.98),
elsewhere 0.33 (0.01-0.80): it ranks "onset within 20 steps" with AUC 0.61 (0.65 with a window of
100), weak. A warning preceded 1 of the 25 onsets; 2 of the 22 warnings outside a deadlock (9 by
kappa, 13 by the indicators) were followed by an onset within 50 steps. Treat the warning on a
real model as a hint, not a forecast.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from moeify.checks import in_range
from moeify.monitors.base import CardColumn, CardFigure, Event, LayerStats, Monitor, StepStats, event, register_monitor
from moeify.monitors.load import imbalance
from moeify.theory.estimate import MIN_OBSERVATIONS, detrend, kappa_from_rate, relaxation_rate


def indicators(xs: list[float]) -> tuple[float, float]:
    """(variance, lag-1 autocorrelation) of the linearly detrended series."""
    residuals = detrend(xs)
    n = len(xs)
    sum_sq = sum(r * r for r in residuals)
    ac1 = sum(a * b for a, b in zip(residuals, residuals[1:])) / sum_sq if sum_sq > 0 else 0.0
    return sum_sq / n, ac1


@dataclass
class _Layer:
    xs: deque[float]
    probs: deque[tuple[float, ...]]
    seen: int = 0
    baseline: tuple[float, float] | None = None
    count: int = 0  # consecutive observations meeting a condition
    warned: bool = False
    warnings: list[int] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)


class ImbalanceEarlyWarning(Monitor):
    name = "imbalance_early_warning"
    card_columns = (
        CardColumn("feedback kappa", "kappa", last_key="kappa", order=100),
        CardColumn("imbalance warnings", "warnings", format="count", order=110),
    )
    card_figures = (
        CardFigure("imbalance_warned_layers", path=("model", "layers_warned"), order=120),
        CardFigure("feedback_kappa_max", path=("model", "kappa_max"), order=130),
    )

    def __init__(
        self,
        *,
        window: int = 50,
        warmup: int = 50,
        variance_ratio: float = 3.0,
        ac1_rise: float = 0.3,
        patience: int = 5,
        min_std: float = 1e-3,
        kappa_window: int = 50,
        kappa_start: int = 20,
        kappa_threshold: float = 0.8,
        base_rate: float = 1.0,
        z: float = 1.645,
    ) -> None:
        in_range("window", window, ">= 3", unit="observations")
        in_range("warmup", warmup, ">= 0")
        in_range("patience", patience, ">= 1")
        in_range("variance_ratio", variance_ratio, "> 1")
        in_range("ac1_rise", ac1_rise, ">= 0")
        in_range("min_std", min_std, ">= 0")
        if not MIN_OBSERVATIONS <= kappa_start <= kappa_window:
            raise ValueError(
                f"need {MIN_OBSERVATIONS} <= kappa_start <= kappa_window, got {kappa_start} and {kappa_window}"
            )
        in_range("base_rate", base_rate, "(0, 1]", unit="per step")
        in_range("z", z, "[0, 3]")
        self.window, self.warmup, self.patience = window, warmup, patience
        self.variance_ratio, self.ac1_rise, self.min_std = variance_ratio, ac1_rise, min_std
        self.kappa_window, self.kappa_start, self.kappa_threshold = kappa_window, kappa_start, kappa_threshold
        self.base_rate, self.z = base_rate, z
        self._layers: dict[str, _Layer] = {}

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        for layer in stats.layers:
            if not layer.tokens:
                continue
            state = self._layers.setdefault(layer.name, self._new_layer())
            state.seen += 1
            state.last = {"imbalance": imbalance(layer.load_share)}
            legacy = self._legacy(state, state.last["imbalance"])
            kappa = self._kappa(state, layer.prob_mean, stats.steps_in_window)
            cause = "kappa" if kappa else "indicators" if legacy else None
            state.count = state.count + 1 if cause else 0
            if cause is None:
                state.warned = False
            elif not state.warned and state.count >= self.patience:
                state.warned = True
                events.append(self._event(stats.step, layer, state, cause))
                state.warnings.append(stats.step)
            metrics[layer.name] = dict(state.last)
        return metrics, events

    def _new_layer(self) -> _Layer:
        return _Layer(deque(maxlen=self.window), deque(maxlen=self.kappa_window))

    def _legacy(self, state: _Layer, x: float) -> bool:
        """Variance and ac1 of the load cv against their baseline; True when both have risen."""
        if state.seen <= self.warmup:
            return False
        state.xs.append(x)
        if len(state.xs) < self.window:
            return False
        variance, ac1 = indicators(list(state.xs))
        if state.baseline is None:
            state.baseline = (variance, ac1)
        base_var, base_ac1 = state.baseline
        ratio = variance / max(base_var, self.min_std**2)
        state.last.update(variance=variance, ac1=ac1, variance_ratio=ratio, ac1_rise=ac1 - base_ac1)
        return ratio >= self.variance_ratio and ac1 >= base_ac1 + self.ac1_rise

    def _kappa(self, state: _Layer, prob_mean: tuple[float, ...], steps: int) -> bool:
        """kappa_hat from the router probabilities' relaxation; True when its lower bound is past
        the threshold."""
        state.probs.append(tuple(prob_mean))
        if len(state.probs) < self.kappa_start:
            return False
        relax = relaxation_rate(list(state.probs), steps=steps, z=self.z)
        state.last.update(
            kappa=kappa_from_rate(relax.rate, self.base_rate),
            kappa_low=kappa_from_rate(relax.high, self.base_rate),
            kappa_high=kappa_from_rate(relax.low, self.base_rate),
            relaxation_rate=relax.rate,
        )
        return state.last["kappa_low"] >= self.kappa_threshold

    def _event(self, step: int, layer: LayerStats, state: _Layer, cause: str) -> Event:
        last = state.last
        if cause == "kappa":
            detail = (
                f"layer {layer.depth} ({layer.name}): feedback strength kappa_hat {last['kappa']:.2f} "
                f"(lower bound {last['kappa_low']:.2f} >= {self.kappa_threshold}) over {len(state.probs)} "
                f"observations: the router probabilities relax ever slower, as near the pitchfork at kappa = 1; "
                f"routing may be near a tipping point to imbalance"
            )
            extra = {"kappa": last["kappa"], "kappa_low": last["kappa_low"]}
        else:
            detail = (
                f"layer {layer.depth} ({layer.name}): load-imbalance variance x{last['variance_ratio']:.1f} "
                f"and lag-1 autocorrelation {state.baseline[1]:.2f} -> {last['ac1']:.2f} over {self.window} "
                f"observations: routing may be near a tipping point to imbalance"
            )
            extra = {"variance": last["variance"], "ac1": last["ac1"]}
        return event(step, self.name, layer.name, "imbalance_warning", detail, cause=cause, **extra)

    def summary(self) -> dict[str, Any]:
        layers = {
            name: {
                **s.last,
                "baseline_variance": s.baseline[0] if s.baseline else None,
                "baseline_ac1": s.baseline[1] if s.baseline else None,
                "warning": s.warned,
                "warnings": list(s.warnings),
            }
            for name, s in self._layers.items()
        }
        kappas = [s.last["kappa"] for s in self._layers.values() if "kappa" in s.last]
        model = {
            "layers_warned": sum(1 for s in self._layers.values() if s.warnings),
            "kappa_max": max(kappas) if kappas else None,
        }
        return {"model": model, "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        return {
            name: {
                "xs": list(s.xs),
                "probs": [list(p) for p in s.probs],
                "seen": s.seen,
                "baseline": list(s.baseline) if s.baseline is not None else None,
                "count": s.count,
                "warned": s.warned,
                "warnings": list(s.warnings),
                "last": dict(s.last),
            }
            for name, s in self._layers.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._layers = {
            name: _Layer(
                # This run's windows: shorter ones keep the latest observations.
                deque(s["xs"], maxlen=self.window),
                deque((tuple(p) for p in s.get("probs", [])), maxlen=self.kappa_window),
                seen=s["seen"],
                baseline=tuple(s["baseline"]) if s["baseline"] is not None else None,
                count=s["count"],
                warned=s["warned"],
                warnings=list(s["warnings"]),
                last=dict(s["last"]),
            )
            for name, s in state.items()
        }


register_monitor("imbalance_early_warning", ImbalanceEarlyWarning, default=True)
