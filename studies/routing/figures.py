"""The study's figures, drawn from the results JSON (matplotlib, Agg). Each function writes one PNG
and returns its file name."""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib
from exp_pitchfork import mean_field_imbalance

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def deadlock(data: dict[str, Any], out: Path) -> str:
    """Per arm and depth: deadlocked steps (counts alone) and locked steps; one run's dominance."""
    arms = list(data["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        (axes[0], [data["arms"][a]["counts"]["depth_profile_mean"] for a in arms], "deadlocked steps (counts alone)"),
        (axes[1], [data["arms"][a]["locked_profile_mean"] for a in arms], "locked steps (any expert >= 90% of top-2)"),
    )
    for ax, grid, title in panels:
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set(yticks=range(len(arms)), yticklabels=arms, xlabel="depth (MoE layer)", title=title)
        fig.colorbar(image, ax=ax, fraction=0.04)
    ax = axes[2]
    run = data["runs"][f"mlp/B=0/seed={data['seeds'][0]}"]["series"]["deadlock.dominance"]
    for name in (k for k in run if k != "steps"):
        ax.plot(run["steps"], run[name], label=name, linewidth=1)
    ax.axhline(0.9, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="step", ylabel="k x top share of dominant expert", title=f"mlp, B=0, seed {data['seeds'][0]}")
    ax.legend(fontsize=7)
    return _save(fig, out, "deadlock.png")


def maturity(data: dict[str, Any], out: Path) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    arms = list(data["arms"])
    for offset, key, label in ((-0.2, None, "counts and probability"), (0.2, "counts", "counts alone")):
        values = [(data["arms"][a][key] if key else data["arms"][a])["ever_deadlocked_fraction"] for a in arms]
        left.bar([i + offset for i in range(len(arms))], [mean(v) for v in values], width=0.4, label=label)
        for i, v in enumerate(values):
            left.plot([i + offset] * len(v), v, "k.", markersize=4)
    left.set(
        xticks=range(len(arms)),
        xticklabels=arms,
        ylabel="layers ever deadlocked (fraction)",
        title=f"{data['router']} router, no router losses",
    )
    left.legend(fontsize=8)
    run = data["runs"][f"noise/seed={data['seeds'][0]}"]["series"]["shared_maturity.ratio"]
    for name in (k for k in run if k != "steps"):
        right.plot(run["steps"], run[name], linewidth=1, label=name)
    right.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    right.set(xlabel="step", ylabel="||shared|| / ||routed||", title="shared expert maturity (noise init, seed 0)")
    right.legend(fontsize=7)
    return _save(fig, out, "maturity.png")


def bf16(data: dict[str, Any], out: Path) -> str:
    arms = list(data["arms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    lost = [data["arms"][a]["lost_fraction_experts"] for a in arms]
    left.bar(range(len(arms)), [mean(v) for v in lost], color="tab:red")
    left.set(xticks=range(len(arms)), ylabel="expert updates lost (fraction)", title=f"lost updates, lr {data['lr']:g}")
    left.set_xticklabels(arms, rotation=20, fontsize=8)
    spread = [[max(s, 1e-12) for s in data["arms"][a]["spread_max_mean"]] for a in arms]
    right.bar(range(len(arms)), [mean(v) for v in spread], color="tab:blue")
    right.set_yscale("log")
    right.axhline(1e-3, color="gray", linestyle="--", linewidth=0.8)
    right.set(
        xticks=range(len(arms)),
        ylabel="max pairwise expert distance (relative)",
        title="expert spread at the end (1e-12 = identical)",
    )
    right.set_xticklabels(arms, rotation=20, fontsize=8)
    return _save(fig, out, "bf16.png")


def revival(data: dict[str, Any], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in data["branches"]:
        curves = [run["branches"][name]["dead_series"] for run in data["runs"].values() if run["branches"]]
        length = min((len(c) for c in curves), default=0)
        ax.plot(range(1, length + 1), [mean(c[i] for c in curves) for i in range(length)], label=name)
    ax.set(
        xlabel="steps after the branch",
        ylabel="dead experts (mean over seeds)",
        title=f"revival: {data['router']} router, dead = no tokens for {data['dead_after']} steps",
    )
    ax.legend()
    return _save(fig, out, "revival.png")


def ecology(data: dict[str, Any], out: Path) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    arms = list(data["arms"])
    for i, arm in enumerate(arms):
        entry = data["arms"][arm]
        left.plot([i] * len(entry["short"]["ever_dead"]), entry["short"]["ever_dead"], "o", alpha=0.7)
        right.plot([i] * len(entry["longest_zero_steps"]), entry["longest_zero_steps"], "o", alpha=0.7)
    short = data["dead_after"]["dead_experts_short"]
    for ax, label in (
        (left, f"experts ever dead ({short} steps, all layers)"),
        (right, "longest zero-token streak (steps)"),
    ):
        ax.set(xticks=range(len(arms)), ylabel=label)
        ax.set_xticklabels(arms, rotation=25, fontsize=8)
    for steps in data["dead_after"].values():
        right.axhline(steps, color="gray", linestyle="--", linewidth=0.8)
    left.set_title("E = T*H/(O+B) sweep")
    return _save(fig, out, "ecology.png")


def pitchfork(data: dict[str, Any], out: Path) -> str:
    has_hat = bool(data.get("kappa_hat"))
    fig, axes = plt.subplots(1, 2 if has_hat else 1, figsize=(12 if has_hat else 6, 4), squeeze=False)
    ax = axes[0][0]
    sweep = data["sweep"]
    fine = [0.05 * i for i in range(1, 65)]
    ax.plot(fine, [mean_field_imbalance(k) for k in fine], "k-", label="mean field (stable)")
    for row in sweep:
        ax.plot([row["kappa"]] * len(row["discrete_imbalance"]), row["discrete_imbalance"], "r.", markersize=5)
    ax.plot([], [], "r.", label="discrete rule, one point per seed")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="feedback strength kappa", ylabel="|2 p - 1| (load imbalance)", title="pitchfork at a = 0")
    ax.legend(fontsize=8)
    if has_hat:
        ax = axes[0][1]
        for row in data["kappa_hat"]:
            for est in row["estimates"]:
                ax.errorbar(
                    row["kappa"],
                    est["kappa_hat"],
                    yerr=[[est["kappa_hat"] - est["low"]], [est["high"] - est["kappa_hat"]]],
                    fmt="o",
                    color="tab:blue",
                    alpha=0.6,
                    capsize=2,
                )
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set(xlabel="kappa set", ylabel="kappa_hat (95% interval)", title="kappa_hat from relaxation (discrete rule)")
    return _save(fig, out, "pitchfork.png")


def remedies(data: dict[str, Any], out: Path) -> str:
    arms = data["arms"]
    names = list(arms)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in [
        (axes[0], "deadlocked_step_fraction", "deadlocked layer-steps (counts)"),
        (axes[1], "dead_expert_steps", "dead expert-steps (30-step definition)"),
    ]:
        ax.bar(names, [mean(arms[n][key]) for n in names])
        for i, n in enumerate(names):
            ax.scatter([i] * len(arms[n][key]), arms[n][key], color="black", s=10, zorder=3)
        ax.set(ylabel=label, title=f"{label}: mean and seeds")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return _save(fig, out, "remedies.png")


FIGURES = {
    "deadlock": deadlock,
    "maturity": maturity,
    "bf16": bf16,
    "revival": revival,
    "ecology": ecology,
    "pitchfork": pitchfork,
    "remedies": remedies,
}
