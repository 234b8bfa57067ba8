"""Reproduce the routing phenomena of the papers behind moeify at small scale, on CPU.

    python studies/routing/run.py                      # the study: results/*.json, *.png, RESULTS.md
    python studies/routing/run.py --quick              # the CI smoke run of the same code (~1 min, into /tmp)
    python studies/routing/run.py --only bf16          # one experiment; RESULTS.md is rebuilt from every JSON

Each experiment is a function `(Context) -> dict`; its runs are dict jobs that `Context.map`
hands to a pool of worker processes (one thread each: these models are too small for intra-op
threads to pay). Experiments run side by side so that the workers never wait on one experiment's
last run, and a run two experiments ask for (the same job) is trained once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import exp_bf16  # noqa: E402 - the study's modules sit beside this script
import exp_deadlock  # noqa: E402
import exp_ecology  # noqa: E402
import exp_maturity  # noqa: E402
import exp_pitchfork  # noqa: E402
import exp_remedies  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

# Heaviest first: the pool takes jobs in the order the experiments submit them.
EXPERIMENTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "revival": exp_ecology.revival,  # a few long runs (prefix + four branches): first, so they do not trail
    "deadlock": exp_deadlock.deadlock,
    "ecology": exp_ecology.ecology,
    "maturity": exp_maturity.maturity,
    "bf16": exp_bf16.bf16,
    "pitchfork": exp_pitchfork.pitchfork,
    "remedies": exp_remedies.remedies,
}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _timed(fn: Callable[[dict], dict], job: dict) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(job)
    return {**result, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


class Context:
    """What an experiment gets: the scale, and `map` to run jobs on the shared pool."""

    def __init__(self, scale: harness.Scale, pool: ProcessPoolExecutor) -> None:
        self.scale, self.pool = scale, pool
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.done = 0
        self.cpu_s = 0.0  # summed over finished jobs

    def map(self, fn: Callable[[dict], dict], jobs: list[dict], label: str) -> list[dict]:
        """`fn(job)` for every job, in a worker; identical (fn, job) pairs run once."""
        futures = []
        with self._lock:
            for job in jobs:
                key = f"{fn.__module__}.{fn.__name__}:{json.dumps(job, sort_keys=True)}"
                if key not in self._futures:
                    self._futures[key] = self.pool.submit(_timed, fn, job)
                    self._futures[key].add_done_callback(lambda f, k=key, lab=label: self._log(f, k, lab))
                futures.append(self._futures[key])
        return [f.result() for f in futures]

    def _log(self, future: Future, key: str, label: str) -> None:
        with self._lock:
            self.done += 1
            total = len(self._futures)
        if future.exception() is None:
            result = future.result()
            with self._lock:
                self.cpu_s += result["cpu_s"]
            print(f"  [{label}] run {self.done}/{total} done in {result['wall_s']:.1f} s", file=sys.stderr, flush=True)


def dump(value: Any) -> str:
    """JSON with one key per line but every list of numbers on one line (a run's series would
    otherwise take a line per number)."""
    text = json.dumps(value, indent=1, sort_keys=True)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run of every experiment")
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append", help="run these experiments only")
    parser.add_argument(
        "--out",
        type=Path,
        help="writes OUT/results/*.json|png and OUT/RESULTS.md (default: beside this script; --quick: a temporary "
        "directory, so that a smoke run never replaces the study's results)",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    scale = harness.SCALES["quick" if args.quick else "full"]
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "moeify-routing-quick" if args.quick else HERE
    names = args.only or list(EXPERIMENTS)
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    print(f"routing study ({scale.name}): {', '.join(names)} on {args.workers} worker(s)", file=sys.stderr)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can hang
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker) as pool:
        ctx = Context(scale, pool)
        dense = ctx.map(harness.pretrain_job, [{"scale": scale.name, "seed": s} for s in scale.seeds], "pretrain")
        with ThreadPoolExecutor(len(names)) as threads:
            futures = {name: threads.submit(EXPERIMENTS[name], ctx) for name in names}
            outputs = {name: future.result() for name, future in futures.items()}
    wall = time.perf_counter() - start
    for name, output in outputs.items():
        output.update(experiment=name, scale=scale.name, seeds=list(scale.seeds))
        (results_dir / f"{name}.json").write_text(dump(output))
    if set(names) == set(EXPERIMENTS):  # the page reports the timing of a whole study only
        timing = {
            "scale": scale.name,
            "workers": args.workers,
            "wall_s": wall,
            "cpu_s": ctx.cpu_s,
            "dense_loss": {str(seed): d["last_tenth_mean"] for seed, d in zip(scale.seeds, dense)},
        }
        (results_dir / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    page = report.write(args.out)
    print(f"routing study done in {wall:.0f} s: {page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
