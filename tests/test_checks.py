"""moeify.checks.in_range: the one rule for numeric constructor arguments, and the monitors that use it."""

from __future__ import annotations

import math
import re

import pytest

from moeify.checks import in_range
from moeify.monitors.dead import DeadExperts
from moeify.monitors.deadlock import Deadlock
from moeify.monitors.early_warning import ImbalanceEarlyWarning
from moeify.monitors.ecology import Ecology
from moeify.monitors.entropy import RouterEntropy
from moeify.monitors.homogenization import ExpertHomogenization
from moeify.monitors.maturity import SharedMaturity
from moeify.monitors.runner import MonitorRunner


@pytest.mark.parametrize(
    ("interval", "inside", "outside"),
    [
        ("[0, 1]", [0.0, 0.5, 1.0], [-1e-9, 1.0 + 1e-9]),
        ("(0, 1]", [1e-9, 1.0], [0.0, 1.1]),
        ("[0, 1)", [0.0, 0.999], [1.0, -0.1]),
        ("(0, 1)", [0.5], [0.0, 1.0]),
        (">= 1", [1, 7], [0, 0.999]),
        ("> 0", [1e-12, 3.0], [0.0, -2.0]),
        ("[0, 3]", [3], [3.0001]),
    ],
)
def test_in_range(interval: str, inside: list[float], outside: list[float]) -> None:
    for value in inside:
        in_range("x", value, interval)
    for value in [*outside, math.nan]:
        wanted = interval if interval[0] in "<>" else f"in {interval}"
        with pytest.raises(ValueError, match=rf"^x must be {re.escape(wanted)}, got {re.escape(str(value))}$"):
            in_range("x", value, interval)


def test_unit_and_bad_interval() -> None:
    with pytest.raises(ValueError, match=r"^patience must be >= 1 step, got 0$"):
        in_range("patience", 0, ">= 1", unit="step")
    with pytest.raises(ValueError, match="interval must look like"):
        in_range("x", 1, "0..1")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DeadExperts(dead_after=0), "dead_after must be >= 1 step, got 0"),
        (lambda: Deadlock(tau=0.0), r"tau must be in \(0, 1\], got 0.0"),
        (lambda: Deadlock(prob_tau=1.5), r"prob_tau must be in \[0, 1\], got 1.5"),
        (lambda: Deadlock(interval_confidence=1.0), r"interval_confidence must be in \(0, 1\), got 1.0"),
        (lambda: ImbalanceEarlyWarning(window=2), "window must be >= 3 observations, got 2"),
        (lambda: ImbalanceEarlyWarning(variance_ratio=1.0), "variance_ratio must be > 1, got 1.0"),
        (lambda: ImbalanceEarlyWarning(z=4.0), r"z must be in \[0, 3\], got 4.0"),
        (lambda: Ecology(threshold=math.nan), "threshold must be > 0, got nan"),
        (lambda: RouterEntropy(hard_patience=0), "hard_patience must be >= 1 step, got 0"),
        (lambda: RouterEntropy(min_shift=2.0), r"min_shift must be in \[0, 1\], got 2.0"),
        (lambda: ExpertHomogenization(sample_size=0), "sample_size must be >= 1, got 0"),
        (lambda: SharedMaturity(mature_ratio=0.0), "mature_ratio must be > 0, got 0.0"),
        (lambda: MonitorRunner(None, [], every_n_steps=0), "every_n_steps must be >= 1, got 0"),
    ],
)
def test_monitor_arguments_are_refused_by_name(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
