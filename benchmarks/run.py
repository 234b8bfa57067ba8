"""moeify benchmarks: ratios against the dense top-k limit and against transformers, one process.

    python benchmarks/run.py            # full mode (4096 tokens, 5 rounds): ~15 min on 2 cores
    python benchmarks/run.py --quick    # smoke mode (256 tokens, 2 rounds, 1-layer conversion)

Prints a table and writes benchmarks/results.json (see benchmarks/README.md for every row).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, whatever the cwd

import compile_bench
import conversion_bench
import generate_bench
import model_bench
import paths_bench
import transformers
from layer_bench import Settings, layer_suite
from models import dit_shape, llm_shape
from results import Row, format_table
from timing import cpu_description, loadavg

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke mode: small batches, few rounds")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement (default 5, quick 2)")
    parser.add_argument("--tokens", type=int, help="tokens per batch (default 4096, quick 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--only", choices=("layers", "paths", "compile", "conversion", "model", "generate"), help="run one part"
    )
    parser.add_argument(
        "--model-shape",
        choices=("quick", "full"),
        help="whole-model sections: the quick or full presets of model_bench.py and generate_bench.py "
        "(default: quick on CPU, full on CUDA)",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results.json", help="where to write the JSON")
    return parser.parse_args(argv)


def summary(rows: list[Row]) -> list[dict]:
    """The stated targets, each answered from the rows."""
    verdicts = []

    def add(question: str, picked: list[Row], target: float) -> None:
        if picked:
            worst = max(picked, key=lambda r: r.ratio)
            verdicts.append(
                {
                    "question": question,
                    "worst_ratio": round(worst.ratio, 3),
                    "target": target,
                    "met": worst.ratio <= target,
                    "where": f"{worst.shape} {worst.mode}",
                }
            )

    add(
        "forward+backward <= 1.15x the dense top-k limit at both shapes",
        [r for r in rows if r.section == "limit" and r.mode == "fwd+bwd"],
        1.15,
    )
    add(
        "decode (16 tokens) <= 1.5x its limit",
        [r for r in rows if r.section == "decode" and r.baseline.startswith("dense")],
        1.5,
    )
    # Against the fastest transformers implementation of each (section, shape, mode).
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.baseline.startswith("transformers") and r.section not in ("model", "generate"):  # their own summaries
            groups.setdefault((r.section, r.shape, r.mode), []).append(r)
    fastest = [min(group, key=lambda r: r.baseline_ms) for group in groups.values()]
    add("at least as fast as the fastest transformers experts implementation", fastest, 1.0)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls are 5-100x slower on CPU
    repeats = args.repeats or (2 if args.quick else 5)
    token_count = args.tokens or (256 if args.quick else 4096)
    # Decode steps are short and noisier: three times the rounds.
    settings = Settings(repeats=repeats, warmup=1, decode_repeats=3 * repeats, device=device, dtype=dtype)
    started, load_before = time.perf_counter(), loadavg()
    print(
        f"moeify benchmarks on {cpu_description()}, {device.type} {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, {token_count} tokens, {repeats} rounds; load {load_before}",
        flush=True,
    )

    rows: list[Row] = []
    info: dict = {}
    if args.only in (None, "layers"):
        for shape, twin in (
            (llm_shape(token_count), None),
            (dit_shape(token_count), dit_shape(token_count, bias=False)),
        ):
            t0 = time.perf_counter()
            shape_rows, info[shape.name] = layer_suite(shape, settings, twin_shape=twin)
            info[shape.name]["seconds"] = round(time.perf_counter() - t0, 1)
            rows += shape_rows
            print(
                format_table(shape_rows),
                f"\n[{shape.name}: {info[shape.name]['seconds']} s, load {loadavg()}]\n",
                flush=True,
            )
    if args.only in (None, "paths") and device.type == "cpu":
        t0 = time.perf_counter()
        counts = [64, 256] if args.quick else [128, 512, 1024, 4096]
        path_rows, info["cpu_paths"] = paths_bench.path_rows(counts, settings)
        info["cpu_paths"]["seconds"] = round(time.perf_counter() - t0, 1)
        rows += path_rows
        print(
            format_table(path_rows), f"\n[cpu paths: {info['cpu_paths']['seconds']} s, load {loadavg()}]\n", flush=True
        )
    if args.only in (None, "compile"):
        t0 = time.perf_counter()
        compile_rows: list[Row] = []
        info["compiled"] = {}
        for shape in (llm_shape(token_count), dit_shape(token_count)):
            shape_rows, info["compiled"][shape.name] = compile_bench.compile_rows(shape, settings)
            compile_rows += shape_rows
        info["compiled"]["seconds"] = round(time.perf_counter() - t0, 1)
        rows += compile_rows
        print(
            format_table(compile_rows),
            f"\n[compiled: {info['compiled']['seconds']} s, load {loadavg()}]\n",
            flush=True,
        )
    if args.only in (None, "conversion"):
        layers = 1 if args.quick else 4
        t0 = time.perf_counter()
        conv_rows = conversion_bench.time_rows("llm", layers, repeats=repeats, warmup=1)
        conv_rows += conversion_bench.time_rows("dit", layers, repeats=repeats, warmup=1)
        memory = []
        for shape in ("llm", "dit"):
            mem_rows, details = conversion_bench.memory_rows(shape, layers)
            conv_rows += mem_rows
            memory += details
        info["conversion"] = {"layers": layers, "memory": memory, "seconds": round(time.perf_counter() - t0, 1)}
        rows += conv_rows
        print(
            format_table(conv_rows),
            f"\n[conversion: {info['conversion']['seconds']} s, load {loadavg()}]\n",
            flush=True,
        )

    if args.only in (None, "model"):
        t0 = time.perf_counter()
        # CPU: the quick preset (the full shape takes over an hour on 2 cores); smoke mode: smaller still.
        quick_shape = (args.model_shape or ("full" if cuda else "quick")) == "quick"
        smoke = {"layers": 2, "batch": 2, "seq": 128, "steps": 2} if args.quick else {}
        spec = model_bench.spec_from(argparse.Namespace(threads=args.threads, **smoke), quick_shape)
        model_rows, info["model"] = model_bench.measure(spec, device)
        info["model"]["seconds"] = round(time.perf_counter() - t0, 1)
        rows += model_rows
        print(
            model_bench.format_model_table(model_rows, info["model"]),
            f"\n[model: {info['model']['seconds']} s, load {loadavg()}]\n",
            flush=True,
        )

    if args.only in (None, "generate"):
        t0 = time.perf_counter()
        # CPU: the reduced grid (generate_bench.PRESETS); smoke mode: smaller still.
        preset = "full" if (args.model_shape or ("full" if cuda else "quick")) == "full" else "quick"
        smoke = dict(layers=1, cells=((1, 64), (4, 64)), compiled_cells=((1, 64),), new_tokens=6, repeats=2)
        info["generate"] = []
        for spec in generate_bench.PRESETS[preset]:
            spec = generate_bench.replace(spec, threads=args.threads, **(smoke if args.quick else {}))
            spec_rows, spec_info = generate_bench.measure(spec, device)
            rows += spec_rows
            info["generate"].append(spec_info)
            print(generate_bench.format_table(spec_rows, spec_info), flush=True)
        print(f"[generate: {time.perf_counter() - t0:.0f} s, load {loadavg()}]\n", flush=True)

    verdicts = summary(rows) + model_bench.summary(rows, info.get("model", {}))
    verdicts += generate_bench.summary([r for r in rows if r.section == "generate"], info.get("generate", []))
    for v in verdicts:
        print(f"{'MET ' if v['met'] else 'MISSED'}  {v['question']}: worst {v['worst_ratio']} ({v['where']})")
    elapsed = time.perf_counter() - started
    result = {
        "mode": "quick" if args.quick else "full",
        "machine": {
            "cpu": cpu_description(),
            "device": torch.cuda.get_device_name() if cuda else "cpu (no GPU)",
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "tokens": token_count,
        "repeats": repeats,
        "seconds": round(elapsed, 1),
        "summary": verdicts,
        "rows": [r.as_dict() for r in rows],
        "details": info,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
