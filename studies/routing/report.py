"""RESULTS.md and the figures, written from results/*.json only (never by hand).

    python studies/routing/report.py [--out DIR]     # rebuild from what DIR/results holds

Every verdict is computed here from the numbers, by the rule printed next to it, so the page says
what the data says: "reproduces", "partly", "does not reproduce", or "not testable here" when the
precondition (e.g. some expert dying) never occurred at this scale.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import exp_bf16
import exp_deadlock
import exp_ecology
import exp_maturity
import exp_pitchfork
import exp_remedies
import figures
from verdicts import Rows

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Section:
    title: str
    render: Callable[[dict[str, Any]], tuple[list[str], Rows]]


SECTIONS = {
    "deadlock": Section(
        "1. Deadlock by router and balance weight, and its depth profile", exp_deadlock.render_deadlock
    ),
    "bf16": Section("2. bf16 storage: lost updates, homogenization, and the guards", exp_bf16.render),
    "revival": Section("3. Dead experts and their revival", exp_ecology.render_revival),
    "ecology": Section("4. The ecology number E and dead experts", exp_ecology.render_ecology),
    "maturity": Section(
        "5. Shared-expert maturity and deadlock (Functional Redundancy Hypothesis)", exp_maturity.render_maturity
    ),
    "pitchfork": Section("6. The mean-field pitchfork and kappa_hat", exp_pitchfork.render),
    "remedies": Section("7. moeify's remedies against deadlock and dead experts", exp_remedies.render),
}


def load(results: Path) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}


def _setup(data: dict[str, dict[str, Any]]) -> list[str]:
    import harness

    any_run = next((d for name, d in data.items() if name != "timing"), None)
    scale = harness.SCALES[any_run["scale"]] if any_run else harness.SCALES["full"]
    shape = scale.shape
    lines = [
        "## Setup",
        "",
        f"- Model: a text-conditioned DiT-like denoiser (`model.py`): {shape.depth} blocks of self-attention, "
        f"cross-attention to a 3-token caption and an FFN ({shape.dim} -> {shape.ffn} -> {shape.dim}, GELU), "
        "adaLN from the timestep; 16 latent tokens of 8 channels.",
        "- Task: synthetic captioned latents (8 objects x 4 colours x 4 places), noise prediction under a "
        "cosine schedule.",
        f"- Dense pretraining: {scale.pretrain_steps} AdamW steps at lr {scale.pretrain_lr:g}, batch {scale.batch}, "
        "once per seed (cached).",
        "- Conversion: `moeify.moeify(model, num_experts=8, top_k=2, num_shared_experts=1)` on every block's FFN, "
        "shared init `noise` (the paper's), router and seed as stated per experiment; checked against the dense "
        "model on one batch.",
        f"- Seeds: {', '.join(str(s) for s in scale.seeds)} (pretraining, router init and data stream); within a "
        "seed every arm starts from the same weights and sees the same batches.",
    ]
    timing = data.get("timing")
    if timing and "dense_loss" in timing:
        lines.append(
            "- Dense denoising loss at the end of pretraining (mean of its last tenth), per seed: "
            + " / ".join(f"{v:.3f}" for v in timing["dense_loss"].values())
            + "; the MoE losses in the tables are the same measure over each run's last tenth."
        )
    if timing:
        lines.append(
            f"- Last full run: {timing['wall_s'] / 60:.1f} min wall on {timing['workers']} worker processes "
            f"(scale `{timing['scale']}`), {timing.get('cpu_s', 0) / 60:.1f} CPU-min of training."
        )
    return lines + [""]


def write(out: Path) -> Path:
    """Figures into OUT/results, the page at OUT/RESULTS.md; returns the page's path."""
    results = out / "results"
    data = load(results)
    body: list[str] = []
    verdicts: list[tuple[str, str, str, str]] = []
    for name, section in SECTIONS.items():
        if name not in data:
            body += [f"## {section.title}", "", "Not run yet (`run.py --only " + name + "`).", ""]
            continue
        figure = figures.FIGURES[name](data[name], results)
        text, rows = section.render(data[name])
        body += [f"## {section.title}", "", *text, "", f"![{name}](results/{figure})", ""]
        verdicts += rows
    head = [
        "# Routing phenomena of the papers, reproduced at small scale",
        "",
        "Written by `studies/routing/report.py` from `results/*.json` (`make study` reruns everything); "
        "do not edit by hand. A tiny model on a synthetic task is not a 5B video DiT: a claim that does not "
        "reproduce here is not refuted at scale, and one that does is only shown to need no scale.",
        "",
        *_setup(data),
        "## Verdicts",
        "",
        "| claim | source | verdict | evidence |",
        "|---|---|---|---|",
        *[f"| {claim} | {source} | **{verdict}** | {evidence} |" for claim, source, verdict, evidence in verdicts],
        "",
        'Sources: [000] "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers: Diagnosis, Boundary '
        'Calibration and Evolutionary Roadmap from Routing Collapse to Selective Deadlock"; [001] "E = T*H/(O+B): '
        'A Dimensionless Control Parameter for Mixture-of-Experts Ecology"; [002] "A Minimal Bifurcation Model of '
        'Load Imbalance in a Softmax Mixture-of-Experts Router".',
        "",
    ]
    page = out / "RESULTS.md"
    page.write_text("\n".join(head + body).rstrip() + "\n")
    return page


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    print(write(parser.parse_args().out))
