"""One rule for numeric arguments: `in_range(name, value, "(0, 1]")` refuses a value outside the
interval, NaN included, with the message every constructor shares ("tau must be in (0, 1], got 0").
Imports nothing from moeify, so every layer may use it."""

from __future__ import annotations

import re

# "[0, 1]", "(0, 1]", "[0, 1)", "(0, 1)" or ">= 1", "> 0"
_INTERVAL = re.compile(r"^(?:([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])|(>=|>)\s*(\S+))$")


def in_range(name: str, value: float, interval: str, *, unit: str = "") -> None:
    """ValueError("<name> must be in <interval> [<unit>], got <value>") unless `value` lies in
    `interval`. Comparisons are written so that NaN fails every one of them."""
    match = _INTERVAL.match(interval)
    if match is None:
        raise ValueError(f"interval must look like '[0, 1]', '(0, 1]' or '>= 1', got {interval!r}")
    opening, low, high, closing, operator, bound = match.groups()
    if operator is not None:
        ok = value >= float(bound) if operator == ">=" else value > float(bound)
        wanted = interval
    else:
        above = value >= float(low) if opening == "[" else value > float(low)
        below = value <= float(high) if closing == "]" else value < float(high)
        ok, wanted = above and below, f"in {interval}"
    if not ok:
        raise ValueError(f"{name} must be {wanted}{' ' + unit if unit else ''}, got {value}")
