"""Smoke test of the routing study (studies/routing): its quick mode runs every experiment end to
end (a tiny model, a few steps, two seeds) in a subprocess, and the JSON, figures and results page
it writes are checked, with the numbers that do not depend on scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parent.parent / "studies" / "routing"
EXPERIMENTS = ("revival", "deadlock", "ecology", "maturity", "bf16", "pitchfork")
VERDICTS = {"reproduces", "partly", "does not reproduce", "not testable here"}
TIMEOUT_S = 300


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MOEIFY_STUDY_CACHE": str(tmp / "cache"),  # a fresh pretraining cache: nothing stale is reused
    }


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    proc = subprocess.run(
        [sys.executable, str(STUDY / "run.py"), "--quick", "--out", str(out)],
        env=_env(out),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _load(out: Path, name: str) -> dict:
    return json.loads((out / "results" / f"{name}.json").read_text())


@pytest.fixture
def study_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """This study's folder first on sys.path, and its modules imported afresh: the two studies
    (studies/routing, studies/upcycling) both have a `report` module, and the other's may be cached."""
    monkeypatch.syspath_prepend(str(STUDY))
    for path in STUDY.glob("*.py"):
        monkeypatch.delitem(sys.modules, path.stem, raising=False)


def test_every_experiment_writes_its_json_and_figure(quick: Path):
    for name in EXPERIMENTS:
        data = _load(quick, name)
        assert (data["experiment"], data["scale"], data["seeds"]) == (name, "quick", [0, 1])
        assert (quick / "results" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = json.loads((quick / "results" / "timing.json").read_text())
    assert timing["scale"] == "quick" and timing["wall_s"] > 0 and timing["cpu_s"] > 0


def test_results_page_is_rebuilt_from_the_json_alone(quick: Path, study_path: None):
    import report

    page = (quick / "RESULTS.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == 22  # every claim gets a verdict
    assert {row.split("**")[1] for row in rows} <= VERDICTS
    for name in EXPERIMENTS:
        assert f"![{name}](results/{name}.png)" in page
    (quick / "RESULTS.md").unlink()
    report.write(quick)
    assert (quick / "RESULTS.md").read_text() == page


def test_scale_free_numbers(quick: Path):
    bf16 = _load(quick, "bf16")["arms"]
    # lr 1e-5 on bf16 weights of size ~0.1: nearly every expert update rounds away, and every guard keeps them.
    assert min(bf16["bf16"]["lost_fraction_experts"]) >= 0.9
    for guard in ("bf16+fp32_master", "bf16+kahan", "bf16+stochastic_rounding"):
        assert max(bf16[guard]["lost_fraction_experts"]) <= 0.01
    assert bf16["fp32"]["predicted_lost_experts"] == [None, None]
    assert min(bf16["bf16"]["predicted_lost_experts"]) >= 0.9

    sweep = {row["kappa"]: row for row in _load(quick, "pitchfork")["sweep"]}
    assert sweep[2.0]["mean_field_imbalance"] == pytest.approx(0.9575, abs=1e-3)  # x* = 2 tanh x*, |tanh x*|
    assert sweep[0.5]["mean_field_imbalance"] == 0.0 and sweep[0.5]["stable_states"] == 1
    assert sweep[1.5]["stable_states"] == 2
    assert min(sweep[3.0]["discrete_imbalance"]) > 0.95  # far above the pitchfork the rule sits on a branch
    assert max(sweep[0.25]["discrete_imbalance"]) < 0.2

    deadlock = _load(quick, "deadlock")
    assert len(deadlock["arms"]) == 9 and len(deadlock["runs"]) == 18
    for arm in deadlock["arms"].values():
        assert len(arm["depth_profile_mean"]) == 3  # the quick model's 3 blocks
        assert all(0.0 <= f <= 1.0 for f in arm["ever_deadlocked_fraction"])
    maturity = _load(quick, "maturity")
    assert maturity["arms"]["premature"]["matured_layers"] == [3, 3]  # mature from the first step, by construction
    assert maturity["arms"]["noise"]["matured_layers"] == [0, 0]


def test_runs_are_seeded(study_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MOEIFY_STUDY_CACHE", str(tmp_path))
    import exp_deadlock
    import harness

    job = exp_deadlock.job(harness.SCALES["quick"], 1, "mlp", 0.0)
    job["steps"] = 4
    first, second = harness.train_run(job), harness.train_run(job)
    assert first["series"] == second["series"] and first["loss_last_tenth"] == second["loss_last_tenth"]
    other = harness.train_run({**job, "seed": 0})
    assert other["loss_last_tenth"] != first["loss_last_tenth"]


def test_bad_arguments_are_refused(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(STUDY / "run.py"), "--workers", "0", "--out", str(tmp_path)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--workers must be >= 1" in proc.stderr
