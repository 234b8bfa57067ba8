"""`Schedule`: a routing setting's value as a function of the optimizer step, kept as data (so it
is saved with the model and the accelerate checkpoint and compared on load, unlike a lambda)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INTERPOLATIONS = ("linear", "step")


@dataclass(frozen=True)
class Schedule:
    """A value per optimizer step through `points`, ((step, value), ...) with increasing steps:
    "linear" interpolates between neighbouring points, "step" holds each point's value until the
    next one. Before the first point the first value holds, after the last the last.

        Schedule.linear(0.1, 0.01, steps=1000)           # 0.1 at step 0 down to 0.01 at step 1000
        Schedule.warmup(0.01, steps=200)                  # 0 up to 0.01 over the first 200 steps
        Schedule(((0, 0.0), (500, 0.01)), "step")          # 0 until step 500, then 0.01

    Step n is the value after n optimizer steps (step 0: before the first)."""

    points: tuple[tuple[int, float], ...]
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.points, (list, tuple)) or not self.points:
            raise ValueError(f"Schedule points must be a non-empty list of (step, value) pairs, got {self.points!r}")
        points = []
        for point in self.points:
            ok = isinstance(point, (list, tuple)) and len(point) == 2
            step, value = point if ok else (None, None)
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                raise ValueError(f"Schedule points are (step, value) with an int step >= 0, got {point!r}")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"Schedule values must be finite numbers, got {point!r}")
            points.append((step, float(value)))
        steps = [step for step, _ in points]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"Schedule steps must increase strictly, got {steps}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Schedule interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        object.__setattr__(self, "points", tuple(points))

    @classmethod
    def linear(cls, start: float, end: float, *, steps: int, begin: int = 0) -> Schedule:
        """`start` until step `begin`, then linearly to `end` at step `begin + steps`, then `end`."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"Schedule.linear needs steps >= 1, got {steps!r}")
        return cls(((begin, start), (begin + steps, end)))

    @classmethod
    def warmup(cls, value: float, *, steps: int) -> Schedule:
        """0 at step 0, linearly up to `value` at step `steps`, then `value`."""
        return cls.linear(0.0, value, steps=steps)

    def __call__(self, step: int) -> float:
        points = self.points
        if step <= points[0][0]:
            return points[0][1]
        for (s0, v0), (s1, v1) in zip(points, points[1:]):
            if step < s1:
                if self.interpolation == "step":
                    return v0
                return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return points[-1][1]

    def values(self) -> tuple[float, ...]:
        """Every value the schedule can take at a point (the extremes of a piecewise-linear one)."""
        return tuple(value for _, value in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        if not isinstance(data, dict) or set(data) - {"points", "interpolation"} or "points" not in data:
            raise ValueError(f"not a Schedule (expected keys 'points', 'interpolation'): {data!r}")
        return cls(tuple(tuple(p) for p in data["points"]), data.get("interpolation", "linear"))
