"""FSDP2 on two gloo ranks (launched by tests/test_distributed.py:
torchrun --nproc_per_node 2 fsdp2_scenario.py OUT): `fully_shard` on every MoE layer and the root
with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); routers first get their own fp32
units (`moeify.integrations.accelerate.shard_routers`). Writes OUT/rank<r>.pt, and the sharded
model's `moeify.save_pretrained` (before training) to OUT/pretrained."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from dist_common import batch, build, loss_of
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import moeify
from moeify.integrations.accelerate import shard_routers

BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: torch.nn.Module, mesh, routers: bool) -> torch.nn.Module:
    if routers:
        shard_routers(model, mesh=mesh)
    for _, layer in moeify.moe_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=BF16)
    fully_shard(model, mesh=mesh, mp_policy=BF16)
    return model


def without_router_units(mesh, rank: int) -> str:
    """What FSDP2's bf16 policy does to a router that shares its MoE layer's unit."""
    model = shard(build("llama"), mesh, routers=False)
    try:
        loss_of("llama", model, batch("llama", 0, rank))
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return ""


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"
    mesh = init_device_mesh("cpu", (world,))
    model = shard(build("llama"), mesh, routers=True)
    moeify.save_pretrained(model, out / "pretrained")  # every rank: gathers the shards, rank 0 writes
    layer = moeify.moe_layers(model)[0][1]
    seen: dict[str, str] = {}
    layer.router.register_forward_pre_hook(lambda m, a: seen.update(router=str(m.gate.weight.dtype)))
    layer.experts.register_forward_pre_hook(lambda m, a: seen.update(experts=str(m.w_in.dtype)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(3):
        loss = loss_of("llama", model, batch("llama", step, rank))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    w_in = layer.experts.w_in
    result = {
        "world_size": world,
        "w_in": {
            "type": type(w_in).__name__,
            "global": tuple(w_in.shape),
            "local": tuple(w_in.to_local().shape),
            "placements": str(w_in.placements),
            "dtype": str(w_in.dtype),
        },
        "router": {"type": type(layer.router.gate.weight).__name__, "dtype": str(layer.router.gate.weight.dtype)},
        "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "forward_dtypes": seen,
        "losses": losses,
        "router_in_bf16_unit": without_router_units(mesh, rank),
        "out": str(out),
    }
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
