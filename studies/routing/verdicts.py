"""What every results section shares: number formatting and the verdict vocabulary. A verdict is
computed from the numbers by a rule that the evidence cell states."""

from __future__ import annotations

from typing import Any

Rows = list[tuple[str, str, str, str]]  # claim, source, verdict, evidence
VERDICTS = ("reproduces", "partly", "does not reproduce", "not testable here")


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e4):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def per_seed(values: list[Any], digits: int = 2) -> str:
    """Per-seed values as 'a / b / c'."""
    return " / ".join(fmt(v, digits) for v in values)


def graded(hits: int, total: int) -> str:
    """All of them: reproduces; some: partly; none: does not reproduce."""
    return "reproduces" if hits == total and total else "partly" if hits else "does not reproduce"
