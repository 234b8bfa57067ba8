"""Shared-expert maturity against deadlock: the Functional Redundancy Hypothesis.

Claim under test, from "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers:
Diagnosis, Boundary Calibration and Evolutionary Roadmap from Routing Collapse to Selective
Deadlock": deadlock is a waiting state that ends once the shared expert matures. Its review asks
for the intervention the paper did not run: a shared expert mature from the start. Here the
deadlock-prone recipe (no router losses) runs with the paper's shared init, with a shared expert
mature from step 0 (function-preserving), and with none; and every no-loss run of the deadlock
experiment says whether its deadlocks ended after the shared expert matured.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

from exp_deadlock import LR, ROUTERS, _collect, arm_stats, job
from verdicts import Rows, fmt, graded, per_seed

SHARED_ARMS = ("noise", "premature", "none")  # "noise": the paper's init, the same runs as `deadlock`
FRH_ROUTER = "mlp"


def maturity(ctx: Any) -> dict[str, Any]:
    """Shared-expert init x seeds with the deadlock-prone recipe (MLP router, no router losses),
    plus the maturity-vs-ending record of every router's no-loss runs."""
    scale = ctx.scale
    jobs = {f"{arm}/seed={seed}": job(scale, seed, FRH_ROUTER, 0.0, arm) for arm in SHARED_ARMS for seed in scale.seeds}
    jobs |= {
        f"{router}/noise/seed={seed}": job(scale, seed, router, 0.0)
        for router in ROUTERS
        if router != FRH_ROUTER
        for seed in scale.seeds
    }
    runs = _collect(ctx, jobs, "maturity")
    arms = {arm: arm_stats([runs[f"{arm}/seed={s}"] for s in scale.seeds]) for arm in SHARED_ARMS}
    for key in [k for k in runs if "noise/" in k]:  # the `deadlock` experiment's no-loss runs: stored there in full
        router = key.split("/")[0] if key.count("/") == 2 else FRH_ROUTER
        seed = key.rsplit("=", 1)[1]
        runs[key] = {
            "same_run_as": f"deadlock.json runs['{router}/B=0/seed={seed}']",
            "numbers": runs[key]["numbers"],
            "series": {"shared_maturity.ratio": runs[key]["series"]["shared_maturity.ratio"]},
        }
    for arm in SHARED_ARMS:
        if arm == "none":
            continue
        numbers = [runs[f"{arm}/seed={s}"]["numbers"] for s in scale.seeds]
        arms[arm].update(
            matured_layers=[n["matured_layers"] for n in numbers],
            episodes_ended=sum(n["episodes_ended"] for n in numbers),
            ended_after_maturity=sum(n["ended_after_maturity"] for n in numbers),
        )
    # Every no-loss run with the paper's shared init: do deadlocks end after the shared expert matures?
    noise_runs = [runs[f"noise/seed={s}"] for s in scale.seeds]
    noise_runs += [runs[f"{r}/noise/seed={s}"] for r in ROUTERS if r != FRH_ROUTER for s in scale.seeds]
    endings = {
        "runs": len(noise_runs),
        "episodes": sum(r["numbers"]["counts"]["episodes"] for r in noise_runs),  # what shared_maturity reads
        "episodes_ended": sum(r["numbers"]["episodes_ended"] for r in noise_runs),
        "ended_after_maturity": sum(r["numbers"]["ended_after_maturity"] for r in noise_runs),
        "layers_matured": sum(r["numbers"]["matured_layers"] for r in noise_runs),
        "layers": sum(r["numbers"]["layers"] for r in noise_runs),
    }
    return {"router": FRH_ROUTER, "arms": arms, "endings": endings, "lr": LR, "runs": runs}


def render_maturity(data: dict[str, Any]) -> tuple[list[str], Rows]:
    arms, n, ends = data["arms"], len(data["seeds"]), data["endings"]
    lines = [
        f"{data['router']} router, no router losses (the deadlock-prone recipe of section 1), lr {data['lr']:g}. "
        "Shared expert: `noise` (the paper's init, N(0, 1e-4); the same runs as section 1), `premature` (mature from "
        "step 0: the shared expert is the dense FFN at half output and every routed expert's output is halved, so "
        "the model computes what the dense one did), `none` (no shared expert). Mature: ||shared|| / ||routed|| "
        ">= 0.5 (moeify's convention; the paper gives no measure). Deadlock: counts alone (moeify's criterion never "
        "fired at this scale, section 1).",
        "",
        "| shared expert | layers ever deadlocked, per seed | deadlocked steps (mean over layers) | episodes ended / all "
        "| layers matured, per seed |",
        "|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        c = a["counts"]
        lines.append(
            f"| {arm} | {per_seed(c['ever_deadlocked_fraction'])} | {fmt(mean(c['depth_profile_mean']))} "
            f"| {c['recovered']}/{c['episodes']} | {per_seed(a.get('matured_layers', ['-'] * n), 0)} |"
        )
    lines += [
        "",
        f"Every no-loss run with the paper's init ({ends['runs']} runs, all three routers): {ends['episodes']} deadlock "
        f"episodes, {ends['episodes_ended']} ended, {ends['ended_after_maturity']} of them after their layer's shared "
        f"expert matured; {ends['layers_matured']} of {ends['layers']} layers matured.",
    ]
    noise, mature, none = arms["noise"]["counts"], arms["premature"]["counts"], arms["none"]["counts"]
    lower = sum(1 for a, b in zip(mature["ever_deadlocked_fraction"], noise["ever_deadlocked_fraction"]) if a < b)
    testable = bool(noise["episodes"])
    rows: Rows = [
        (
            "Functional Redundancy Hypothesis: a shared expert mature from the start prevents deadlock",
            "[000]",
            "not testable here" if not testable else graded(lower, n),
            f"layers ever deadlocked, premature vs noise init: {per_seed(mature['ever_deadlocked_fraction'])} vs "
            f"{per_seed(noise['ever_deadlocked_fraction'])}; fewer in {lower}/{n} seeds (rule: fewer in every seed = reproduces)",
        )
    ]
    rows.append(
        (
            "Deadlock is waiting for a shared expert: none without one (our reading; the paper ran no such arm)",
            "[000]",
            "not testable here" if not testable else "reproduces" if not none["episodes"] else "does not reproduce",
            f"no shared expert: layers ever deadlocked {per_seed(none['ever_deadlocked_fraction'])} "
            f"(paper's init: {per_seed(noise['ever_deadlocked_fraction'])}; rule: no deadlock without one = reproduces)",
        )
    )
    if ends["episodes_ended"]:
        share = ends["ended_after_maturity"] / ends["episodes_ended"]
        verdict = "reproduces" if share >= 0.8 else "partly" if share > 0 else "does not reproduce"
        evidence = (
            f"{ends['ended_after_maturity']} of the {ends['episodes_ended']} ended episodes ended after the "
            f"layer's shared expert matured (rule: >= 80%)"
        )
    else:
        verdict, evidence = "not testable here", f"no deadlock episode ended in {ends['runs']} runs"
    rows.append(("Deadlocks end once the shared expert has matured", "[000]", verdict, evidence))
    return lines, rows
