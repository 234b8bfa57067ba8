"""The coverage sweep: every transformers model type and every diffusers transformer/UNet class,
built tiny (benchmarks/zoo), converted by `moeify(...)`, and classified.

    python benchmarks/coverage.py                      # everything: ~20-30 min on 2 cores
    python benchmarks/coverage.py --library diffusers  # one zoo
    python benchmarks/coverage.py --only bert bart     # some entries (no files written)
    make coverage

Each model that builds and runs at tiny size (fp32, seeded) is converted with
`num_experts=4, top_k=2, num_shared_experts=1, shared_expert_init="zero_out"` and
`example_inputs` (moeify's own whole-model check), then compared independently here:

- preserved: converted, every floating output within 1e-5 of the dense output's scale;
- refused: a `ConversionError` whose every reason is a correct one (`CORRECT_REASONS`: already a
  MoE, a token mixer between the projections, an FFN fused with attention, not token-wise, no
  FFN-shaped computation at all);
- failed: anything else (a crash, a changed output, a refusal with another reason).

Writes benchmarks/coverage.json (one row per model) and benchmarks/COVERAGE.md (the table); the
README's headline comes from that table. Models the zoo cannot build small are listed with the
reason and left out of the percentages.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TIMEOUT = 120  # seconds per model: build, run, convert, check
TOLERANCE = 1e-5
RECIPE = {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "shared_expert_init": "zero_out"}
# Reasons for which a refusal is the right answer (substrings of moeify's skip reasons).
CORRECT_REASONS = (
    "already a Mixture-of-Experts block",
    "mixes neighbouring tokens",
    "concatenated with the attention output",
    "not token-wise",
    "MLP output is concatenated",
    "not a token FFN",  # the registry's timestep embedders and caption projections
    "squeeze-and-excitation",
)


def _floats(result: Any) -> list:
    import torch

    if isinstance(result, torch.Tensor):
        return [result] if result.is_floating_point() else []
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in _floats(item)]
    if hasattr(result, "to_tuple"):
        return _floats(result.to_tuple())
    return []


def _run(model: Any, inputs: dict) -> list:
    """Floating outputs, the RNG seeded alike for every run (forwards that draw random numbers)."""
    import torch

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return [t.detach().clone() for t in _floats(model(**inputs))]


def _worst(dense: list, converted: list) -> float:
    """The largest relative difference over the outputs (moeify's own measure: NaN where both are
    NaN agrees)."""
    from moeify.surgery.verify import relative_error

    if len(dense) != len(converted) or any(d.shape != c.shape for d, c in zip(dense, converted)):
        return float("inf")
    return max((relative_error(c, d) for d, c in zip(dense, converted)), default=0.0)


# Models whose weights look FFN-shaped to the census (two projections D -> I -> D in one block) but
# that hold no convertible FFN there, each checked by reading the model's code (2026-11-26,
# transformers 5.24, diffusers 0.42). The table marks them "refused (reviewed)".
REVIEWED = {
    "convnextv2": "global response normalisation between the projections normalises over the positions",
    "dac": "in_proj / out_proj of the quantizer hold a codebook lookup between them, no FFN",
    "deepseek_v2": "every FFN is a MoE block; the pair is the low-rank attention's query path",
    "deepseek_v4": "every FFN is a MoE block; the pair is the low-rank attention's query path",
    "mistral4": "every FFN is a MoE block; the pair is the low-rank attention's query path",
    "falcon_mamba": "the pair is a Mamba mixer's in_proj / out_proj, a causal convolution and a scan between",
    "mamba": "the pair is a Mamba mixer's in_proj / out_proj, a causal convolution and a scan between",
    "lara_mini": "every FFN is a MoE block; the pair is the linear attention's in / out projections",
    "qwen3_5_moe_text": "every FFN is a MoE block; the pair is the linear attention's in / out projections",
    "qwen4_exp_text": "every FFN is a MoE block; the small MLPs compute hyper-connection mixing weights",
    "resnet": "bottleneck blocks: 1x1 convolutions around a 3x3 convolution and batch norms",
    "switch_transformers": "every FFN is a MoE block; the pair is attention with heads wider than the model",
    "vits": "normalising flows: 1x1 convolutions around dilated convolutions (WaveNet)",
    "SanaTransformer2DModel": "its FFNs are convolutions over tokens; the pair is the patch embedding and proj_out",
    "StableCascadeUNet": "its FFNs normalise over positions; the pair is the model's input embedding and classifier",
}


# What the remaining failures are, from looking into each (shown under the table's failed rows).
FAILURE_NOTES = {
    "grounding-dino": "the dense model itself moves by 4.6e-05 of its scale when every FFN output is perturbed by "
    "1.2e-7 (the fp32 rounding of the top-k weights); moeify's own whole-model check (1e-4) passes",
    "mm-grounding-dino": "as grounding-dino",
    "ibert": "its FFN projections are QuantLinear called with a scaling factor and returning a tuple; "
    "nothing moeify builds can stand in for them",
    "timesfm2_5": "the tiny config makes the patch embedding block square, so it looks like a residual FFN, and the "
    "model's code reads its weight; real TimesFM (64 -> 1280) does not match. A clean ConversionError",
    "zamba2": "a per-layer LoRA adapter is added to the FFN's gate_up projection: not a projection experts can clone",
}


def _ffn_shaped_block(model: Any, report: Any) -> str | None:
    """Where two projections (or 1x1 convolutions) of one block could chain D -> I -> D (I > D),
    outside every module skipped for a correct reason: a missed FFN, or one to look at by hand.
    "One block": their common parent is at most two levels above each (`mlp.fc1` / `mlp.fc2`,
    BERT's `intermediate.dense` / `output.dense`), not two stages of a network."""
    from moeify.surgery.discover import pointwise_shape

    skipped = tuple(s.name + "." for s in report.skipped)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        shape = pointwise_shape(module)
        if shape is not None and not (name + ".").startswith(skipped):
            by_shape.setdefault(shape, []).append(name)
    for (i_out, d_in), ins in by_shape.items():
        for (d_out, i_in), outs in by_shape.items():
            if d_out != d_in or i_in <= d_in or i_out not in (i_in, 2 * i_in):
                continue
            for a in ins:
                for b in outs:
                    parent = os.path.commonprefix([a.split("."), b.split(".")])
                    if max(a.count("."), b.count(".")) + 1 - len(parent) <= 2:
                        return ".".join(parent) or "the model"
    return None


def classify_refusal(model: Any, report: Any) -> tuple[bool, str]:
    """Whether a model with no FFN converted was refused for a correct reason, and the reason."""
    reasons = [s.reason for s in report.skipped]
    if report.unrun:
        return False, f"blocks that could not run alone: {report.unrun[0].reason}"
    unexplained = [r for r in reasons if not any(ok in r for ok in CORRECT_REASONS)]
    if unexplained:
        return False, unexplained[0]
    block = _ffn_shaped_block(model, report)
    if block is not None:
        return (
            False,
            f"FFN-shaped weights in {block} (D -> I -> D projections or 1x1 convolutions), but no FFN was found",
        )
    return True, _refusal_reason(reasons)


def _refusal_reason(reasons: list[str]) -> str:
    if not reasons:
        return "no FFN-shaped computation (no two projections D -> I -> D)"
    return sorted(set(reasons))[0]


def convert_one(built: Any) -> dict:
    """Convert one built model and classify the result (never raises)."""
    import moeify

    model, inputs = built.model, built.inputs
    row: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}
    try:
        dense = _run(model, inputs)
        started = time.perf_counter()
        report = moeify.find_ffns(model, example_inputs=inputs, **RECIPE)
        row["find_seconds"] = round(time.perf_counter() - started, 3)
        row["sites"] = len(report.sites)
        row["sources"] = sorted({s.source for s in report.sites})
        if not report.sites:
            correct, reason = classify_refusal(model, report)
            if not correct and built.name in REVIEWED:
                return row | {"status": "refused", "reason": f"reviewed: {REVIEWED[built.name]}", "reviewed": True}
            return row | {"status": "refused" if correct else "failed", "reason": reason}
        moeify.moeify(model, example_inputs=inputs, **RECIPE)
        worst = _worst(dense, _run(model, inputs))
    except moeify.ConversionError as error:
        return row | {"status": "failed", "reason": f"ConversionError: {str(error).splitlines()[0][:300]}"}
    except Exception as error:  # a crash is a result here
        return row | {"status": "failed", "reason": f"crash: {type(error).__name__}: {str(error)[:300]}"}
    row["max_relative_difference"] = worst
    if worst <= TOLERANCE:
        return row | {"status": "preserved", "reason": ""}
    return row | {"status": "failed", "reason": f"outputs changed by {worst:.3g} of their scale"}


def sweep_one(library: str, name: str) -> dict:
    """Build, convert and classify one entry, in this process, under a time limit."""
    import torch
    from zoo import ZooSkip

    torch.set_num_threads(1)
    zoo = _zoo(library)
    row: dict[str, Any] = {"library": library, "name": name}
    started = time.perf_counter()

    def expire(*_: Any) -> None:
        raise TimeoutError(f"over {TIMEOUT} s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT)
    try:
        built = zoo.build(name)
        row |= convert_one(built)
    except ZooSkip as skip:
        row |= {"status": "not built", "reason": str(skip)[:300]}
    except TimeoutError as error:
        row |= {"status": "failed", "reason": f"timeout: {error}"}
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _zoo(library: str) -> Any:
    if library == "transformers":
        from zoo import transformers_zoo

        return transformers_zoo
    from zoo import diffusers_zoo

    return diffusers_zoo


def entries(library: str) -> list[str]:
    zoo = _zoo(library)
    return zoo.model_types() if library == "transformers" else zoo.model_classes()


def _worker(tasks: Any, results: Any) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    while True:
        task = tasks.get()
        if task is None:
            return
        results.put(sweep_one(*task))


def sweep(tasks: list[tuple[str, str]], jobs: int) -> list[dict]:
    """Run the tasks in `jobs` worker processes; a worker that dies (a segfault, the OOM killer)
    fails its task and is replaced."""
    context = mp.get_context("spawn")
    queue, results = context.Queue(), context.Queue()
    for task in tasks:
        queue.put(task)
    workers = [context.Process(target=_worker, args=(queue, results), daemon=True) for _ in range(jobs)]
    for w in workers:
        w.start()
    rows: list[dict] = []
    while len(rows) < len(tasks):
        try:
            row = results.get(timeout=TIMEOUT * 2)
        except Exception:  # queue.Empty: a worker died mid-task
            done = {(r["library"], r["name"]) for r in rows}
            dead = [w for w in workers if not w.is_alive()]
            if not dead:
                continue
            missing = [t for t in tasks if t not in done]
            row = {"library": missing[0][0], "name": missing[0][1], "status": "failed", "reason": "worker died"}
            workers = [w for w in workers if w.is_alive()]
            fresh = context.Process(target=_worker, args=(queue, results), daemon=True)
            fresh.start()
            workers.append(fresh)
        rows.append(row)
        print(
            f"[{len(rows)}/{len(tasks)}] {row['library']}/{row['name']}: {row['status']} {row.get('reason', '')[:100]}"
        )
    for _ in workers:
        queue.put(None)
    return sorted(rows, key=lambda r: (r["library"], r["name"]))


def summary(rows: list[dict], library: str) -> dict:
    mine = [r for r in rows if r["library"] == library]
    counts = {s: sum(r["status"] == s for r in mine) for s in ("preserved", "refused", "failed", "not built")}
    counts["reviewed"] = sum(bool(r.get("reviewed")) for r in mine)
    built = counts["preserved"] + counts["refused"] + counts["failed"]
    good = counts["preserved"] + counts["refused"]
    return counts | {
        "total": len(mine),
        "built": built,
        "covered": good,
        "percent": round(100 * good / built, 1) if built else 0.0,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Coverage: moeify on every model it can build",
        "",
        "Written by `python benchmarks/coverage.py` (`make coverage`); do not edit by hand.",
        f"moeify recipe: `{RECIPE}`, fp32, outputs compared to {TOLERANCE:g} of their scale.",
        f"Versions: {meta['versions']}. Run on {meta['date']} in {meta['seconds']:.0f} s.",
        "",
        "A refusal counts as correct when every reason moeify gives is one of `CORRECT_REASONS` and no two",
        "projections of one block that could form an FFN are left unexplained; the few the census flags were",
        "read by hand and are listed in `REVIEWED` with why (marked `reviewed:` below).",
        "",
        "| library | entries | built & ran | preserved | correctly refused (of them reviewed) | failed | covered |",
        "|---|---|---|---|---|---|---|",
    ]
    for library in ("transformers", "diffusers"):
        s = summary(rows, library)
        if s["total"]:
            lines.append(
                f"| {library} | {s['total']} | {s['built']} | {s['preserved']} | {s['refused']} ({s['reviewed']}) | "
                f"{s['failed']} | **{s['percent']}%** |"
            )
    for status in ("failed", "refused", "preserved", "not built"):
        chosen = [r for r in rows if r["status"] == status]
        if not chosen:
            continue
        lines += [
            "",
            f"## {status} ({len(chosen)})",
            "",
            "| library | model | sites | find (s) | detail |",
            "|---|---|---|---|---|",
        ]
        for r in chosen:
            detail = (
                r.get("reason")
                or f"max diff {r.get('max_relative_difference', 0):.1e}, {'/'.join(r.get('sources', []))}"
            )
            if status == "failed" and r["name"] in FAILURE_NOTES:
                detail += f" (why: {FAILURE_NOTES[r['name']]})"
            detail = detail.replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['library']} | {r['name']} | {r.get('sites', '')} | {r.get('find_seconds', '')} | {detail} |"
            )
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import diffusers
    import torch
    import transformers

    import moeify

    return f"moeify {moeify.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=("transformers", "diffusers", "all"), default="all")
    parser.add_argument("--only", nargs="+", help="these entries only (prints, writes nothing)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--output", type=Path, default=HERE / "coverage.json")
    parser.add_argument("--table", type=Path, default=HERE / "COVERAGE.md")
    args = parser.parse_args(argv)
    libraries = ("transformers", "diffusers") if args.library == "all" else (args.library,)
    tasks = [(lib, name) for lib in libraries for name in entries(lib) if not args.only or name in args.only]
    started = time.time()
    rows = sweep(tasks, args.jobs)
    meta = {"versions": _versions(), "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - started}
    for library in libraries:
        print(library, summary(rows, library))
    if args.only:
        return
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    args.table.write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
