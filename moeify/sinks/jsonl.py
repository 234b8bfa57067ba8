"""Run-directory sink: `history.jsonl` (one record per observation), `events.jsonl`, and
`summary.json` on close. This directory is what `moeify card RUN_DIR` and the Hub card read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moeify.atomic import write_text

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
            self._history = _append(self.directory / HISTORY)
            self._events = _append(self.directory / EVENTS)

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
        write_text(self.directory / SUMMARY, json.dumps(_clean(summary), indent=2))


def _append(path: Path) -> Any:
    """`path` opened for appending lines, after cutting a partial last line (a run killed while
    writing it), which the next line would otherwise continue."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def read_run(directory: str | Path) -> dict[str, Any]:
    """Read a run directory back: {"history": [...], "events": [...], "summary": {...}}."""
    directory = Path(directory)
    if not (directory / HISTORY).exists():
        raise FileNotFoundError(
            f"{directory} is not a moeify run directory (no {HISTORY}): pass the directory "
            "given to JsonlSink(...) in the training run"
        )

    def lines(name: str) -> list[dict[str, Any]]:
        path = directory / name
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
        rows = text.splitlines()
        if rows and not text.endswith("\n"):
            rows = rows[:-1]  # a line the run was killed while writing
        records = []
        for number, line in enumerate(rows, start=1):
            try:
                records.append(json.loads(line)) if line else None
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not a JSON record ({error}); the run file is damaged"
                ) from None
        return records

    summary_path = directory / SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    return {"history": lines(HISTORY), "events": lines(EVENTS), "summary": summary}
