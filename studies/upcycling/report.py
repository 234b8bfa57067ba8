"""RESULTS.md and the figures of the upcycling study, written from results/study.json only.

    python studies/upcycling/report.py [--out DIR]     # rebuild from what DIR/results holds

The verdict is computed here by the rule printed beside it: the recommended recipe "beats dense"
when, paired by seed (same batches), its final held-out loss is below the best dense learning
rate's by more than two standard errors of the paired difference, with at least 3 seeds, at equal
FLOPs (within 1%).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import arms

HERE = Path(__file__).resolve().parent
EQUAL_FLOPS = 0.01  # FLOPs per step within 1% of dense: router FLOPs are ~0.1%


def arm_info(study: dict[str, Any], name: str) -> dict[str, Any]:
    """An arm's label, reason and equal_flops flag: from arms.py, the definitions in the repo, where
    it still defines the arm (its wording may have been improved since the run), else as the run
    recorded it in study.json."""
    defined = {arm.name: arm for arm in (arms.DENSE, *arms.ARMS)}.get(name)
    return defined.__dict__ if defined is not None else study["arms"][name]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def at_flops(evals: list[dict[str, Any]], flops: float, key: str = "flops") -> float | None:
    """Held-out loss at `flops` (or at another cumulative `key`: "wall_s"), linearly interpolated
    between evaluations; None outside the run."""
    for a, b in zip(evals, evals[1:]):
        if a[key] <= flops <= b[key]:
            t = (flops - a[key]) / (b[key] - a[key]) if b[key] > a[key] else 0.0
            return a["val_loss"] + t * (b["val_loss"] - a["val_loss"])
    return None


def runs_of(study: dict[str, Any], arm: str, lr: float | None = None) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in study["runs"] if r["arm"] == arm and (lr is None or r["lr"] == lr)}


def paired(study: dict[str, Any], arm: str) -> dict[str, Any] | None:
    """The arm against the best dense lr, paired by seed: differences of final held-out loss, and
    of the loss at the dense run's final FLOPs (for arms with more FLOPs per step)."""
    lr = study["best_dense_lr"]
    dense, other = runs_of(study, "dense", lr), runs_of(study, arm, lr)
    seeds = sorted(set(dense) & set(other))
    if not seeds:
        return None
    final = [other[s]["final_val_loss"] - dense[s]["final_val_loss"] for s in seeds]
    budget = [at_flops(other[s]["evals"], dense[s]["evals"][-1]["flops"]) for s in seeds]
    equal = [b - dense[s]["final_val_loss"] for b, s in zip(budget, seeds) if b is not None]
    timed = [at_flops(other[s]["evals"], dense[s]["evals"][-1]["wall_s"], "wall_s") for s in seeds]
    same_time = [b - dense[s]["final_val_loss"] for b, s in zip(timed, seeds) if b is not None]
    mean, sd = _mean_sd(final)
    return {
        "seeds": seeds,
        "diff_final": final,
        "mean": mean,
        "se": sd / math.sqrt(len(final)) if len(final) > 1 else math.nan,
        "diff_at_dense_flops": statistics.fmean(equal) if equal else None,
        "diff_at_dense_wall": statistics.fmean(same_time) if same_time else None,
    }


def verdict(study: dict[str, Any]) -> tuple[str, str]:
    arm = study["recommended"]
    pair = paired(study, arm)
    runs = runs_of(study, arm, study["best_dense_lr"])
    if pair is None or not runs:
        return "not run", f"{arm} has no runs paired with the best dense lr"
    ratio = max(r["flops_ratio_to_dense"] for r in runs.values())
    n, mean, se = len(pair["seeds"]), pair["mean"], pair["se"]
    rule = f"paired difference {mean:+.4f} ± {se:.4f} (SE, {n} seeds), FLOPs/step {ratio:.4f}x dense"
    if abs(ratio - 1) > EQUAL_FLOPS:
        return "not at equal FLOPs", rule
    if n < 3:
        return "too few seeds", rule
    if mean + 2 * se < 0:
        return "beats dense", rule
    if mean - 2 * se > 0:
        return "worse than dense", rule
    return "no difference beyond seed noise", rule


def specialisation(study: dict[str, Any], arm: str) -> dict[str, float] | None:
    """Mean over the arm's runs at the best dense lr: router entropy first and last, sibling
    distance at init and at the end."""
    spec = [r["specialisation"] for r in runs_of(study, arm, study["best_dense_lr"]).values() if "specialisation" in r]
    if not spec:
        return None
    return {key: statistics.fmean(s[key] for s in spec) if spec[0][key] is not None else None for key in spec[0]}


ENTROPY_MOVED = 0.01  # routers "moved away from uniform": mean normalised entropy down by more than this


def reading(study: dict[str, Any], outcome: str) -> list[str]:
    """What the table says, in sentences computed from it."""
    arm, scale = study["recommended"], study["scale"]
    tokens = scale["batch_size"] * scale["seq_len"] * scale["steps"]
    spec = specialisation(study, arm)
    lines = []
    pair = paired(study, arm)
    candidates = sum(1 for name in study["arms"] if name != "dense" and arm_info(study, name)["equal_flops"])
    per_seed = ", ".join(f"{d:+.4f}" for d in pair["diff_final"]) if pair else "–"
    chosen = (
        f" Per seed: {per_seed}; seed {scale['seeds'][0]} chose it among {candidates} equal-FLOPs arms, the "
        "other seeds test it."
    )
    if outcome == "beats dense":
        lines.append(
            f"The recommended recipe ({arm_info(study, arm)['label']}) beats the best dense learning rate at "
            "equal FLOPs, beyond seed noise, on this study." + chosen
        )
    else:
        lines.append(
            f"No win: at this scale ({tokens:,} training tokens per run) the recommended recipe "
            f"({arm_info(study, arm)['label']}) does not beat the best dense learning rate at equal FLOPs "
            f"({outcome})." + chosen
        )
    best, first = study["best_dense_lr"], scale["seeds"][0]
    dense = runs_of(study, "dense", best).get(first)
    ranked = sorted(
        (r["final_val_loss"] - dense["final_val_loss"], arm_info(study, r["arm"])["label"])
        for r in study["runs"]
        if r["arm"] != "dense" and r["seed"] == first and r["lr"] == best and arm_info(study, r["arm"])["equal_flops"]
    )
    if dense is not None and ranked:
        lines.append(
            f"At equal FLOPs on seed {first}, against dense: "
            + "; ".join(f"{label} {delta:+.4f}" for delta, label in ranked)
            + "."
        )
    if spec is not None:
        moved = spec["router_entropy_first"] - spec["router_entropy_last"]
        verb = "moved away from uniform" if moved > ENTROPY_MOVED else "stayed near uniform"
        lines.append(
            f"Its routers {verb} (normalised entropy {spec['router_entropy_first']:.3f} → "
            f"{spec['router_entropy_last']:.3f}; the rule: a drop of more than {ENTROPY_MOVED})"
            + (
                f"; sibling experts, {spec['sibling_distance_init']:.1e} apart at init, ended "
                f"{spec['sibling_distance_end']:.1e} apart (relative)."
                if spec["sibling_distance_init"] is not None
                else " (one copy in slices: no sibling experts to compare)."
            )
        )
    lines.append(
        'For scale: "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers" (where moeify\'s three '
        f"laws come from) followed routing over 65 million tokens across 5,000 steps, {65e6 / tokens:,.0f}x this "
        "study's tokens per run, and published upcycling gains (Sparse Upcycling, Komatsuzaki et al., ICLR 2023) "
        "come after continued training on billions of tokens. What a 2-core CPU budget can show is what the recipes "
        "do to routing and specialisation in the first steps, not the final answer."
    )
    return lines


def _curves(study: dict[str, Any]) -> dict[str, list[tuple[list[dict[str, Any]], str]]]:
    """Per arm label, the eval lists to average (the best dense lr and the moeify arms at it;
    the other dense lrs on their own)."""
    best = study["best_dense_lr"]
    curves: dict[str, list] = {}
    for r in study["runs"]:
        if r["arm"] == "dense":
            label = f"dense lr {r['lr']:g}" + (" (best)" if r["lr"] == best else "")
        else:
            label = arm_info(study, r["arm"])["label"]
        curves.setdefault(label, []).append(r["evals"])
    return curves


def _mean_curve(evals_runs: list[list[dict[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    n = min(len(e) for e in evals_runs)
    xs = [statistics.fmean(e[i][key] for e in evals_runs) for i in range(n)]
    ys = [statistics.fmean(e[i]["val_loss"] for e in evals_runs) for i in range(n)]
    return xs, ys


def figure(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, all_axes = plt.subplots(1, 4, figsize=(20, 4.4))
    axes, paired_ax = all_axes[:3], all_axes[3]
    for label, evals_runs in _curves(study).items():
        style = "--" if label.startswith("dense") and "best" not in label else "-"
        for ax, key, scale in zip(axes, ("step", "flops", "wall_s"), (1, 1e12, 60)):
            xs, ys = _mean_curve(evals_runs, key)
            ax.plot([x / scale for x in xs], ys, style, marker="o", ms=3, label=f"{label} (n={len(evals_runs)})")
    for ax, xlabel in zip(axes, ("optimizer step", "training FLOPs (×10¹²)", "wall time (min)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    # The differences the verdict is about are a few hundredths: paired by seed, against dense.
    best = study["best_dense_lr"]
    dense = runs_of(study, "dense", best)
    for arm in dict.fromkeys(r["arm"] for r in study["runs"] if r["arm"] != "dense"):
        other = runs_of(study, arm, best)
        seeds = sorted(set(dense) & set(other))
        if not seeds or not arm_info(study, arm)["equal_flops"]:
            continue
        n = min(len(other[s]["evals"]) for s in seeds)
        steps = [other[seeds[0]]["evals"][i]["step"] for i in range(n)]
        diffs = [
            statistics.fmean(other[s]["evals"][i]["val_loss"] - dense[s]["evals"][i]["val_loss"] for s in seeds)
            for i in range(n)
        ]
        paired_ax.plot(steps, diffs, marker="o", ms=3, label=f"{arm_info(study, arm)['label']} (n={len(seeds)})")
    paired_ax.axhline(0.0, color="black", lw=0.8)
    paired_ax.set_ylim(-0.06, 0.06)
    paired_ax.set_xlabel("optimizer step (= FLOPs: equal-FLOPs arms)")
    paired_ax.set_ylabel("held-out loss − dense's, same seed")
    paired_ax.grid(alpha=0.3)
    paired_ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M on pydoc_data: held-out loss (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _arm_rows(study: dict[str, Any]) -> list[str]:
    best = study["best_dense_lr"]
    rows = [
        "| arm | lr (router) | seeds | final held-out loss | Δ vs best dense, paired (SE) | Δ at dense's FLOPs "
        "| Δ at dense's wall time | FLOPs/step ÷ dense | s/step | active params | router entropy first → last "
        "| sibling distance init → end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in study["runs"]:
        groups.setdefault((r["arm"], r["lr"]), []).append(r)
    for (arm, lr), runs in groups.items():
        mean, sd = _mean_sd([r["final_val_loss"] for r in runs])
        pair = paired(study, arm) if arm != "dense" and lr == best else None
        delta = f"{pair['mean']:+.4f} ({_fmt(pair['se'])})" if pair else "–"
        at = f"{pair['diff_at_dense_flops']:+.4f}" if pair and pair["diff_at_dense_flops"] is not None else "–"
        at_wall = f"{pair['diff_at_dense_wall']:+.4f}" if pair and pair["diff_at_dense_wall"] is not None else "–"
        spec = [r.get("specialisation") for r in runs if r.get("specialisation")]
        entropy = (
            f"{statistics.fmean(s['router_entropy_first'] for s in spec):.3f} → "
            f"{statistics.fmean(s['router_entropy_last'] for s in spec):.3f}"
            if spec
            else "–"
        )
        siblings = (
            f"{statistics.fmean(s['sibling_distance_init'] for s in spec):.2e} → "
            f"{statistics.fmean(s['sibling_distance_end'] for s in spec):.2e}"
            if spec and spec[0]["sibling_distance_init"] is not None
            else "–"
        )
        router_lr = runs[0]["router_lr"]
        name = arm_info(study, arm)["label"] + (" **(recommended)**" if arm == study["recommended"] else "")
        rows.append(
            f"| {name} | {lr:g}{f' ({router_lr:g})' if router_lr else ''} | {len(runs)} "
            f"| {mean:.4f}{f' ± {sd:.4f}' if len(runs) > 1 else ''} | {delta} | {at} | {at_wall} "
            f"| {statistics.fmean(r['flops_ratio_to_dense'] for r in runs):.3f} "
            f"| {statistics.fmean(r['s_per_step_median'] for r in runs):.2f} "
            f"| {runs[0]['params']['active_per_token'] / 1e6:.1f}M | {entropy} | {siblings} |"
        )
    return rows


def write(out: Path) -> Path:
    study = json.loads((out / "results" / "study.json").read_text())
    figure(study, out / "results" / "loss.png")
    scale, setup = study["scale"], study["setup"]
    outcome, rule = verdict(study)
    tokens = scale["batch_size"] * scale["seq_len"]
    sweep = study.get("dense_sweep", scale["dense_lrs"])
    lines = [
        "# Upcycling study: dense continued pretraining vs moeify recipes (SmolLM2-135M, pydoc_data)",
        "",
        "Written by `studies/upcycling/report.py` from `results/study.json` (run: `make study-upcycling`); "
        "never edited by hand.",
        "",
        f"**Scale `{scale['name']}`.** {setup['model']}, {scale['layers'] or 30} decoder layers; "
        f"{setup['corpus']} ({setup['corpus_tokens']:,} tokens), {scale['seq_len']}-token blocks, "
        f"{setup['held_out']} held out ({setup['val_blocks_total']} blocks; {scale['val_blocks']} of them, "
        f"evenly spaced, are evaluated every {scale['eval_every']} steps). AdamW (β 0.9, 0.95, no weight decay), "
        f"{scale['warmup']} warm-up steps, gradient clipping 1.0, batch {scale['batch_size']} × "
        f"{scale['seq_len']} = {tokens} tokens, {scale['steps']} steps, float32, {setup['threads']} threads, "
        f"torch {setup['torch']}. Seeds {scale['seeds']}: a seed fixes the batch order (the same for every arm) "
        f"and the routers' init. Dense FLOPs per step (torch FlopCounterMode): "
        f"{setup['dense_flops_per_step'] / 1e9:.1f} GFLOP; a moeify arm adds 6 FLOPs per token per extra "
        f"active parameter. {len(study['runs'])} runs, {study.get('runs_wall_s', 0.0) / 60:.0f} min in all.",
        "",
        f"**Dense learning-rate sweep** (seed {scale['seeds'][0]}): {', '.join(f'{x:g}' for x in sweep)} "
        f"(extended upwards while the best was the largest); best: **{study['best_dense_lr']:g}**"
        f"{' — still the largest tried: the sweep stopped at its limit' if study['best_dense_lr'] == sweep[-1] else ''}, "
        "the learning rate of every arm below (routers may have their own).",
        "",
        *_arm_rows(study),
        "",
        "Arms:",
        "",
        *(
            f"- **{arm_info(study, name)['label']}** (`{name}`): {arm_info(study, name)['why']}."
            for name in study["arms"]
        ),
        "",
        f"**Verdict for the recommended recipe ({study['recommended']}): {outcome}** — {rule}. Rule: "
        '"beats dense" when the paired difference + 2 SE < 0 with ≥ 3 seeds at FLOPs/step within '
        f"{EQUAL_FLOPS:.0%} of dense.",
        "",
        " ".join(reading(study, outcome)),
        "",
        "![held-out loss vs step, FLOPs and wall time](results/loss.png)",
        "",
        "Columns: *Δ at dense's FLOPs* is the arm's held-out loss, interpolated at the FLOPs the dense run "
        "spent in all its steps, minus dense's final loss (for arms that cost more per step it is the "
        "equal-compute comparison); *Δ at dense's wall time* the same at the seconds dense trained for (CPU, "
        "this machine: what a slower step costs; – where the arm finished sooner). *Router entropy* is the `router_entropy` monitor's mean per-token "
        "H(p)/log E over the layers (1 = uniform). *Sibling distance* is the mean ‖W_a − W_b‖/‖W_a‖ between "
        "routed experts that are the same part of the FFN (clones, or the same slice of two copies): "
        "0 at init for clones; it grows only if the routers send the siblings different tokens.",
        "",
    ]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="the folder whose results/ to read")
    print(write(parser.parse_args().out))
