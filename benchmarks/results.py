"""One result row (a ratio of two timed contenders, or a conversion measurement) and the table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from timing import Timings, cpu_description, loadavg


@dataclass
class Row:
    section: str  # "limit" | "transformers" | "skewed" | "decode" | "conversion"
    shape: str  # "llm" | "dit" | ...
    mode: str  # "fwd" | "fwd+bwd" | "convert" | "peak memory"
    candidate: str
    baseline: str
    ratio: float  # median over rounds of candidate / baseline
    ratio_q1: float
    ratio_q3: float
    candidate_ms: float | None = None
    baseline_ms: float | None = None
    target: float | None = None  # met when ratio <= target
    note: str = ""
    min_ratio: float | None = None  # fastest round ÷ fastest round (robust to preemption)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


def ratio_rows(
    timings: Timings,
    *,
    section: str,
    shape: str,
    mode: str,
    candidate: str,
    baselines: list[str],
    targets: dict[str, float] | None = None,
    note: str = "",
) -> list[Row]:
    """One row per baseline: candidate ÷ baseline, paired round by round."""
    rows = []
    for baseline in baselines:
        q1, median, q3 = timings.ratio(candidate, baseline)
        rows.append(
            Row(
                section,
                shape,
                mode,
                candidate,
                baseline,
                median,
                q1,
                q3,
                timings.median_ms(candidate),
                timings.median_ms(baseline),
                (targets or {}).get(baseline),
                note,
                timings.min_ratio(candidate, baseline),
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table: ratio (with its interquartile range), target, absolute medians."""
    header = (
        "section",
        "shape",
        "mode",
        "candidate ÷ baseline",
        "ratio",
        "IQR",
        "min÷min",
        "target",
        "ms (cand / base)",
    )
    lines = []
    for row in rows:
        target = "" if row.target is None else f"≤{row.target:g} {'ok' if row.met else 'MISSED'}"
        ms = "" if row.candidate_ms is None else f"{row.candidate_ms:.1f} / {row.baseline_ms:.1f}"
        lines.append(
            (
                row.section,
                row.shape,
                row.mode,
                f"{row.candidate} ÷ {row.baseline}",
                f"{row.ratio:.3f}",
                f"{row.ratio_q1:.2f}–{row.ratio_q3:.2f}",
                "" if row.min_ratio is None else f"{row.min_ratio:.3f}",
                target,
                ms,
            )
        )
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def start(child_job: str | None, child: Callable[[dict], dict]) -> tuple[torch.device, float, str] | None:
    """The start of a standalone benchmark: with `--child JOB`, run that job and print its JSON
    (None: the process is done); else (device, start time, a description of the machine)."""
    if child_job:
        print(json.dumps(child(json.loads(child_job))))
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu (no GPU): {cpu_description()}"
    return device, time.perf_counter(), machine


def finish(
    verdicts: list[dict], rows: list[Row], details: object, machine: str, started: float, output: Path | None
) -> None:
    """The end of a standalone benchmark: print each verdict, write rows and details as JSON when
    asked, print the elapsed time."""
    for v in verdicts:
        print(f"{'MET ' if v['met'] else 'MISSED'}  {v['question']}: {v['worst_ratio']} ({v['where']})")
    if output:
        result = {
            "machine": {"device": machine, "torch": torch.__version__, "loadavg_after": loadavg()},
            "summary": verdicts,
        }
        result |= {
            "seconds": round(time.perf_counter() - started),
            "rows": [r.as_dict() for r in rows],
            "details": details,
        }
        output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.0f} s")
