"""Dead experts: their revival when the balance pressure rises, and the ecology number E.

Claims under test, from "E = T*H/(O+B): A Dimensionless Control Parameter for Mixture-of-Experts
Ecology": dead experts (no routing for > 100 consecutive batches) can revive, triggered by the
balance loss driving the router to explore again; and E = T*H/(O+B) >= 0.5 (routing temperature
T, entropy weight H, oracle weight O = 0 here, balance weight B) is sufficient for zero dead
experts. moeify counts an expert dead after `dead_after` consecutive optimizer steps with no top-k
assignment (`dead_experts` monitor). Both definitions run side by side: the paper's 100 steps, and
30 steps (`dead_experts_short`), because at this scale zero-token streaks last 20-120 steps
(pilots: mlp router, no router losses, 260 steps, lr 3e-3 and 1e-2, temperatures 0.25-1) and a
100-step death was seen in 2 of 8 such runs.

revival: train without router losses, keep the state with the most (30-step) dead experts seen
in the prefix, and branch it (weights, optimizer, monitor streaks) into: control (no change),
balance (B 0 -> 0.1), bias (auxiliary-loss-free bias balancing, DeepSeek-V3 style) and entropy
(H 0 -> 0.05: E 0 -> inf). Per dead expert: the steps until it gets tokens again; per branch: new
deaths.

ecology: E swept through H at fixed B and T, and E = 0.5 reached through T and through B as well,
so that E's claim to be the one number that matters is tested, not only its threshold.
"""

from __future__ import annotations

from statistics import mean, median
from typing import Any

import harness
from verdicts import Rows, fmt, per_seed

import moeify
from moeify.monitors import ecology_number

LR = 3e-3  # as in the deadlock experiments
ROUTER = "mlp"
BRANCHES: dict[str, dict[str, float]] = {
    "control": {},
    "balance": {"balance_loss_weight": 0.1},
    "bias": {"balance_bias_rate": 1e-3},
    "entropy": {"entropy_loss_weight": 0.05},
}
# name: (T, H, B); O = 0 throughout. B = 0 with H = 0 means no router loss at all (z-loss 0 too).
ECOLOGY_ARMS: dict[str, tuple[float, float, float]] = {
    "E=0 (no losses)": (1.0, 0.0, 0.0),
    "E=0 (H=0)": (1.0, 0.0, 0.01),
    "E=0.5": (1.0, 0.005, 0.01),
    "E=2": (1.0, 0.02, 0.01),
    "E=0.5 (T=4)": (4.0, 0.00125, 0.01),
    "E=0.5 (B=0.001)": (1.0, 0.0005, 0.001),
}


def dead_after(scale: harness.Scale) -> dict[str, int]:
    """Steps without tokens before an expert counts as dead, per monitor."""
    quick = scale.name == "quick"
    return {"dead_experts": 4 if quick else 100, "dead_experts_short": 2 if quick else 30}


def _monitors(scale: harness.Scale) -> list[list]:
    return [
        *([name, {"dead_after": steps}] for name, steps in dead_after(scale).items()),
        ["deadlock", {"patience": 3 if scale.name == "quick" else 50}],
    ]


def revival_job(scale: harness.Scale, seed: int) -> dict[str, Any]:
    return {
        "scale": scale.name,
        "seed": seed,
        "steps": scale.steps["revival_prefix"],
        "branch_steps": scale.steps["revival_branch"],
        "lr": LR,
        "moeify": {"router": ROUTER, "balance_loss_weight": 0.0, "z_loss_weight": 0.0},
        "monitors": _monitors(scale),
        "series": [["dead_experts_short", "dead"]],
    }


def _dead(session: harness.Session) -> harness.ShortDeadExperts:
    return next(m for m in session.runner.monitors if m.name == "dead_experts_short")


def revival_run(job: dict) -> dict[str, Any]:
    """The prefix, keeping a copy of its state whenever it holds more dead experts than ever before;
    then every branch from that copy."""
    prefix = harness.start(job)
    snapshot, most, at = None, 0, 0
    for step in range(1, job["steps"] + 1):
        prefix.train(1)
        if _dead(prefix).num_dead() > most:
            snapshot, most, at = prefix.branch(job["monitors"], "branch"), _dead(prefix).num_dead(), step
    out: dict[str, Any] = {"prefix": harness.report(prefix, job["series"]), "branch_step": at, "branches": {}}
    if snapshot is None:
        out["dead_at_branch"] = {}
        return out
    dead_at_branch = {name: _dead(snapshot).dead_now(name) for name, _ in snapshot.runner.layers}
    out["dead_at_branch"] = {k: v for k, v in dead_at_branch.items() if v}
    for name, settings in BRANCHES.items():
        branch = snapshot.branch(job["monitors"], "branch")
        if settings:
            moeify.set_routing(branch.model, optimizer=branch.optimizer, **settings)  # hooks the bias update
        branch.train(job["branch_steps"])
        result = harness.report(branch, [["dead_experts_short", "dead"]])
        events = [e for e in result["events"] if e["step"] > at and e["monitor"] == "dead_experts_short"]
        revived: dict[tuple[str, int], int] = {}  # each expert dead at the branch: steps to its first tokens
        for e in events:
            if e["kind"] == "revived" and e["expert"] in dead_at_branch.get(e["layer"], []):
                revived.setdefault((e["layer"], e["expert"]), e["step"] - at)
        out["branches"][name] = {
            "settings": settings,
            "revived_after_steps": sorted(revived.values()),
            "not_revived": sum(len(v) for v in dead_at_branch.values()) - len(revived),
            "new_deaths": sum(1 for e in events if e["kind"] == "dead"),
            "dead_at_end": result["summary"]["monitors"]["dead_experts_short"]["dead_now"],
            "dead_series": result["series"]["dead_experts_short.dead"].get("model", []),
            "loss_last_tenth": result["loss_last_tenth"],
        }
    return out


def revival(ctx: Any) -> dict[str, Any]:
    scale = ctx.scale
    jobs = [revival_job(scale, seed) for seed in scale.seeds]
    results = ctx.map(revival_run, jobs, "revival")
    runs = {f"seed={job['seed']}": {"job": job, **result} for job, result in zip(jobs, results)}
    branches = {}
    for name in BRANCHES:
        rows = [r["branches"][name] for r in results if r["branches"]]
        revived = [s for row in rows for s in row["revived_after_steps"]]
        branches[name] = {
            "settings": BRANCHES[name],
            "dead_at_branch": sum(sum(len(v) for v in r["dead_at_branch"].values()) for r in results),
            "revived": len(revived),
            "revived_after_steps_median": median(revived) if revived else None,
            "revived_after_steps_range": [min(revived), max(revived)] if revived else None,
            "not_revived": sum(row["not_revived"] for row in rows),
            "new_deaths": sum(row["new_deaths"] for row in rows),
            "dead_at_end": [row["dead_at_end"] for row in rows],
        }
    return {
        "router": ROUTER,
        "lr": LR,
        "dead_after": dead_after(scale)["dead_experts_short"],
        "prefix_steps": scale.steps["revival_prefix"],
        "branch_steps": scale.steps["revival_branch"],
        "branch_steps_at": [r["branch_step"] for r in results],
        "branches": branches,
        "runs": runs,
    }


def ecology_job(scale: harness.Scale, seed: int, temperature: float, entropy: float, balance: float) -> dict[str, Any]:
    options = {"router": ROUTER, "balance_loss_weight": balance, "z_loss_weight": 1e-3 if balance or entropy else 0.0}
    if temperature != 1.0:
        options["router_temperature"] = temperature
    if entropy:
        options["entropy_loss_weight"] = entropy
    return {
        "scale": scale.name,
        "seed": seed,
        "steps": scale.steps["ecology"],
        "lr": LR,
        "moeify": options,
        "monitors": _monitors(scale),
        "series": [["dead_experts_short", "dead"]],
    }


def _dead_numbers(summaries: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {
        "dead_at_end": [d["dead_now"] for d in summaries],
        "ever_dead": [sum(len(v["ever_dead"]) for v in d["layers"].values()) for d in summaries],
    }


def ecology(ctx: Any) -> dict[str, Any]:
    scale = ctx.scale
    jobs = {
        f"{arm}/seed={seed}": ecology_job(scale, seed, *terms)
        for arm, terms in ECOLOGY_ARMS.items()
        for seed in scale.seeds
    }
    keys = list(jobs)
    results = dict(zip(keys, ctx.map(harness.train_run, [jobs[k] for k in keys], "ecology")))
    arms = {}
    for arm, (t, h, b) in ECOLOGY_ARMS.items():
        rows = [results[f"{arm}/seed={s}"] for s in scale.seeds]
        paper = [r["summary"]["monitors"]["dead_experts"] for r in rows]
        short = [r["summary"]["monitors"]["dead_experts_short"] for r in rows]
        arms[arm] = {
            "T": t,
            "H": h,
            "B": b,
            "O": 0.0,
            "E": ecology_number(t, h, 0.0, b),
            **_dead_numbers(paper),
            "short": _dead_numbers(short),
            "longest_zero_steps": [max(v["longest_zero_steps"] for v in d["layers"].values()) for d in paper],
            "loss": [r["loss_last_tenth"] for r in rows],
            "loss_mean": mean(r["loss_last_tenth"] for r in rows),
        }
    runs = {
        k: {"job": jobs[k], "summary": r["summary"], "series": r["series"], "cpu_s": r["cpu_s"]}
        for k, r in results.items()
    }
    return {"router": ROUTER, "lr": LR, "dead_after": dead_after(scale), "arms": arms, "runs": runs}


def render_revival(data: dict[str, Any]) -> tuple[list[str], Rows]:
    branches = data["branches"]
    lines = [
        f"{data['router']} router, no router losses, lr {data['lr']:g}: a prefix of {data['prefix_steps']} steps, from "
        f"whose state with the most dead experts (steps {per_seed(data['branch_steps_at'], 0)}, per seed) each branch "
        f"continues for {data['branch_steps']} steps on the same batches. Dead: no top-2 assignment for "
        f"{data['dead_after']} consecutive steps (the paper's 100 is reached too rarely at this scale, see section 4).",
        "",
        "| branch | change | dead at branch (all seeds) | revived | steps to revive (median, range) | never revived "
        "| new deaths | dead at end, per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in branches.items():
        change = ", ".join(f"{k}={v:g}" for k, v in b["settings"].items()) or "none"
        span = b["revived_after_steps_range"]
        lines.append(
            f"| {name} | {change} | {b['dead_at_branch']} | {b['revived']} | {fmt(b['revived_after_steps_median'], 0)} "
            f"{span if span else ''} | {b['not_revived']} | {b['new_deaths']} | {per_seed(b['dead_at_end'], 0)} |"
        )
    control, balance = branches["control"], branches["balance"]
    claim = "Dead experts revive when the balance loss drives re-exploration"
    if not control["dead_at_branch"]:
        return lines, [(claim, "[001]", "not testable here", f"no expert died within {data['prefix_steps']} steps")]
    quicker = (balance["revived_after_steps_median"] or 0) < (control["revived_after_steps_median"] or 0)
    faster = balance["revived"] == balance["dead_at_branch"] and (
        control["revived"] < control["dead_at_branch"] or quicker
    )
    return lines, [
        (
            claim,
            "[001]",
            "reproduces" if faster else "partly" if balance["revived"] else "does not reproduce",
            f"B 0 -> 0.1: {balance['revived']}/{balance['dead_at_branch']} revived, median "
            f"{fmt(balance['revived_after_steps_median'], 0)} steps, {balance['new_deaths']} new deaths; control: "
            f"{control['revived']}/{control['dead_at_branch']}, median {fmt(control['revived_after_steps_median'], 0)}, "
            f"{control['new_deaths']} new deaths (rule: all revive, and sooner or more than in the control = reproduces)",
        )
    ]


def render_ecology(data: dict[str, Any]) -> tuple[list[str], Rows]:
    arms, after = data["arms"], data["dead_after"]
    lines = [
        f"{data['router']} router, lr {data['lr']:g}, z-loss 1e-3 (0 with no router loss), O = 0. E = T*H/(O+B) through H "
        "at B = 0.01, and E = 0.5 reached three ways (H, T, B) to test whether E alone decides. Experts ever dead, "
        f"summed over layers: after {after['dead_experts']} steps without tokens (the paper's definition) and after "
        f"{after['dead_experts_short']}.",
        "",
        f"| arm | T | H | B | E | ever dead ({after['dead_experts']} steps), per seed | ever dead "
        f"({after['dead_experts_short']} steps) | longest zero-token streak | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        lines.append(
            f"| {arm} | {a['T']:g} | {a['H']:g} | {a['B']:g} | {fmt(a['E'])} | {per_seed(a['ever_dead'], 0)} "
            f"| {per_seed(a['short']['ever_dead'], 0)} | {per_seed(a['longest_zero_steps'], 0)} | {fmt(a['loss_mean'], 3)} |"
        )
    high = [a for a in arms.values() if a["E"] >= 0.5]
    low = [a for a in arms.values() if a["E"] < 0.5 and a["B"] > 0]
    none = [a for a in arms.values() if a["B"] == 0 and a["H"] == 0]

    def deaths(group: list[dict[str, Any]], key: str | None = None) -> int:
        return sum(sum((a[key] if key else a)["ever_dead"]) for a in group)

    rows: Rows = [
        (
            "E >= 0.5 is sufficient for zero dead experts",
            "[001]",
            "reproduces" if deaths(high) == 0 else "does not reproduce",
            f"experts ever dead in the {len(high)} arms with E >= 0.5: {deaths(high)} (paper's definition; "
            f"{deaths(high, 'short')} at {after['dead_experts_short']} steps); with E < 0.5 and a balance loss: "
            f"{deaths(low)} ({deaths(low, 'short')}) (rule: none at E >= 0.5 = reproduces)",
        )
    ]
    rows.append(
        (
            "E predicts dead experts: they appear below E = 0.5",
            "[001]",
            "reproduces" if deaths(low) else "partly" if deaths(low, "short") else "does not reproduce",
            f"experts ever dead at E < 0.5 with a balance loss: {deaths(low)} ({deaths(low, 'short')} at "
            f"{after['dead_experts_short']} steps); with no router loss at all (E = 0 by convention): {deaths(none)} "
            f"({deaths(none, 'short')}) (rule: some at the paper's definition = reproduces, only at "
            f"{after['dead_experts_short']} steps = partly)",
        )
    )
    same = {name: a["longest_zero_steps"] for name, a in arms.items() if a["E"] == 0.5}
    spans = sorted((min(v), max(v)) for v in same.values())
    apart = any(x[1] < y[0] for x, y in zip(spans, spans[1:]))
    rows.append(
        (
            "E alone decides the ecology (same E, same dynamics)",
            "[001]",
            "does not reproduce" if apart else "reproduces",
            "longest zero-token streak at E = 0.5: "
            + "; ".join(f"{name} {per_seed(v, 0)}" for name, v in same.items())
            + " (rule: per-seed ranges that do not overlap = E does not decide)",
        )
    )
    return lines, rows
