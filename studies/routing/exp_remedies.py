"""moeify's remedies (moeify.control.remedies), measured where the failures they answer arise: an
MLP router with no router losses (section 1: deadlock by counts in every seed; section 3: experts
that go without tokens).

Arms, each from the same converted model, router init and batches per seed:
  control          monitors only
  break_deadlock   on "deadlocked" (counts alone, the criterion that fires here): the layer's
                   balance weight 0 -> 0.1 for 20 steps
  revive_balance   on "dead" (30 steps without tokens): the layer's balance weight -> 0.1 for 20 steps
  revive_reinit    on "dead": the dead expert's router rows re-drawn
  shared_warmup    routers frozen until the layer's shared expert matures, 100 steps at most
"""

from __future__ import annotations

from statistics import mean
from typing import Any

import exp_deadlock
import harness
from verdicts import Rows, fmt, per_seed

LR = exp_deadlock.LR
ROUTER = "mlp"
ARMS: dict[str, list[list]] = {
    "control": [],
    "break_deadlock": [["break_deadlock", {"action": "balance", "value": 0.1, "duration": 20}]],
    "revive_balance": [["revive_dead_experts", {"action": "balance", "value": 0.1, "duration": 20}]],
    "revive_reinit": [["revive_dead_experts", {"action": "reinit_router"}]],
    "shared_warmup": [["shared_warmup", {"max_steps": 100}]],
}


def monitors(scale: harness.Scale, remedy: list[list]) -> list[list]:
    short = scale.name == "quick"
    # The remedies act on the events of `deadlock_counts` (kind "deadlocked") and of the 30-step
    # dead-expert view (kind "dead"); `deadlock` and `dead_experts` are what they require by name.
    return [
        ["deadlock", {"patience": 3 if short else 50}],
        ["deadlock_counts", {"patience": 3 if short else 50, "prob_tau": None}],
        ["dead_experts", {"dead_after": 4 if short else 100}],
        ["dead_experts_short", {"dead_after": 3 if short else 30}],
        ["shared_maturity", {"deadlock": "deadlock_counts"}],
        *remedy,
    ]


def job(scale: harness.Scale, seed: int, arm: str) -> dict[str, Any]:
    return {
        "scale": scale.name,
        "seed": seed,
        "steps": scale.steps["deadlock"],
        "lr": LR,
        "moeify": {"router": ROUTER, "balance_loss_weight": 0.0, "z_loss_weight": 0.0},
        "monitors": monitors(scale, ARMS[arm]),
        "series": [["dead_experts_short", "dead"]],
    }


def run_numbers(result: dict[str, Any]) -> dict[str, Any]:
    mons = result["summary"]["monitors"]
    counts = exp_deadlock.deadlock_numbers(mons["deadlock_counts"])
    locked = exp_deadlock.locked_fraction(mons["deadlock_counts"])
    dead = result["series"]["dead_experts_short.dead"].get("model", [])
    events = result["events"]
    return {
        "ever_deadlocked_fraction": counts["ever_deadlocked_fraction"],
        "deadlocked_step_fraction": mean(counts["deadlocked_step_fraction"]),
        "locked_step_fraction": mean(locked),
        "dead_expert_steps": sum(v or 0 for v in dead),
        "deaths": sum(1 for e in events if e["kind"] == "dead" and e["monitor"] == "dead_experts_short"),
        "actions": sum(1 for e in events if e["kind"] == "remedy_applied"),
        "releases": sum(1 for e in events if e["kind"] == "remedy_ended"),
        "loss": result["loss_last_tenth"],
    }


def remedies(ctx: Any) -> dict[str, Any]:
    scale = ctx.scale
    jobs = {f"{arm}/seed={seed}": job(scale, seed, arm) for arm in ARMS for seed in scale.seeds}
    keys = list(jobs)
    results = dict(zip(keys, ctx.map(harness.train_run, [jobs[k] for k in keys], "remedies")))
    runs = {k: {"job": jobs[k], "numbers": run_numbers(r), "cpu_s": r["cpu_s"]} for k, r in results.items()}
    arms = {
        arm: {
            key: [runs[f"{arm}/seed={s}"]["numbers"][key] for s in scale.seeds]
            for key in runs[f"{arm}/seed={scale.seeds[0]}"]["numbers"]
        }
        for arm in ARMS
    }
    return {
        "router": ROUTER,
        "lr": LR,
        "steps": scale.steps["deadlock"],
        "seeds": list(scale.seeds),
        "arms": arms,
        "runs": runs,
    }


def render(data: dict[str, Any]) -> tuple[list[str], Rows]:
    arms = data["arms"]
    lines = [
        f"{data['router']} router, no router losses, AdamW lr {data['lr']:g}, {data['steps']} steps, "
        f"{len(data['seeds'])} seeds. Deadlock by counts alone (one expert in >= 90% of the top-2 for >= 50 steps); "
        "locked steps as in section 1; dead: 30 steps without tokens. Remedies act on those events (break_deadlock, "
        "revive_*: balance weight 0 -> 0.1 for 20 steps, or the dead expert's router rows re-drawn) or freeze the "
        "routers until the shared expert matures (shared_warmup, 100 steps at most: part of its effect is only that "
        "the routers move for fewer steps; its actions are releases, not counted here).",
        "",
        "| arm | remedy actions | layers ever deadlocked | deadlocked layer-steps | locked layer-steps | deaths (30 steps) "
        "| dead expert-steps | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        lines.append(
            f"| {name} | {per_seed(a['actions'], 0)} | {per_seed(a['ever_deadlocked_fraction'])} | "
            f"{per_seed(a['deadlocked_step_fraction'])} | {per_seed(a['locked_step_fraction'])} | {per_seed(a['deaths'], 0)} "
            f"| {per_seed(a['dead_expert_steps'], 0)} | {fmt(mean(a['loss']), 3)} |"
        )
    control = arms["control"]

    def fewer(arm: str, key: str) -> tuple[int, int]:
        pairs = list(zip(arms[arm][key], control[key]))
        return sum(1 for x, c in pairs if x < c), sum(1 for _, c in pairs if c > 0)

    rows: Rows = []
    for arm, key, claim in [
        ("break_deadlock", "deadlocked_step_fraction", "break_deadlock shortens deadlock"),
        ("revive_balance", "dead_expert_steps", "revive_dead_experts (balance boost) cuts dead expert-steps"),
        ("revive_reinit", "dead_expert_steps", "revive_dead_experts (router re-draw) cuts dead expert-steps"),
        (
            "shared_warmup",
            "deadlocked_step_fraction",
            "shared_warmup (routers wait for the shared expert) reduces deadlock",
        ),
    ]:
        hits, total = fewer(arm, key)
        digits = 0 if key == "dead_expert_steps" else 2
        verdict = (
            "not testable here"
            if not total
            else "reproduces"
            if hits == total
            else "partly"
            if hits
            else "does not reproduce"
        )
        rows.append(
            (
                claim,
                "moeify",
                verdict,
                f"{key.replace('_', ' ')} per seed {per_seed(arms[arm][key], digits)} vs control "
                f"{per_seed(control[key], digits)}: lower in "
                f"{hits}/{total} seeds where the control had any (rule: all = reproduces, some = partly)",
            )
        )
    return lines, rows
