"""The upcycling study (studies/upcycling): its quick mode runs every arm end to end on the real
SmolLM2 checkpoint cut to 2 layers, in a subprocess; the JSON, figure and page it writes are
checked with the numbers that do not depend on scale. The verdict rule is tested on its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parent.parent / "studies" / "upcycling"
TIMEOUT_S = 400

pytest.importorskip("gguf", reason="the study's extra: pip install gguf (make test installs it)")


@pytest.fixture
def study_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """This study's folder first on sys.path, and its modules imported afresh: the two studies
    (studies/routing, studies/upcycling) both have a `report` module, and the other's may be cached."""
    monkeypatch.syspath_prepend(str(STUDY))
    for path in STUDY.glob("*.py"):
        monkeypatch.delitem(sys.modules, path.stem, raising=False)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("upcycling")
    proc = subprocess.run(
        [sys.executable, str(STUDY / "run.py"), "--quick", "--out", str(out)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "MOEIFY_STUDY_CACHE": str(out / "cache")},  # GGUF → HF dir, fresh
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _study(out: Path) -> dict:
    return json.loads((out / "results" / "study.json").read_text())


def test_every_arm_runs_with_the_seeds_it_asks_for(quick: Path, study_path: None) -> None:
    import arms

    study = _study(quick)
    lr = study["best_dense_lr"]
    assert (
        lr
        == min((r for r in study["runs"] if r["arm"] == "dense" and r["seed"] == 0), key=lambda r: r["final_val_loss"])[
            "lr"
        ]
    )
    seen = {(r["arm"], r["lr"], r["seed"]) for r in study["runs"]}
    sweep = study["dense_sweep"]  # the scale's sweep, extended upwards while its best was the largest
    assert sweep[: len(arms.QUICK.dense_lrs)] == list(arms.QUICK.dense_lrs) and lr in sweep
    assert lr != sweep[-1] or len(sweep) == len(arms.QUICK.dense_lrs) + 2
    expected = {("dense", x, 0) for x in sweep} | {("dense", lr, s) for s in arms.QUICK.seeds}
    chosen = study["recommended"]
    assert chosen == arms.recommended(study["runs"], lr, 0)  # the equal-FLOPs arm best on seed 0
    assert study["arms"][chosen]["equal_flops"]
    for arm in arms.ARMS:
        expected |= {(arm.name, lr, s) for s in (arms.QUICK.seeds if arm.name == chosen else arms.QUICK.seeds[:1])}
    assert seen == expected and len(study["runs"]) == len(expected)
    for run in study["runs"]:
        steps = [e["step"] for e in run["evals"]]
        assert steps == [0, 2, 4] and len(run["train_loss"]) == arms.QUICK.steps
        assert all(math.isfinite(e["val_loss"]) for e in run["evals"])


def test_conversion_keeps_the_dense_function_on_the_real_checkpoint(quick: Path) -> None:
    """Step 0's held-out loss is the dense model's for every recipe that keeps the function (the
    three laws); Drop-Upcycling departs by design and says by how much."""
    study = _study(quick)
    dense0 = study["runs"][0]["evals"][0]["val_loss"]
    for run in study["runs"]:
        start = run["evals"][0]["val_loss"]
        if run["arm"] == "fine_router_lr_drop":
            assert run["init_deviation_max"] > 0.01 and abs(start - dense0) > 1e-3
        else:
            assert abs(start - dense0) < 1e-4 * dense0, run["arm"]


def test_flops_follow_the_active_parameters(quick: Path) -> None:
    """The dense count (FlopCounterMode) is 6 FLOPs per parameter per token (attention's score
    products add < 1% at 32 tokens); equal-FLOPs arms stay within 0.1% of it (their routers)."""
    study = _study(quick)
    dense = study["runs"][0]
    tokens = dense["tokens_per_step"]
    assert dense["flops_per_step"] == study["setup"]["dense_flops_per_step"]
    assert dense["flops_per_step"] == pytest.approx(6 * dense["params"]["active_per_token"] * tokens, rel=0.01)
    for run in study["runs"]:
        extra = 6 * tokens * (run["params"]["active_per_token"] - dense["params"]["active_per_token"])
        assert run["flops_per_step"] == dense["flops_per_step"] + extra
        if study["arms"][run["arm"]]["equal_flops"]:
            assert 1.0 <= run["flops_ratio_to_dense"] < 1.001
    clone = next(r for r in study["runs"] if r["arm"] == "clone_top2_shared")
    assert clone["flops_ratio_to_dense"] > 1.2  # 2 of 4 clones + a shared expert: 3 FFNs per token


def test_siblings_start_identical_and_routers_start_uniform(quick: Path) -> None:
    study = _study(quick)
    for run in study["runs"]:
        spec = run.get("specialisation")
        if spec is None:
            assert run["arm"] == "dense"
            continue
        assert 0.99 < spec["router_entropy_first"] <= 1.0 + 1e-6  # random routers: near-uniform (fp32 rounding)
        if run["arm"] == "fine_router_lr_drop":
            assert spec["sibling_distance_init"] > 0.1  # re-initialised neurons differ between copies
        elif run["arm"] == "slices_top4":  # one copy cut in slices: no two experts are the same part
            assert spec["sibling_distance_init"] is None and spec["sibling_distance_end"] is None
        else:
            assert spec["sibling_distance_init"] == 0.0 and spec["sibling_distance_end"] > 0.0


def test_page_and_figure_are_rebuilt_from_the_json_alone(quick: Path, study_path: None) -> None:
    import report

    page = (quick / "RESULTS.md").read_text()
    assert (quick / "results" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (quick / "RESULTS.md").unlink()
    assert report.write(quick).read_text() == page
    assert f"**Verdict for the recommended recipe ({_study(quick)['recommended']}): too few seeds**" in page


def _evals(*losses: float, flops: float = 1.0) -> list[dict]:
    return [{"step": i, "val_loss": v, "flops": i * flops, "wall_s": float(i)} for i, v in enumerate(losses)]


def _run(arm: str, seed: int, final: float, ratio: float = 1.0) -> dict:
    return {"arm": arm, "lr": 1e-4, "seed": seed, "final_val_loss": final, "flops_ratio_to_dense": ratio,
            "evals": _evals(3.0, final, flops=ratio)}  # fmt: skip


@pytest.mark.parametrize(
    ("diffs", "ratio", "outcome"),
    [
        ((-0.05, -0.06, -0.04), 1.0, "beats dense"),
        ((-0.05, 0.06, -0.04), 1.0, "no difference beyond seed noise"),
        ((0.05, 0.06, 0.04), 1.0, "worse than dense"),
        ((-0.05, -0.06), 1.0, "too few seeds"),
        ((-0.05, -0.06, -0.04), 1.05, "not at equal FLOPs"),
    ],
)
def test_verdict_rule(study_path: None, diffs: tuple[float, ...], ratio: float, outcome: str) -> None:
    import report

    runs = [_run("dense", s, 2.5) for s in range(len(diffs))]
    runs += [_run("fine_router_lr", s, 2.5 + d, ratio) for s, d in enumerate(diffs)]
    study = {"runs": runs, "best_dense_lr": 1e-4, "recommended": "fine_router_lr"}
    assert report.verdict(study)[0] == outcome
    pair = report.paired(study, "fine_router_lr")
    assert pair["mean"] == pytest.approx(sum(diffs) / len(diffs))


def test_loss_at_a_flops_budget_is_interpolated(study_path: None) -> None:
    import report

    evals = _evals(3.0, 2.0, 1.5, flops=10.0)
    assert report.at_flops(evals, 15.0) == pytest.approx(1.75)
    assert report.at_flops(evals, 20.0) == pytest.approx(1.5)
    assert report.at_flops(evals, 25.0) is None


def test_bad_threads_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(STUDY / "run.py"), "--quick", "--threads", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "--threads must be >= 1" in proc.stderr
