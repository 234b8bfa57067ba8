"""Interleaved timing: every contender runs once per round, in a rotating order, so machine drift
(other processes, thermal, page cache) hits all of them alike. Ratios are taken inside each round
and the median over rounds is reported, with the spread (interquartile range) next to it."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def loadavg() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (0s where /proc is missing)."""
    try:
        with open("/proc/loadavg") as f:
            one, five, fifteen = f.read().split()[:3]
        return float(one), float(five), float(fifteen)
    except OSError:
        return 0.0, 0.0, 0.0


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); all three are the value itself for one sample."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Timings:
    """Seconds per call of each contender, one entry per round, rounds aligned across contenders."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.seconds[name])

    def min_ratio(self, candidate: str, baseline: str) -> float:
        """Fastest round ÷ fastest round: a second estimate that preemption on a loaded machine
        (which only ever adds time) disturbs less than the median."""
        return min(self.seconds[candidate]) / min(self.seconds[baseline])

    def ratio(self, candidate: str, baseline: str) -> tuple[float, float, float]:
        """(q1, median, q3) over rounds of candidate time / baseline time of the same round."""
        pairs = zip(self.seconds[candidate], self.seconds[baseline])
        return quartiles([c / b for c, b in pairs])


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> Timings:
    """Time each zero-argument callable `repeats` times after `warmup` untimed rounds.

    Round r runs the contenders rotated by r, so none is always first (first after a pause pays
    for cold caches) or always right after the most expensive one.
    """
    sync = sync or (lambda: None)
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync()
    timings = Timings({name: [] for name in names})
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            sync()
            timings.seconds[name].append(time.perf_counter() - start)
    return timings


def interleaved_with_setup(
    cases: dict[str, tuple[Callable[[], object], Callable[[object], object]]], *, repeats: int, warmup: int = 1
) -> Timings:
    """Like `interleaved`, for work that needs fresh state: each case is (setup, run); only
    `run(setup())` is timed, and its result is kept alive until the clock has stopped (freeing
    hundreds of MB is not part of the work measured)."""
    names = list(cases)
    timings = Timings({name: [] for name in names})
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            setup, run = cases[name]
            state = setup()
            start = time.perf_counter()
            result = run(state)
            elapsed = time.perf_counter() - start
            del state, result
            gc.collect()
            if r >= warmup:
                timings.seconds[name].append(elapsed)
    return timings


def cpu_description() -> str:
    """The CPU model and the cores this process may use, for the results file."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available"
