"""Two gloo ranks on CPU: DDP through accelerate (gradients, routing statistics, save/resume),
FSDP2 (`fully_shard`), the CPU launch config and the LLM example under it.

Each multi-process scenario is one subprocess launch (torchrun --standalone / accelerate launch
with a free port), run one after the other; the scripts live in tests/dist_scripts/ and share
their models and data with the single-process references computed here. Every launch asserts
world size 2."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))

from dist_common import KINDS, STARVED, batch, build, concatenated, flat_params, loss_of, second_half, starve  # noqa: E402

import moeify  # noqa: E402
from moeify.monitors import attach_monitors, gather  # noqa: E402

TIMEOUT = 300


def _env(cpu: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SCRIPTS), str(ROOT)]))
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def launch(args: list[str], *, cpu: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env=_env(cpu), capture_output=True, text=True, timeout=TIMEOUT)
    if check and done.returncode:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}")
    return done


def torchrun_launch(script: str, *args: object, world: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node WORLD tests/dist_scripts/SCRIPT ARGS...`."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    return launch([*run, str(SCRIPTS / script), *map(str, args)])


def torchrun(script: str, out: Path, world: int = 2) -> list[dict]:
    """A script that writes OUT/rank<r>.pt on every rank: those records."""
    torchrun_launch(script, out, world=world)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def accelerate_launch(*args: str, cpu: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    config = ROOT / "integrations" / "accelerate" / "cpu_2proc.yaml"
    return launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *args], cpu=cpu, check=check
    )


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict]:
    return torchrun("ddp_scenarios.py", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict]:
    return torchrun("fsdp2_scenario.py", tmp_path_factory.mktemp("fsdp2"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------- single process, no launch


def test_idle_generic_expert_joins_the_graph_with_zero_gradient():
    """ModuleExperts: an expert that got no tokens still gets a (zero) gradient, so DDP without
    find_unused_parameters does not fail on the next step."""
    model = build("generic")
    starve(model, slice(None))
    loss_of("generic", model, batch("generic", 0, 0)).backward()
    for _, layer in moeify.moe_layers(model):
        assert layer.tokens_per_expert[STARVED] == 0
        for param in layer.experts.experts[STARVED].parameters():
            assert param.grad is not None and not param.grad.any()
        busy = [e for e in range(layer.num_experts) if layer.tokens_per_expert[e] > 0]
        assert all(next(layer.experts.experts[e].parameters()).grad.any() for e in busy)


# ---------------------------------------------------------------- DDP through accelerate


def test_ddp_runs_two_gloo_ranks_without_find_unused_parameters(ddp):
    assert [r["world_size"] for r in ddp] == [2, 2] and [r["rank"] for r in ddp] == [0, 1]
    assert ddp[0]["backend"] == "gloo"
    for kind in KINDS:
        assert ddp[0]["train"][kind]["ddp"] == "DistributedDataParallel"
        assert ddp[0]["train"][kind]["find_unused_parameters"] is False


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(ddp, kind):
    """Expert STARVED gets no tokens on rank 1 (but some on rank 0) for three SGD steps: no crash,
    both ranks hold identical parameters, equal to one process on both batches concatenated."""
    counts = [[c.tolist() for c in r["train"][kind]["tokens_per_expert"]] for r in ddp]
    assert all(layer[STARVED] == 0 for layer in counts[1])
    assert all(layer[STARVED] > 0 for layer in counts[0])
    reference = build(kind)
    starve(reference, second_half(kind))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step, (rank0, rank1) in enumerate(zip(ddp[0]["train"][kind]["params"], ddp[1]["train"][kind]["params"])):
        loss_of(kind, reference, concatenated(kind, step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert _max_diff(rank0, rank1) == 0.0
        assert _max_diff(rank0, flat_params(reference)) < 1e-6


def _reference_stats() -> tuple[list, list]:
    """One process, the two ranks' micro-batches concatenated (as in ddp_scenarios.routing_stats)."""
    model = build("llama")
    runner = attach_monitors(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gathered = []
    for step in range(2):
        for micro in range(2):
            (loss_of("llama", model, concatenated("llama", 2 * step + micro)) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        gathered.append([dataclasses.asdict(s) for s in gather(runner.layers, reset=False)])
        runner.step()
    runner.close()
    return gathered, runner.history


def _numbers(value, path=""):
    """Every leaf of a nested record, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}/{i}").items()}
    return {path: value}


def test_routing_statistics_are_all_reduced(ddp):
    """Two micro-batches per optimizer step: every rank's gathered statistics and monitor records
    equal one process's on the concatenated data."""
    gathered, history = _reference_stats()
    expected = _numbers({"gathered": gathered, "history": history})
    for rank in ddp:
        got = _numbers({"gathered": rank["stats"]["gathered"], "history": rank["stats"]["history"]})
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            else:
                assert got[key] == value, key


def test_plain_accelerator_prepare_corrupts_statistics_under_gradient_accumulation(ddp):
    """Why `moeify.integrations.accelerate.prepare`: DDP broadcasts rank 0's buffers at every
    forward, overwriting rank 1's first micro-batch counts (measured, torch 2.13)."""
    gathered, _ = _reference_stats()
    plain = ddp[0]["stats_plain_prepare"]["gathered"]
    assert [s["tokens_per_expert"] for s in plain[0]] != [s["tokens_per_expert"] for s in gathered[0]]
    assert [s["tokens"] for s in plain[0]] == [s["tokens"] for s in gathered[0]]  # same totals, wrong split


def test_expert_bias_moves_on_global_counts_once_per_optimizer_step(ddp):
    """Bias balancing under DDP: each optimizer step's counts are all-reduced, so every rank's bias
    equals one process's on the concatenated micro-batches (and moves once per real step)."""
    model = build("llama", balance_bias_rate=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    moeify.set_routing(model, optimizer=optimizer)
    expected = []
    for step in range(3):
        for micro in range(2):
            (loss_of("llama", model, concatenated("llama", 2 * step + micro)) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append([layer.expert_bias.clone() for _, layer in moeify.moe_layers(model)])
    assert any(b.abs().sum() > 0 for b in expected[-1])
    for rank in ddp:
        for got_step, want_step in zip(rank["bias"], expected, strict=True):
            for got, want in zip(got_step, want_step, strict=True):
                torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_save_state_then_resume_equals_an_uninterrupted_run(ddp):
    for rank in ddp:
        assert rank["resumed"]["resumed_at"] == 2 and rank["resumed"]["steps"] == 4
        assert _max_diff(rank["uninterrupted"]["params"], rank["resumed"]["params"]) == 0.0
    assert _max_diff(ddp[0]["resumed"]["params"], ddp[1]["resumed"]["params"]) == 0.0


# ---------------------------------------------------------------- FSDP2


def test_fsdp2_shards_packed_experts_and_keeps_routers_fp32(fsdp2):
    for rank in fsdp2:
        assert rank["world_size"] == 2 and rank["all_dtensor"]
        w_in = rank["w_in"]
        assert w_in["type"] == "DTensor" and w_in["placements"] == "(Shard(dim=0),)"
        assert w_in["local"][0] * 2 == w_in["global"][0] == 4  # each rank holds 2 of the 4 experts
        assert w_in["dtype"] == "torch.float32"  # sharded fp32 masters
        assert rank["forward_dtypes"] == {"router": "torch.float32", "experts": "torch.bfloat16"}
        assert rank["router"] == {"type": "DTensor", "dtype": "torch.float32"}
        assert all(torch.isfinite(torch.tensor(rank["losses"])))
        # Without their own fp32 unit the routers are cast to bf16 and the fp32 routing math fails.
        assert "same dtype" in rank["router_in_bf16_unit"]


def test_save_pretrained_of_an_fsdp2_model_writes_what_one_process_writes(fsdp2, tmp_path_factory, tmp_path):
    """Every rank calls it; the DTensor shards are gathered and rank 0 writes the same bytes."""
    sharded = Path(fsdp2[0]["out"]) / "pretrained"
    moeify.save_pretrained(build("llama"), tmp_path / "one")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in sharded.iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (sharded / name).read_bytes(), name


# ---------------------------------------------------------------- accelerate launch


def test_cpu_config_gives_two_gloo_ranks():
    done = accelerate_launch(str(SCRIPTS / "world.py"))
    # Both ranks write to one pipe: their lines may interleave.
    ranks = sorted(re.findall(r"<rank (\d+) of (\d+) on (\w+)>", done.stdout))
    assert ranks == [("0", "2", "gloo"), ("1", "2", "gloo")]


def test_cpu_config_without_use_cpu_is_refused():
    """accelerate's silent trap: without ACCELERATE_USE_CPU=1 the two workers are independent."""
    done = accelerate_launch(str(SCRIPTS / "world.py"), cpu=False, check=False)
    assert done.returncode != 0
    assert "set ACCELERATE_USE_CPU=1" in done.stdout + done.stderr


def test_llm_example_under_two_cpu_processes(tmp_path):
    out = tmp_path / "llm"
    done = accelerate_launch(str(ROOT / "examples" / "train_llm_moe.py"), "--max-steps", "2", "--out", str(out))
    assert "world_size=2 start_step=0" in done.stdout
    assert "final_loss=" in done.stdout and "steps=2" in done.stdout
    assert (out / "checkpoint" / "custom_checkpoint_0.pkl").exists()
    assert len((out / "run" / "history.jsonl").read_text().splitlines()) == 2
