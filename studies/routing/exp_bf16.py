"""bf16 storage: lost updates and expert homogenization, and each guard that removes them.

Claim under test, from "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers:
Diagnosis, Boundary Calibration and Evolutionary Roadmap from Routing Collapse to Selective
Deadlock": bfloat16 truncates tiny weight updates to zero, so upcycled experts (exact clones)
never separate. Arms: fp32 weights (reference), bf16 weights with a plain AdamW, and bf16 with
each `moeify.guard_bf16` method, all at lr 1e-5 (a fine-tuning rate, where an Adam step is far
below half the bf16 spacing of a weight of size ~0.1).
"""

from __future__ import annotations

from statistics import mean
from typing import Any

import harness
from verdicts import Rows, fmt, graded, per_seed

LR = 1e-5
ARMS = {  # name: (storage dtype, guard)
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "bf16+fp32_master": ("bf16", "fp32_master"),
    "bf16+kahan": ("bf16", "kahan"),
    "bf16+stochastic_rounding": ("bf16", "stochastic_rounding"),
}


def job(scale: harness.Scale, seed: int, dtype: str, guard: str | None) -> dict[str, Any]:
    short = scale.name == "quick"
    every = 2 if short else 15
    return {
        "scale": scale.name,
        "seed": seed,
        "steps": scale.steps["bf16"],
        "lr": LR,
        "dtype": dtype,
        **({"guard": guard} if guard else {}),
        "moeify": {"router": "linear"},  # moeify's defaults: balance 0.01, z-loss 1e-3, noise shared init
        "monitors": [
            ["lost_updates", {}],
            ["expert_homogenization", {"every_n_steps": every, "warmup": 2 * every, "patience": 2}],
        ],
        "series": [
            ["lost_updates", "lost_fraction"],
            ["expert_homogenization", "spread_max"],
            ["expert_homogenization", "drift"],
        ],
    }


def _mean_over_steps(entry: dict[str, list]) -> float | None:
    values = [v for v in entry if v is not None]
    return mean(values) if values else None


def run_numbers(result: dict[str, Any]) -> dict[str, Any]:
    lost = result["series"]["lost_updates.lost_fraction"]
    homog = result["summary"]["monitors"]["expert_homogenization"]["layers"]
    return {
        # group 0 = the routed experts, group 1 = everything else (harness.make_optimizer)
        "lost_fraction_experts": _mean_over_steps(lost.get("param_group_0", [])),
        "lost_fraction_rest": _mean_over_steps(lost.get("param_group_1", [])),
        "lost_fraction_all": _mean_over_steps(lost.get("model", [])),
        "spread_max_mean": mean(h["spread_max"] for h in homog.values()),
        "drift_mean": mean(h["drift"] for h in homog.values()),
        "homogeneous_layers": sum(1 for h in homog.values() if h["homogeneous"]),
        "layers": len(homog),
        "predicted_lost": result.get("preflight", {}).get("lost"),
        "predicted_lost_experts": (result.get("preflight") or {}).get("groups", [None])[0],
        "loss": result["loss_last_tenth"],
    }


def bf16(ctx: Any) -> dict[str, Any]:
    scale = ctx.scale
    jobs = {f"{arm}/seed={seed}": job(scale, seed, *spec) for arm, spec in ARMS.items() for seed in scale.seeds}
    keys = list(jobs)
    results = dict(zip(keys, ctx.map(harness.train_run, [jobs[k] for k in keys], "bf16")))
    runs = {
        k: {
            "job": jobs[k],
            "numbers": run_numbers(r),
            "series": r["series"],
            "cpu_s": r["cpu_s"],
            "wall_s": r["wall_s"],
        }
        for k, r in results.items()
    }
    arms = {}
    for arm in ARMS:
        numbers = [runs[f"{arm}/seed={s}"]["numbers"] for s in scale.seeds]
        arms[arm] = {
            key: [n[key] for n in numbers]
            for key in (
                "lost_fraction_experts",
                "lost_fraction_rest",
                "spread_max_mean",
                "drift_mean",
                "homogeneous_layers",
                "predicted_lost_experts",
                "loss",
            )
        }
        arms[arm]["layers"] = numbers[0]["layers"]
        arms[arm]["cpu_s"] = sum(runs[f"{arm}/seed={s}"]["cpu_s"] for s in scale.seeds)
    return {"lr": LR, "arms": arms, "runs": runs}


def _drift(data: dict[str, Any], arm: str) -> str:
    """'a -> b': the arm's lost fraction of expert updates in the first and the last tenth of its steps."""
    curves = [
        r["series"]["lost_updates.lost_fraction"]["param_group_0"]
        for k, r in data["runs"].items()
        if k.startswith(f"{arm}/")
    ]
    tenth = max(1, len(curves[0]) // 10)
    first = mean(v for c in curves for v in c[1 : tenth + 1] if v is not None)  # step 1 reads before any update
    last = mean(v for c in curves for v in c[-tenth:] if v is not None)
    return f"{fmt(first, 4)} -> {fmt(last, 4)}"


def render(data: dict[str, Any]) -> tuple[list[str], Rows]:
    arms = data["arms"]
    steps = data["runs"][next(iter(data["runs"]))]["job"]["steps"]
    lines = [
        f"Linear router, moeify's default losses, AdamW lr {data['lr']:g}, {steps} steps; routers stay fp32 in every arm. "
        "Lost: the optimizer's truth for a sampled weight is bit-identical across a step that meant to change it "
        "(`lost_updates`); predicted: `moeify.check_bf16` before training.",
        "",
        "| arm | expert updates lost, per seed | other updates lost | predicted (experts) | max expert distance "
        "(mean over layers) | homogeneous layers | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        lines.append(
            f"| {arm} | {per_seed(a['lost_fraction_experts'], 4)} | {per_seed(a['lost_fraction_rest'], 4)} "
            f"| {per_seed(a['predicted_lost_experts'], 4)} | {per_seed(a['spread_max_mean'], 4)} "
            f"| {per_seed(a['homogeneous_layers'], 0)} of {a['layers']} | {per_seed(a['loss'], 3)} |"
        )
    lines += [
        "",
        "How the lost share of the expert updates moves over the run (mean over seeds, first vs last tenth of "
        "the steps): " + "; ".join(f"{arm} {_drift(data, arm)}" for arm in arms) + ".",
    ]
    reference = arms["fp32"]["spread_max_mean"]

    def ratio(arm: str) -> str:
        """The arm's expert spread at the end relative to the fp32 run of the same seed."""
        return per_seed([s / r if r else 0.0 for s, r in zip(arms[arm]["spread_max_mean"], reference)])

    plain, layers = arms["bf16"], arms["bf16"]["layers"]
    lost = min(plain["lost_fraction_experts"])
    clones = all(h == layers for h in plain["homogeneous_layers"]) and not any(arms["fp32"]["homogeneous_layers"])
    rows: Rows = [
        (
            "bf16 storage drops tiny updates and leaves the experts homogeneous",
            "[000]",
            "reproduces" if lost >= 0.9 and clones else "partly" if lost >= 0.5 or clones else "does not reproduce",
            f"plain AdamW on bf16 weights: >= {fmt(lost, 4)} of the expert updates lost in every seed; homogeneous layers "
            f"{per_seed(plain['homogeneous_layers'], 0)} of {layers} (fp32: {per_seed(arms['fp32']['homogeneous_layers'], 0)}); "
            f"expert spread {ratio('bf16')} x fp32 (rule: >= 90% lost, every layer homogeneous, none in fp32)",
        )
    ]
    guards = [a for a in arms if a.startswith("bf16+")]
    fixed = [
        g for g in guards if max(arms[g]["lost_fraction_experts"]) <= 0.01 and not any(arms[g]["homogeneous_layers"])
    ]
    rows.append(
        (
            "Each moeify.guard_bf16 method removes it",
            "moeify",
            graded(len(fixed), len(guards)),
            "; ".join(
                f"{g[5:]}: <= {fmt(max(arms[g]['lost_fraction_experts']), 4)} lost, "
                f"{sum(arms[g]['homogeneous_layers'])} homogeneous, spread {ratio(g)} x fp32"
                for g in guards
            )
            + " (rule: <= 1% lost and no homogeneous layer)",
        )
    )
    return lines, rows
