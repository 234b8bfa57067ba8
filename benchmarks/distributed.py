"""Expert parallelism against FSDP2 and replicated experts: a full training step of one converted
Llama on 2 gloo CPU processes (one thread each), the three modes interleaved in the same
processes (benchmarks/distributed_worker.py), with each rank's stored bytes.

    python benchmarks/distributed.py                      # full: writes benchmarks/distributed_results.json
    python benchmarks/distributed.py --quick --output F   # smoke: tiny model, 2 rounds
    python benchmarks/distributed.py --table [F]          # the markdown table of a results file

Gloo over loopback on two CPU processes is not a GPU interconnect: read benchmarks/README.md
("Distributed") before reading the step times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import cpu_description, loadavg  # noqa: E402

WORKER = HERE / "distributed_worker.py"
DEFAULT_OUTPUT = HERE / "distributed_results.json"
RANKS = 2
TIMEOUT_S = 900
LABELS = {
    "replicated": "replicated (DDP)",
    "fsdp2": "FSDP2 (`fully_shard`)",
    "expert_parallel": "expert parallel + DDP",
}


def launch(spec: str, rounds: int | None, raw: Path) -> None:
    """torchrun the worker on RANKS local gloo processes; its whole output only if it fails."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
        str(WORKER), "--spec", spec, "--output", str(raw), *(["--rounds", str(rounds)] if rounds else []),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-8000:]}")


def measure(quick: bool, rounds: int | None) -> dict:
    import torch
    import transformers

    started, load_before = time.perf_counter(), loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "rank0.json"
        launch("quick" if quick else "full", rounds, raw)
        result = json.loads(raw.read_text())
    return {
        "benchmark": "training step (forward + backward + AdamW), 2 gloo CPU processes: "
        "replicated (DDP) vs FSDP2 vs expert parallelism (+ DDP)",
        "mode": "quick" if quick else "full",
        "machine": {
            "cpu": cpu_description(),
            "device": "cpu, gloo over loopback (no GPU)",
            "dtype": "float32",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        **result,
    }


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def table(result: dict) -> str:
    """The markdown table (and its footnote lines) of a results file."""
    spec, modes = result["spec"], result["modes"]
    lines = [
        "| mode | step (median) | ÷ replicated (median, IQR) | min÷min | expert params / rank "
        "| experts: params + grads + AdamW / rank | all params / rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in modes.items():
        mem, ratio = row["memory_per_rank"], row["ratio_to_replicated"]
        ranks = {json.dumps(m, sort_keys=True) for m in mem}  # every rank holds the same bytes here
        per_rank = mem[0] if len(ranks) == 1 else {k: max(m[k] for m in mem) for k in mem[0]}
        share = per_rank["expert_param_bytes"] / per_rank["expert_param_bytes_full"]
        lines.append(
            f"| {LABELS.get(mode, mode)} | {row['step_ms_median']:.0f} ms "
            f"| {ratio['median']:.3f} ({ratio['q1']:.3f}–{ratio['q3']:.3f}) | {row['min_ratio_to_replicated']:.3f} "
            f"| {mib(per_rank['expert_param_bytes'])} ({share:g} × all) | {mib(per_rank['expert_state_bytes'])} "
            f"| {mib(per_rank['model_param_bytes'])} of {mib(per_rank['model_param_bytes_full'])} |"
        )
    lines += [
        "",
        "| mode | forward + losses | backward | AdamW step | exchange, in the forward |",
        "|---|---|---|---|---|",
    ]
    for mode, row in modes.items():
        phase = row["phases"]
        exchange = f"{phase['exchange_forward_ms']:.0f} ms" if "exchange_forward_ms" in phase else "–"
        lines.append(
            f"| {LABELS.get(mode, mode)} | {phase['forward_ms']:.0f} ms | {phase['backward_ms']:.0f} ms "
            f"| {phase['optimizer_ms']:.0f} ms | {exchange} |"
        )
    first = result["first_step"]["max_relative_difference"]
    load = result["machine"]
    lines += [
        "",
        f"Model: Llama, hidden {spec['hidden']}, intermediate {spec['intermediate']}, {spec['layers']} layers, "
        f"vocab {spec['vocab']}, {spec['experts']} experts top-{spec['top_k']}, no shared expert (experts "
        f"{result['expert_share_of_params']:.1%} of the parameters); {spec['batch']} × {spec['seq']} tokens per "
        f"rank, fp32, {result['world_size']} ranks × {result['threads_per_rank']} thread; {spec['rounds']} "
        f"interleaved rounds after 1 warm-up; step time = the slower rank's (a barrier ends each step); phases: "
        f"median of {spec['phase_steps']} more steps with a barrier after each phase (the slower rank's); "
        f"load {load['loadavg_before'][0]:.2f} before, {load['loadavg_after'][0]:.2f} after; {result['seconds']:.0f} s.",
        f"First step, largest relative difference to replicated over the ranks: task loss "
        f"{first['fsdp2']['task']:.1e} (FSDP2), {first['expert_parallel']['task']:.1e} (expert parallel); "
        f"total loss {first['fsdp2']['total']:.1e} (FSDP2), {first['expert_parallel']['total']:.1e} (expert "
        f"parallel: its balance loss is the global batch's, by design; router losses differ by "
        f"{first['expert_parallel']['aux']:.1e}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny model, 2 rounds (needs --output)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default: full 12, quick 2)")
    parser.add_argument("--output", type=Path, help=f"results JSON (default, full mode only: {DEFAULT_OUTPUT})")
    parser.add_argument(
        "--table", nargs="?", const=DEFAULT_OUTPUT, type=Path, metavar="FILE",
        help="print the markdown table of a results file and exit (default: the committed one)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.quick and args.output is None:
        parser.error("--quick needs --output: the smoke run must not overwrite the committed results")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    output = args.output or DEFAULT_OUTPUT
    result = measure(args.quick, args.rounds)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
