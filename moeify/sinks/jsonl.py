"""Run-directory sink: `history.jsonl` (one record per observation), `events.jsonl`, and
`summary.json` on close. This directory is what `moeify card RUN_DIR` and the Hub card read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HISTORY, EVENTS, SUMMARY = "history.jsonl", "events.jsonl", "summary.json"


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlSink:
    def __init__(self, directory: str | Path, *, main_process_only: bool = True) -> None:
        self.directory = Path(directory)
        self.enabled = not main_process_only or _is_main_process()
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._history = (self.directory / HISTORY).open("a", encoding="utf-8")
            self._events = (self.directory / EVENTS).open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._history.write(json.dumps(_clean(record)) + "\n")
        for ev in record.get("events", []):
            self._events.write(json.dumps(_clean(ev)) + "\n")
        self._history.flush()
        self._events.flush()

    def close(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._history.close()
        self._events.close()
        (self.directory / SUMMARY).write_text(json.dumps(_clean(summary), indent=2), encoding="utf-8")


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def read_run(directory: str | Path) -> dict[str, Any]:
    """Read a run directory back: {"history": [...], "events": [...], "summary": {...}}."""
    directory = Path(directory)
    if not (directory / HISTORY).exists():
        raise FileNotFoundError(f"{directory} is not a moeify run directory (no {HISTORY})")

    def lines(name: str) -> list[dict[str, Any]]:
        path = directory / name
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []

    summary_path = directory / SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    return {"history": lines(HISTORY), "events": lines(EVENTS), "summary": summary}
