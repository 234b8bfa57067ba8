"""The distributed benchmark's smoke mode (benchmarks/distributed.py --quick): 2 gloo processes
train the same tiny converted Llama replicated (DDP), under FSDP2 and expert-parallel; the
results file must hold the facts the benchmark reports. Timings are only checked to exist."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "distributed.py"
MODES = ("replicated", "fsdp2", "expert_parallel")
RANKS, ROUNDS = 2, 2


def _load_launcher():  # the benchmarks/ script as a module
    spec = importlib.util.spec_from_file_location("distributed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("distributed_bench") / "quick.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return json.loads(output.read_text())


def test_structure(result):
    assert result["mode"] == "quick"
    assert result["world_size"] == RANKS
    assert result["threads_per_rank"] == 1
    assert result["spec"]["rounds"] == ROUNDS
    assert result["tokens_per_rank"] == result["spec"]["batch"] * result["spec"]["seq"] == 64
    assert tuple(result["modes"]) == MODES
    for row in result["modes"].values():
        assert len(row["seconds"]) == ROUNDS
        assert all(s > 0 for s in row["seconds"])
        assert row["step_ms_median"] > 0 and row["min_ratio_to_replicated"] > 0
        ratio = row["ratio_to_replicated"]
        assert 0 < ratio["q1"] <= ratio["median"] <= ratio["q3"]
        assert len(row["memory_per_rank"]) == RANKS
        phases = row["phases"]
        assert all(phases[f"{name}_ms"] > 0 for name in ("forward", "backward", "optimizer"))
    assert result["modes"]["expert_parallel"]["phases"]["exchange_forward_ms"] > 0
    assert "exchange_forward_ms" not in result["modes"]["replicated"]["phases"]
    replicated = result["modes"]["replicated"]
    assert replicated["ratio_to_replicated"] == {"median": 1.0, "q1": 1.0, "q3": 1.0}


def test_memory_division_is_exact(result):
    modes = result["modes"]
    for rank in range(RANKS):
        full = modes["replicated"]["memory_per_rank"][rank]
        ep = modes["expert_parallel"]["memory_per_rank"][rank]
        fsdp2 = modes["fsdp2"]["memory_per_rank"][rank]
        # Replicated: every rank stores every expert; the quick model's experts: 2 layers x
        # (w_in [8, 512, 64] + w_out [8, 64, 256]) fp32 = 3 MiB.
        assert full["expert_param_bytes"] == full["expert_param_bytes_full"] == 2 * 8 * (512 * 64 + 64 * 256) * 4
        assert full["model_param_bytes"] == full["model_param_bytes_full"]
        # 8 experts over 2 ranks: exactly half each, parameters and gradients.
        assert 2 * ep["expert_param_bytes"] == full["expert_param_bytes"]
        assert 2 * ep["expert_grad_bytes"] == full["expert_grad_bytes"] == full["expert_param_bytes"]
        assert 2 * fsdp2["expert_param_bytes"] == full["expert_param_bytes"]
        # AdamW: two moments per parameter (+ a 4-byte step count per tensor, not sharded).
        assert ep["expert_adamw_bytes"] - 2 * ep["expert_param_bytes"] == 4 * 4
        for mem in (full, ep, fsdp2):
            assert (
                mem["expert_state_bytes"]
                == mem["expert_param_bytes"] + mem["expert_grad_bytes"] + mem["expert_adamw_bytes"]
            )
        # Expert parallelism keeps everything else whole; FSDP2 shards it too.
        assert (
            ep["model_param_bytes"] - ep["expert_param_bytes"] == full["model_param_bytes"] - full["expert_param_bytes"]
        )
        assert 2 * fsdp2["model_param_bytes"] == full["model_param_bytes"]


def test_first_step_losses_agree(result):
    losses, rtol = result["first_step"]["losses"], result["first_step"]["rtol"]
    assert rtol == 1e-5
    for rank in range(RANKS):
        want = losses["replicated"][rank]
        for mode in ("fsdp2", "expert_parallel"):
            assert losses[mode][rank]["task"] == pytest.approx(want["task"], rel=rtol)
        assert losses["fsdp2"][rank]["total"] == pytest.approx(want["total"], rel=rtol)
        # Expert parallelism's balance loss pools both ranks' routing: not each rank's own.
        assert losses["expert_parallel"][rank]["aux"] != want["aux"]
    # Both ranks trained on their own batch.
    assert losses["replicated"][0]["task"] != losses["replicated"][1]["task"]


def test_table_comes_from_the_file(result, tmp_path, capsys):
    launcher = _load_launcher()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert launcher.main(["--table", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "MiB" in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| replicated (DDP)",
        "| FSDP2 (`fully_shard`)",
        "| expert parallel + DDP",
    ]
    assert "1.5 MiB (0.5 × all)" in rows[2]


def test_quick_refuses_to_overwrite_the_committed_results(capsys):
    with pytest.raises(SystemExit) as raised:
        _load_launcher().main(["--quick"])
    assert raised.value.code == 2
    assert "--quick needs --output" in capsys.readouterr().err
