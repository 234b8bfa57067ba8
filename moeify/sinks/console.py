"""Console sink: a compact per-layer table every `every` records, and every event as it happens."""

from __future__ import annotations

import sys
from typing import Any, TextIO

# (monitor, metric, column title, format) shown when present.
DEFAULT_COLUMNS = (
    ("expert_load", "cv", "load cv", "{:.2f}"),
    ("expert_load", "max_mean", "max/mean", "{:.2f}"),
    ("router_entropy", "entropy", "entropy", "{:.2f}"),
    ("router_entropy", "margin", "margin", "{:.3f}"),
    ("dead_experts", "dead", "dead", "{:.0f}"),
    ("shared_maturity", "ratio", "shared/routed", "{:.3f}"),
)


class ConsoleSink:
    def __init__(self, every: int = 1, stream: TextIO | None = None, columns=DEFAULT_COLUMNS) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.stream, self.columns = every, stream or sys.stdout, tuple(columns)
        self._records = 0

    def _print(self, line: str) -> None:
        print(line, file=self.stream)

    def write(self, record: dict[str, Any]) -> None:
        for ev in record.get("events", []):
            self._print(
                f"[moeify step {ev['step']}] {ev['monitor']}: {ev['layer'] or 'model'} {ev['kind']} - {ev['detail']}"
            )
        self._records += 1
        if self._records % self.every:
            return
        monitors = record.get("monitors", {})
        columns = [c for c in self.columns if c[0] in monitors]
        layers = sorted({name for m, *_ in columns for name in monitors[m] if name != "model"})
        if not columns or not layers:
            return
        width = max(len(name) for name in layers)
        self._print(
            f"step {record['step']}".ljust(width) + "  " + "  ".join(title.rjust(9) for _, _, title, _ in columns)
        )
        for name in layers:
            cells = []
            for monitor, metric, _, fmt in columns:
                value = monitors[monitor].get(name, {}).get(metric)
                cells.append((fmt.format(value) if value is not None else "-").rjust(9))
            self._print(name.ljust(width) + "  " + "  ".join(cells))

    def close(self, summary: dict[str, Any]) -> None:
        self._print(
            f"[moeify] monitoring closed after {summary.get('steps', 0)} steps, {summary.get('events', 0)} events"
        )
