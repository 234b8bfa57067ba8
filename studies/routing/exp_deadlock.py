"""Deadlock by router type and balance weight, and its depth profile (the Functional Redundancy
Hypothesis, on the same runs and more, is in exp_maturity.py).

Claims under test, from "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers:
Diagnosis, Boundary Calibration and Evolutionary Roadmap from Routing Collapse to Selective
Deadlock":
  - linear routers: global soft saturation with homogeneous experts;
  - MLP routers: selective deadlock in about a third of the layers, not prevented by a larger
    auxiliary loss;
  - cross-attention routers: partial self-recovery (deadlocks that end);
  - deadlocked layers form a U over depth (shallow and deep layers).

A layer is deadlocked while one expert is in >= 90% of the tokens' top-2 for >= 50 consecutive
steps (counts alone, the `deadlock_counts` view) and, by moeify's `deadlock` monitor, also holds
half the way from uniform to all of the router probability. Both run in every run.
"""

from __future__ import annotations

from statistics import mean
from typing import Any

import harness
from verdicts import Rows, fmt, graded, per_seed

ROUTERS = ("linear", "mlp", "cross_attention")
BALANCE = (0.0, 0.01, 0.1)
# At 1e-3 no layer deadlocked within 200 steps, even by counts alone (pilot: mlp and linear routers,
# no router losses, seed 0). Adam's steps scale with lr: 3e-3 stands in for a longer run.
LR = 3e-3


def monitors(scale: harness.Scale) -> list[list]:
    short = scale.name == "quick"
    return [
        ["deadlock", {"patience": 3 if short else 50}],
        ["deadlock_counts", {"patience": 3 if short else 50, "prob_tau": None}],
        ["dead_experts", {"dead_after": 4 if short else 100}],
        ["shared_maturity", {"deadlock": "deadlock_counts"}],  # moeify's criterion never fired here
        ["router_entropy", {"soft_patience": 4 if short else 100}],
        ["expert_homogenization", {"every_n_steps": 4 if short else 50, "warmup": 4 if short else 100}],
    ]


def job(scale: harness.Scale, seed: int, router: str, balance: float, shared: str = "noise") -> dict[str, Any]:
    """balance 0 means no router loss at all (z-loss 0 too); otherwise moeify's z-loss 1e-3."""
    options: dict[str, Any] = {
        "router": router,
        "balance_loss_weight": balance,
        "z_loss_weight": 0.0 if balance == 0 else 1e-3,
    }
    if shared == "none":
        options["num_shared_experts"] = 0
    elif shared == "noise":
        options["shared_expert_init"] = "noise"
    else:  # "premature": function-preserving, half of the dense FFN in the shared expert
        options["shared_expert_init"] = "zero_out"
    return {
        "scale": scale.name,
        "seed": seed,
        "steps": scale.steps["deadlock"],
        "lr": LR,
        "moeify": options,
        **({"premature_share": 0.5} if shared == "premature" else {}),
        "monitors": monitors(scale) if shared != "none" else [m for m in monitors(scale) if m[0] != "shared_maturity"],
        "series": [
            ["deadlock", "dominance"],
            ["deadlock", "prob_share"],
            ["shared_maturity", "ratio"],
            ["router_entropy", "entropy"],
        ],
    }


def deadlock_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    """One deadlock monitor's figures for one run."""
    profile = summary["model"]["depth_profile"]
    layers = summary["layers"]
    episodes = [e for layer in layers.values() for e in layer["episodes"]]
    return {
        "deadlocked_layers": sum(1 for layer in layers.values() if layer["episodes"]),
        "layers": len(profile["deadlocked_fraction"]),
        "ever_deadlocked_fraction": profile["ever_deadlocked_fraction"],
        "deadlocked_step_fraction": profile["deadlocked_fraction"],
        "u_thirds": profile["u_thirds"],
        "u_quadratic": profile["u_quadratic"],
        "episodes": len(episodes),
        "recovered": sum(1 for e in episodes if e["end"] is not None),
    }


def u_thirds(y: list[float]) -> float | None:
    """Mean of the shallow and deep thirds minus the middle third, the `deadlock` monitor's split
    (depth d of L: shallow 3d < L-1, deep 3d > 2(L-1))."""
    last = len(y) - 1
    outer = [v for d, v in enumerate(y) if 3 * d < last or 3 * d > 2 * last]
    middle = [v for d, v in enumerate(y) if last <= 3 * d <= 2 * last]
    return mean(outer) - mean(middle) if outer and middle else None


def locked_fraction(summary: dict[str, Any]) -> list[float]:
    """Per depth: the share of steps in which one expert was in >= tau of the tokens' top-k,
    whichever expert it was and however briefly. Unlike an episode this counts a layer whose
    tokens all go to the same two experts, where the dominant one flips between them."""
    layers = sorted(summary["layers"].values(), key=lambda v: v["depth"])
    return [v["assignment_locked_steps"] / v["observed_steps"] if v["observed_steps"] else 0.0 for v in layers]


def run_numbers(result: dict[str, Any]) -> dict[str, Any]:
    """The per-run figures every table of this experiment reads: `deadlock` is moeify's criterion
    (counts and router probability), `counts` the counts alone."""
    mons = result["summary"]["monitors"]
    homog = mons["expert_homogenization"]["layers"]
    soft = {e["layer"] for e in result["events"] if e["kind"] == "soft_saturation"}
    entropy = result["series"]["router_entropy.entropy"]
    final_entropy = [values[-1] for name, values in entropy.items() if name != "steps" and values]
    out = {
        **deadlock_numbers(mons["deadlock"]),
        "counts": deadlock_numbers(mons["deadlock_counts"]),
        "locked_fraction": locked_fraction(mons["deadlock_counts"]),
        "soft_saturated_layers": len(soft),
        "homogeneous_layers": sum(1 for h in homog.values() if h["homogeneous"]),
        "spread_max_min": min(h["spread_max"] for h in homog.values()),
        "final_entropy_mean": mean(final_entropy) if final_entropy else None,
        "dead_experts": mons["dead_experts"]["dead_now"],
        "loss": result["loss_last_tenth"],
    }
    if "shared_maturity" in mons:
        model = mons["shared_maturity"]["model"]
        matured = [v["matured_step"] for v in mons["shared_maturity"]["layers"].values()]
        out.update(
            episodes_ended=model["episodes_ended"],
            ended_after_maturity=model["ended_after_maturity"],
            matured_layers=sum(1 for m in matured if m is not None),
            matured_steps=matured,
            ratio_max=[v["ratio_max"] for v in mons["shared_maturity"]["layers"].values()],
        )
    return out


def _deadlock_stats(numbers: list[dict[str, Any]]) -> dict[str, Any]:
    depth = len(numbers[0]["deadlocked_step_fraction"])
    return {
        "ever_deadlocked_fraction_mean": mean(n["ever_deadlocked_fraction"] for n in numbers),
        "ever_deadlocked_fraction": [n["ever_deadlocked_fraction"] for n in numbers],
        "seeds_with_deadlock": sum(1 for n in numbers if n["deadlocked_layers"]),
        "seeds_all_layers_deadlocked": sum(1 for n in numbers if n["deadlocked_layers"] == n["layers"]),
        "depth_profile_mean": [mean(n["deadlocked_step_fraction"][d] for n in numbers) for d in range(depth)],
        "u_thirds_of_deadlocked_runs": [
            n["u_thirds"] for n in numbers if n["deadlocked_layers"] and n["u_thirds"] is not None
        ],
        "episodes": sum(n["episodes"] for n in numbers),
        "recovered": sum(n["recovered"] for n in numbers),
    }


def arm_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: means, and how many seeds show the phenomenon at all."""
    numbers = [r["numbers"] for r in runs]
    return {
        **_deadlock_stats(numbers),
        "counts": _deadlock_stats([n["counts"] for n in numbers]),
        "locked_profile_mean": [mean(f) for f in zip(*(n["locked_fraction"] for n in numbers))],
        "locked_u_thirds": [u_thirds(n["locked_fraction"]) for n in numbers],
        "soft_saturated_layers": [n["soft_saturated_layers"] for n in numbers],
        "homogeneous_layers": [n["homogeneous_layers"] for n in numbers],
        "spread_max_min": [n["spread_max_min"] for n in numbers],
        "final_entropy_mean": mean(n["final_entropy_mean"] for n in numbers),
        "dead_experts": [n["dead_experts"] for n in numbers],
        "loss_mean": mean(n["loss"] for n in numbers),
        "cpu_s": sum(r["cpu_s"] for r in runs),
    }


def _collect(ctx: Any, jobs: dict[str, dict], label: str) -> dict[str, dict[str, Any]]:
    keys = list(jobs)
    results = ctx.map(harness.train_run, [jobs[k] for k in keys], label)
    return {
        k: {
            "job": jobs[k],
            "numbers": run_numbers(r),
            "series": r["series"],
            "events": r["events"],
            "summary": r["summary"],
            "cpu_s": r["cpu_s"],
            "wall_s": r["wall_s"],
        }
        for k, r in zip(keys, results)
    }


def deadlock(ctx: Any) -> dict[str, Any]:
    """Router type x balance weight x seeds: deadlock frequency, recovery, depth profile, soft
    saturation and homogenization."""
    scale = ctx.scale
    jobs = {
        f"{router}/B={balance:g}/seed={seed}": job(scale, seed, router, balance)
        for router in ROUTERS
        for balance in BALANCE
        for seed in scale.seeds
    }
    runs = _collect(ctx, jobs, "deadlock")
    arms = {
        f"{router}/B={balance:g}": arm_stats([runs[f"{router}/B={balance:g}/seed={s}"] for s in scale.seeds])
        for router in ROUTERS
        for balance in BALANCE
    }
    return {"routers": list(ROUTERS), "balance": list(BALANCE), "lr": LR, "arms": arms, "runs": runs}


def render_deadlock(data: dict[str, Any]) -> tuple[list[str], Rows]:
    arms, n = data["arms"], len(data["seeds"])
    first = data["runs"][next(iter(data["runs"]))]
    crit = first["summary"]["monitors"]["deadlock"]["model"]["criterion"]
    lines = [
        f"Every router x balance weight B, {n} seeds, AdamW lr {data['lr']:g}, {first['job']['steps']} steps; B = 0 also "
        "sets the z-loss to 0 (no router loss at all), otherwise z-loss 1e-3. Deadlocked: one expert in >= "
        f"{crit['tau']:.0%} of the tokens' top-2 for >= {crit['patience']} consecutive steps; moeify's criterion also "
        f"needs that expert's mean router probability {crit['prob_tau']:g} of the way from uniform to all of it, "
        "'counts' is the count alone (the paper gives no numeric definition). Locked steps: the share of "
        "layer-steps in which one expert, whichever, was in >= 90% of the top-2, with no patience: it also counts a "
        "layer that sends every token to the same two experts, whose dominant expert flips between them so that no "
        "episode starts. Soft-saturated: `router_entropy`'s event; homogeneous: `expert_homogenization`'s (max "
        "pairwise expert distance < 1e-3 after warmup).",
        "",
        "| arm | layers ever deadlocked (moeify), per seed | layers ever deadlocked (counts), per seed "
        "| episodes ended / all (counts) | locked steps | soft-saturated layers | homogeneous layers | final entropy "
        "| loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        c = a["counts"]
        lines.append(
            f"| {name} | {per_seed(a['ever_deadlocked_fraction'])} | {per_seed(c['ever_deadlocked_fraction'])} "
            f"| {c['recovered']}/{c['episodes']} | {fmt(mean(a['locked_profile_mean']))} "
            f"| {per_seed(a['soft_saturated_layers'], 0)} | {per_seed(a['homogeneous_layers'], 0)} "
            f"| {fmt(a['final_entropy_mean'])} | {fmt(a['loss_mean'], 3)} |"
        )
    rows: Rows = []
    for key, label in ((None, "moeify's criterion"), ("counts", "counts alone")):

        def view(arm: str, key: str | None = key) -> dict[str, Any]:
            return arms[arm][key] if key else arms[arm]

        no_loss = view("mlp/B=0")
        rows.append(
            (
                f"MLP router deadlocks without router losses ({label})",
                "[000]",
                graded(no_loss["seeds_with_deadlock"], n),
                f"mlp, B=0: deadlock in {no_loss['seeds_with_deadlock']}/{n} seeds, layers ever deadlocked "
                f"{per_seed(no_loss['ever_deadlocked_fraction'])} (rule: all seeds = reproduces, some = partly)",
            )
        )
        with_loss = [view(f"mlp/B={b}") for b in ("0.01", "0.1")]
        hits = sum(v["seeds_with_deadlock"] for v in with_loss)
        rows.append(
            (
                f"MLP deadlock is not prevented by a larger auxiliary loss ({label})",
                "[000]",
                graded(hits, 2 * n),
                f"mlp, B=0.01 / 0.1: deadlock in {with_loss[0]['seeds_with_deadlock']}/{n} and "
                f"{with_loss[1]['seeds_with_deadlock']}/{n} seeds, layer fractions "
                f"{per_seed(with_loss[0]['ever_deadlocked_fraction'])} and {per_seed(with_loss[1]['ever_deadlocked_fraction'])} "
                "(paper: about a third of the layers; rule: deadlock in every seed of both = reproduces)",
            )
        )
    ended = {}
    for router in ("cross_attention", "mlp"):
        views = [arms[f"{router}/B={b}"]["counts"] for b in ("0", "0.01", "0.1")]
        ended[router] = (sum(v["recovered"] for v in views), sum(v["episodes"] for v in views))
    (ca_ended, ca_all), (mlp_ended, mlp_all) = ended["cross_attention"], ended["mlp"]
    margin = (ca_ended / ca_all if ca_all else 0.0) - (mlp_ended / mlp_all if mlp_all else 0.0)
    rows.append(
        (
            "Cross-attention routers recover from deadlock more than MLP routers (counts alone)",
            "[000]",
            "not testable here"
            if not ca_all
            else "reproduces"
            if margin >= 0.25
            else "partly"
            if ca_ended
            else "does not reproduce",
            f"deadlock episodes that ended within the run: cross-attention {ca_ended}/{ca_all}, mlp {mlp_ended}/{mlp_all} "
            "(rule: a recovered share at least 0.25 above the MLP's = reproduces; some recovery = partly)",
        )
    )
    linear = arms["linear/B=0.01"]
    soft, homog = sum(linear["soft_saturated_layers"]), sum(linear["homogeneous_layers"])
    layers = len(linear["depth_profile_mean"]) * n
    rows.append(
        (
            "Linear routers: global soft saturation with homogeneous experts",
            "[000]",
            "reproduces" if soft == layers and homog == layers else "partly" if soft or homog else "does not reproduce",
            f"linear, B=0.01: {soft}/{layers} layer-runs soft-saturated, {homog}/{layers} with homogeneous experts; "
            f"smallest max pairwise expert distance {fmt(min(linear['spread_max_min']), 3)} (homogeneous: < 1e-3)",
        )
    )
    rows.append(_u_shape(arms))
    return lines, rows


def _u_shape(arms: dict[str, Any]) -> tuple[str, str, str, str]:
    """Over the runs without router losses (the only ones that lock): the locked-step profile."""
    u = [x for name, a in arms.items() if name.endswith("/B=0") for x in a["locked_u_thirds"] if x is not None]
    claim = "Deadlocked layers form a U over depth (locked steps, no router losses)"
    if not u:
        return (claim, "[000]", "not testable here", "no run locked")
    positive = sum(1 for x in u if x > 0)
    verdict = "does not reproduce" if mean(u) <= 0 else "reproduces" if positive >= 2 * len(u) / 3 else "partly"
    return (
        claim,
        "[000]",
        verdict,
        f"u_thirds (outer minus middle thirds' share of locked steps) over the {len(u)} runs: mean {fmt(mean(u))}, "
        f"> 0 in {positive} (rule: mean <= 0 = does not reproduce; > 0 on average and in two thirds of the runs = "
        "reproduces)",
    )
