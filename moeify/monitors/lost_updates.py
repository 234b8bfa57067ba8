"""Lost updates: the share of the optimizer's intended updates that rounding threw away.

Reads a `moeify.precision.LostUpdateCounter` (sampled elements, counted on the device by
optimizer step hooks; see its module for the definitions) once per observation. Not a default
monitor: it needs the optimizer —

    runner = attach_monitors(model, ["expert_load", LostUpdates(optimizer, model=model)])
    runner.attach_optimizer(optimizer)

Metrics per window: under "model" `lost_fraction` (lost / intended over every tracked
parameter), `intended` and `lost` (sampled counts); under "param_group_<g>" the same per param
group. Event "updates_lost" when `lost_fraction` rises above `threshold` (0.5), again only after
it fell back below: weights stored in bf16 are absorbing their updates (remedy: `guard_bf16`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeify.checks import in_range
from moeify.monitors.base import CardFigure, Event, Monitor, StepStats, event, register_monitor
from moeify.precision.counter import LostUpdateCounter


class LostUpdates(Monitor):
    name = "lost_updates"
    card_figures = (CardFigure("lost_update_fraction", path=("model", "lost_fraction"), order=140),)

    def __init__(
        self,
        source: LostUpdateCounter | torch.optim.Optimizer | None = None,
        *,
        threshold: float = 0.5,
        model: nn.Module | None = None,
        sample_size: int = 1024,
        seed: int = 0,
    ) -> None:
        if source is None:
            raise ValueError(
                "the lost_updates monitor needs the optimizer: "
                "attach_monitors(model, [..., LostUpdates(optimizer, model=model)])"
            )
        in_range("threshold", threshold, "[0, 1]")
        self.counter = (
            source
            if isinstance(source, LostUpdateCounter)
            else LostUpdateCounter(source, sample_size=sample_size, seed=seed, model=model)
        )
        self.threshold = threshold
        self._flagged = False
        self._totals = [0, 0]  # intended, lost over the whole run
        self._last: dict[str, dict[str, float]] = {}

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        reading = self.counter.read()
        fraction = reading.fraction
        metrics = {
            "model": {"lost_fraction": fraction, "intended": float(reading.intended), "lost": float(reading.lost)}
        }
        for group, (intended, lost, group_fraction) in reading.by_group().items():
            metrics[f"param_group_{group}"] = {
                "lost_fraction": group_fraction,
                "intended": float(intended),
                "lost": float(lost),
            }
        self._totals[0] += reading.intended
        self._totals[1] += reading.lost
        self._last = metrics
        events = []
        above = reading.intended > 0 and fraction > self.threshold
        if above and not self._flagged:
            groups = ", ".join(f"group {g} {f:.0%}" for g, (_, _, f) in reading.by_group().items())
            detail = (
                f"{fraction:.1%} of the sampled intended updates were lost over the last {reading.steps} step(s) "
                f"({groups}): weights stored in bf16 round away updates below half their spacing. "
                "Use optimizer = moeify.guard_bf16(model, optimizer)"
            )
            events.append(event(stats.step, self.name, None, "updates_lost", detail, lost_fraction=fraction))
        self._flagged = above if reading.intended else self._flagged
        return metrics, events

    def summary(self) -> dict[str, Any]:
        intended, lost = self._totals
        model = {"lost_fraction": lost / intended if intended else 0.0, "intended": intended, "lost": lost}
        return {"model": model, "last": self._last, "flagged": self._flagged}

    def state_dict(self) -> dict[str, Any]:
        # The counter's device counts hold one window and are reset by each observation; its
        # sampled indices come from its seed, so the resumed run draws the same ones.
        return {
            "flagged": self._flagged,
            "totals": list(self._totals),
            "last": {name: dict(m) for name, m in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._flagged = state["flagged"]
        self._totals = list(state["totals"])
        self._last = {name: dict(m) for name, m in state["last"].items()}


register_monitor("lost_updates", LostUpdates, default=False)
