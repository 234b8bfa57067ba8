"""Expert parallelism on gloo ranks (launched by tests/test_expert_parallel.py:
torchrun --nproc_per_node N ep_scenarios.py OUT): the experts sharded over all N ranks
(`moeify.distributed.apply_expert_parallel`), the rest data parallel under DDP. Each scenario
records what the test compares with one process on the concatenated batch. Writes OUT/rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from dist_common import build
from ep_common import ADAMW, SCENARIOS, build_scenario, loss_for, monitors, rank_batch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import moeify
import moeify.distributed as md


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def wrap(model: torch.nn.Module, mesh, fsdp: bool) -> torch.nn.Module:
    """Experts over the mesh; the rest under DDP, or FSDP2 over the same ranks (experts ignored)."""
    md.apply_expert_parallel(model, mesh)
    if not fsdp:
        return md.data_parallel(model)
    experts = set(md.expert_parameters(model))
    for _, layer in moeify.moe_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=experts)
    return fully_shard(model, mesh=mesh, ignored_params=experts)


def run(name: str, mesh, rank: int, world: int) -> dict:
    spec = SCENARIOS[name]
    model = build_scenario(name, world)
    ddp = wrap(model, mesh, spec.get("fsdp", False))
    optimizer = torch.optim.AdamW(ddp.parameters(), **ADAMW)
    runner = monitors(model)  # every rank: its step all-reduces, its fingerprint gathers
    out: dict = {"losses": [], "aux": [], "counts": []}
    for step in range(spec["steps"]):
        x = rank_batch(name, step, rank, world)
        loss, aux, output = loss_for(name, ddp, x)
        loss.backward()
        if step == 0:
            out["output"] = output.detach().clone()
            out["grads"] = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            out["grad_norm"] = md.clip_grad_norm_(ddp.parameters(), 1e9).item()
        out["losses"].append(loss.item())
        out["aux"].append(aux.item())
        out["counts"].append([layer.tokens_per_expert.clone() for _, layer in moeify.moe_layers(model)])
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
    out["monitors"] = runner.history
    out["params"] = {n: full(p) for n, p in model.named_parameters()}
    out["expert_bytes"] = md.local_expert_bytes(model)
    out["w_in"] = {
        "type": type(moeify.moe_layers(model)[0][1].experts.w_in).__name__,
        "placements": str(moeify.moe_layers(model)[0][1].experts.w_in.placements),
        "local": tuple(moeify.moe_layers(model)[0][1].experts.w_in.to_local().shape),
    }
    return out


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    result = {"world_size": world, "rank": rank}
    for name in SCENARIOS:
        result[name] = run(name, mesh, rank, world)
    try:
        md.apply_expert_parallel(build("llama", num_experts=3), mesh)
    except ValueError as error:
        result["indivisible"] = str(error)
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
