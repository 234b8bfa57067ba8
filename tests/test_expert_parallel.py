"""Expert parallelism (moeify.distributed) on 2 and 4 gloo ranks against one process on the same
global batch: outputs, losses, every gradient, the aux loss, parameters after AdamW steps, skewed
routing, an expert with no tokens, a rank with no tokens, per-rank expert memory; plus the
refusals, which need no launch. The scenarios: tests/dist_scripts/ep_common.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT / "tests"))

import torch.distributed as dist  # noqa: E402
from dist_common import build  # noqa: E402
from ep_common import ADAMW, SCENARIOS, build_scenario, global_batch, loss_for, monitors  # noqa: E402
from test_distributed import accelerate_launch, torchrun, torchrun_launch  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import moeify  # noqa: E402
import moeify.distributed as md  # noqa: E402

WORLDS = (2, 4)
# Normwise relative (`close`), fp32. Routers compute in fp32 whatever the model's dtype, and each
# rank's gradient is a partial sum that data parallelism then averages: the summation order
# differs from one process's, at fp32's last bits (eps 1.2e-7). Measured at most 2.0e-6 on a
# step's outputs, losses and gradients and 1.3e-5 on the parameters after 5 AdamW steps (Adam
# divides each gradient by its running RMS, which lifts the last bits of near-zero gradients).
STEP_RTOL, PARAMS_RTOL = 5e-6, 5e-5


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    return torchrun("ep_scenarios.py", tmp_path_factory.mktemp(f"ep{request.param}"), world=request.param)


def reference(name: str, world: int) -> dict:
    """One process, the ranks' batches concatenated, the same steps."""
    model = build_scenario(name, world)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    runner = monitors(model)
    out: dict = {"losses": [], "aux": [], "counts": []}
    for step in range(SCENARIOS[name]["steps"]):
        loss, aux, output = loss_for(name, model, global_batch(name, step, world), ranks=world)
        loss.backward()
        out["counts"].append([layer.tokens_per_expert.clone() for _, layer in moeify.moe_layers(model)])
        if step == 0:
            out["output"] = output.detach()
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out["grad_norm"] = torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters() if p.grad is not None]
            ).item()
        out["losses"].append(loss.item())
        out["aux"].append(aux.item())
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
    out["monitors"] = runner.history
    out["params"] = {n: p.detach() for n, p in model.named_parameters()}
    return out


def close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Normwise relative error: ||got - want|| <= rtol * ||want||. Elementwise, a gradient entry
    that is a cancellation of larger terms carries the last-bit noise of the summation order
    (per-rank means and their mean, against one mean) far above its own size."""
    assert got.shape == want.shape
    error = (got.double() - want.double()).norm().item()
    assert error <= rtol * max(want.double().norm().item(), 1e-12), (error, want.double().norm().item())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_equals_one_process_on_the_global_batch(ranks, name):
    world, rtol = len(ranks), STEP_RTOL
    want = reference(name, world)
    # The ranks' routing counts add up to one process's (what the monitors' all-reduce reads).
    for step, want_counts in enumerate(want["counts"]):
        for depth, counts_E in enumerate(want_counts):
            assert torch.equal(sum(r[name]["counts"][step][depth] for r in ranks), counts_E), (step, depth)
    # Each rank's output is its rows of the global batch's.
    close(torch.cat([r[name]["output"] for r in ranks]), want["output"], rtol)
    # The loss and the aux loss: their mean over ranks (what DDP averages) is the global batch's.
    for key in ("losses", "aux"):
        mean = torch.tensor([r[name][key] for r in ranks], dtype=torch.float64).mean(0)
        close(mean, torch.tensor(want[key], dtype=torch.float64), rtol)
    for r in ranks:
        assert r[name]["grads"].keys() == want["grads"].keys()
        for param, grad in want["grads"].items():
            close(r[name]["grads"][param], grad, rtol)
        assert r[name]["grad_norm"] == pytest.approx(want["grad_norm"], rel=rtol)
        # The monitors judge the global numbers: every rank's records are one process's (the load
        # from all-reduced counts, the homogenization from the experts' fingerprints gathered).
        assert len(r[name]["monitors"]) == len(want["monitors"]) == SCENARIOS[name]["steps"]
        for got_step, want_step in zip(r[name]["monitors"], want["monitors"], strict=True):
            for monitor in ("expert_load", "expert_homogenization"):
                got_m, want_m = got_step["monitors"][monitor], want_step["monitors"][monitor]
                assert got_m.keys() == want_m.keys()
                for layer, values in want_m.items():
                    for key, value in values.items():
                        assert got_m[layer][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (monitor, layer, key)
        # After the AdamW steps every parameter (experts gathered) equals one process's.
        for param, value in want["params"].items():
            close(r[name]["params"][param], value, PARAMS_RTOL)


def test_skewed_and_empty_routing_is_what_the_ranks_exchanged(ranks):
    """Uneven splits: expert 0 takes at least half of every rank's assignments, expert 3 none
    anywhere; the last rank of "empty_rank" routed nothing and still served its experts."""
    for r in ranks:
        for counts_E in r["skewed"]["counts"][0]:
            assert (
                counts_E[3] == 0 and counts_E[0] >= counts_E.sum() // 4
            )  # K=2: half the tokens = a quarter of assignments
        counts = r["empty_rank"]["counts"][0]
        assert all((c.sum() == 0) == (r["rank"] == len(ranks) - 1) for c in counts)


def test_each_rank_stores_one_ep_th_of_the_experts(ranks):
    world = len(ranks)
    for r in ranks:
        local, total = r["llama"]["expert_bytes"]
        assert local * world == total and local > 0
        assert r["llama"]["w_in"]["type"] == "DTensor" and r["llama"]["w_in"]["placements"] == "(Shard(dim=0),)"
        assert r["llama"]["w_in"]["local"][0] == 8 // world


# ---------------------------------------------------------------- one process, no launch


@pytest.fixture
def one_rank():
    """A gloo process group of one rank, in this process (torch.distributed's global state)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_one_rank_mesh_runs_the_exchange_and_equals_the_plain_layer(one_rank):
    """The whole exchange path (counts, splits, regrouping, the grouped product on the local
    shard, the way back) over a mesh of one: the outputs and gradients of the plain model."""
    plain, parallel = build("llama", balance_loss_weight=0.01), build("llama", balance_loss_weight=0.01)
    md.apply_expert_parallel(parallel, one_rank)
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for model in (plain, parallel):
        model(x, labels=x).loss.backward()
    for (_, p), (_, q) in zip(plain.named_parameters(), parallel.named_parameters(), strict=True):
        got = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        close(got, p.grad, STEP_RTOL)
    assert md.is_expert_parallel(parallel) and not md.is_expert_parallel(plain)
    # Clipping: torch's on the plain model, moeify's on DTensor experts beside plain parameters.
    want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.01)
    got = md.clip_grad_norm_(parallel.parameters(), 0.01)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and want > 0.01
    for p, q in zip(plain.parameters(), parallel.parameters(), strict=True):
        close(q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad, p.grad, STEP_RTOL)


def test_one_rank_mesh_on_a_diffusion_transformer_with_cross_attention_routing(one_rank):
    """A PixArt DiT (text cross-attention routers, sigmoid scores, a selection bias that moved):
    expert parallelism changes no output and no gradient."""
    import tiny_diffusers

    def converted() -> torch.nn.Module:
        model, _ = tiny_diffusers.pixart()
        moeify.moeify(
            model,
            num_experts=4,
            top_k=2,
            router="cross_attention",
            router_score="sigmoid",
            balance_bias_rate=0.01,
            router_init_std=0.5,
        )
        for _, layer in moeify.moe_layers(model):
            layer.expert_bias.copy_(torch.tensor([0.02, -0.01, 0.0, -0.01]))
        return model.train()

    _, kwargs = tiny_diffusers.pixart()
    plain, parallel = converted(), converted()
    md.apply_expert_parallel(parallel, one_rank)
    outputs = [model(**kwargs).sample for model in (plain, parallel)]
    close(outputs[1], outputs[0], STEP_RTOL)
    for output, model in zip(outputs, (plain, parallel)):
        (output.square().mean() + moeify.aux_loss(model)).backward()
    for (_, p), (_, q) in zip(plain.named_parameters(), parallel.named_parameters(), strict=True):
        if p.grad is not None:
            close(q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad, p.grad, STEP_RTOL)


@pytest.mark.parametrize("method", ["fp32_master", "kahan", "stochastic_rounding"])
def test_bf16_guards_compose_with_sharded_experts(one_rank, method):
    """bf16 weights, the guard built after sharding: two steps move every parameter exactly as the
    guard does on the plain model (stochastic rounding draws each shard's noise on its own rank)."""
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for parallel in (False, True):
        model = build("llama").to(torch.bfloat16)
        if parallel:
            md.apply_expert_parallel(model, one_rank)
        optimizer = moeify.guard_bf16(model, torch.optim.AdamW(model.parameters(), lr=1e-3), method=method, seed=0)
        for _ in range(2):
            model(x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append({n: v.detach().clone() for n, v in md.full_state_dict(model).items()})
    plain, sharded = results
    assert any(not torch.equal(v, build("llama").to(torch.bfloat16).state_dict()[n]) for n, v in plain.items())
    for name, value in plain.items():
        assert torch.equal(sharded[name], value), name  # measured: bit for bit, each method


def _snapshot(model: torch.nn.Module) -> dict:
    return {name: (type(p), p.detach().clone()) for name, p in model.named_parameters()}


def _unchanged(model: torch.nn.Module, before: dict) -> bool:
    after = _snapshot(model)
    return after.keys() == before.keys() and all(
        type(after[n][1]) is type(before[n][1]) and torch.equal(after[n][1], before[n][1]) for n in before
    )


def test_refusals_name_the_problem_and_change_nothing(one_rank):
    model = build("llama")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        md.apply_expert_parallel(model, init_device_mesh("cpu", (1, 1)))
    with pytest.raises(ValueError, match="1-D DeviceMesh, got list"):
        md.apply_expert_parallel(model, [0])
    generic = build("generic")
    with pytest.raises(ValueError, match="generic path.*register_ffn"):
        md.apply_expert_parallel(generic, one_rank)
    with pytest.raises(ValueError, match="no moeify MoE layers"):
        md.apply_expert_parallel(torch.nn.Linear(2, 2), one_rank)
    assert _unchanged(model, before)
    md.apply_expert_parallel(model, one_rank)
    with pytest.raises(ValueError, match="already expert-parallel"):
        md.apply_expert_parallel(model, one_rank)


def test_refused_without_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        md.apply_expert_parallel(build("llama"), None)


def test_indivisible_expert_count_is_refused(ranks):
    for r in ranks:
        assert f"3 experts, not divisible by the mesh size {len(ranks)}" in r["indivisible"]


# ---------------------------------------------------------------- sharded checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """One save on 2 ranks, then loads on 2 ranks (resume) and on 4 (another ep_size)."""
    out = tmp_path_factory.mktemp("ep_checkpoint")
    runs = {}
    for mode, world in (("save", 2), ("resume", 2), ("reshard", 4)):
        torchrun_launch("ep_checkpoint.py", mode, out, world=world)
        runs[mode] = [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(world)]
    return out, runs


def _equal(got: dict, want: dict) -> None:
    """Bit for bit: parameters, and AdamW's step / exp_avg / exp_avg_sq of each."""
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        assert torch.equal(got["params"][name], value), name
    assert got["optimizer"].keys() == want["optimizer"].keys()
    for name, state in want["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"][name][key], value), (name, key)


def test_sharded_checkpoint_loads_bit_exact_into_another_ep_size(checkpoints):
    _, runs = checkpoints
    saved = runs["save"][0]["saved"]
    for run, local in (("resume", 4), ("reshard", 2)):
        for rank in runs[run]:
            assert rank["local_experts"] == local
            _equal(rank["loaded"], saved)


def test_resume_from_a_sharded_checkpoint_equals_an_uninterrupted_run(checkpoints):
    _, runs = checkpoints
    for rank in runs["resume"]:
        _equal(rank["resumed"], runs["save"][0]["uninterrupted"])


def test_sharded_checkpoint_loads_into_one_process_without_a_process_group(checkpoints):
    out, runs = checkpoints
    model = build_scenario("llama", 1)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    md.load_sharded(out / "sharded", model, optimizer)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    here = {"params": dict(model.state_dict()), "optimizer": get_optimizer_state_dict(model, optimizer)["state"]}
    _equal(here, runs["save"][0]["saved"])


def test_save_pretrained_from_expert_parallel_writes_what_one_process_writes(checkpoints, tmp_path):
    out, runs = checkpoints
    moeify.save_pretrained(build_scenario("llama", 1), tmp_path / "one")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (out / "pretrained_step0").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (out / "pretrained_step0" / name).read_bytes(), name
    # After training, the gathered experts reload in one process as the ranks held them.
    trained = moeify.from_pretrained(out / "pretrained_step2")
    for name, value in runs["save"][0]["saved"]["params"].items():
        assert torch.equal(trained.state_dict()[name], value), name


def test_load_sharded_refuses_other_recipes_and_other_directories(checkpoints, tmp_path):
    out, _ = checkpoints
    other = build("llama", num_experts=2)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="other recipes"):
        md.load_sharded(out / "sharded", other)
    with pytest.raises(FileNotFoundError, match="not a moeify sharded checkpoint"):
        md.load_sharded(tmp_path, other)
    assert _unchanged(other, before)


# ---------------------------------------------------------------- through accelerate


def test_prepare_with_ep_size_equals_one_process(tmp_path):
    """`prepare(accelerator, model, optimizer, ep_size=2)` under DDP: the optimizer built before is
    moved onto the sharded experts, and 5 AdamW steps equal one process's. (accelerate turns an
    FSDP config into MULTI_CPU when ACCELERATE_USE_CPU=1, so its FSDP2 route cannot run on CPU; the
    composition with FSDP2 itself is the "llama_fsdp2" scenario, through torch directly.)"""
    accelerate_launch("--mixed_precision", "no", str(SCRIPTS / "ep_accelerate.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    want = reference("llama", 2)
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["wrapper"] == "DistributedDataParallel"
        assert r["optimizer_on_model"]
        local, total = r["expert_bytes"]
        assert 2 * local == total
        mean = torch.tensor([x["losses"] for x in ranks], dtype=torch.float64).mean(0)
        close(mean, torch.tensor(want["losses"], dtype=torch.float64), STEP_RTOL)
        for param, value in want["params"].items():
            close(r["params"][param], value, PARAMS_RTOL)


def test_accelerate_example_with_expert_parallelism_resumes_exactly(tmp_path):
    """examples/train_llm_moe.py --ep-size 2 on two CPU processes (bf16 autocast): checkpoint at
    step 2 (the experts saved sharded, beside accelerate's files), resume, same final loss."""
    import re

    def run(*extra: str) -> str:
        example = str(ROOT / "examples" / "train_llm_moe.py")
        args = ["--max-steps", "4", "--save-at", "2", "--ep-size", "2", "--out", str(tmp_path), *extra]
        done = accelerate_launch(example, *args)
        return re.search(r"final_loss=(\S+)", done.stdout).group(1)

    uninterrupted = run()
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert "moeify_sharded_0" in files and "custom_checkpoint_0.pkl" in files
    assert not any(name.startswith(("model", "optimizer")) for name in files)  # not pickled by accelerate
    assert run("--resume") == uninterrupted


def test_prepare_refuses_what_it_cannot_shard(fresh_accelerate):
    from accelerate import Accelerator

    from moeify.integrations.accelerate import expert_parallel, prepare

    accelerator = Accelerator(cpu=True)
    model = build("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="ep_size=2 with 1 processes"):
        prepare(accelerator, model, optimizer, ep_size=2)
    with pytest.raises(ValueError, match=r"ep_size must be an int >= 2"):
        expert_parallel(accelerator, model, 1)
    guarded = moeify.guard_bf16(model.to(torch.bfloat16), torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="is a bf16 guard.*Shard first.*expert_parallel"):
        prepare(accelerator, model, guarded, ep_size=2)
    assert not md.is_expert_parallel(model)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
