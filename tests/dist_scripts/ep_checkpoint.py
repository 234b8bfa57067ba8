"""Sharded checkpoints of an expert-parallel model (launched by tests/test_expert_parallel.py:
torchrun --nproc_per_node N ep_checkpoint.py MODE DIR). The "llama" scenario of ep_common, its
experts over all N ranks, the rest under DDP, AdamW.

  save    (2 ranks): 2 steps, `save_sharded` (model + optimizer) into DIR/sharded, then 2 more
          steps ("uninterrupted"); `save_pretrained` right after sharding (DIR/pretrained_step0)
          and after the 2 steps (DIR/pretrained_step2).
  resume  (2 ranks): a fresh model, `load_sharded`, the same 2 more steps ("resumed").
  reshard (4 ranks): a fresh model over 4 ranks, `load_sharded`.
Each records, gathered whole, the parameters and AdamW's state; writes DIR/MODE_rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ep_common import ADAMW, build_scenario, loss_for, rank_batch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh

import moeify
import moeify.distributed as md


def gathered(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    full = StateDictOptions(full_state_dict=True)
    return {
        "params": {n: v.detach().clone() for n, v in md.full_state_dict(model).items()},
        "optimizer": {
            name: {key: value.detach().clone() for key, value in state.items()}
            for name, state in get_optimizer_state_dict(model, optimizer, options=full)["state"].items()
        },
    }


def steps(model, ddp, optimizer, first: int, count: int, rank: int, world: int) -> None:
    for step in range(first, first + count):
        loss, _, _ = loss_for("llama", ddp, rank_batch("llama", step, rank, world))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_scenario("llama", world)
    md.apply_expert_parallel(model, init_device_mesh("cpu", (world,)))
    ddp = md.data_parallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), **ADAMW)
    result: dict = {"world_size": world}
    if mode == "save":
        moeify.save_pretrained(model, out / "pretrained_step0")
        steps(model, ddp, optimizer, 0, 2, rank, world)
        md.save_sharded(out / "sharded", ddp, optimizer)
        moeify.save_pretrained(ddp, out / "pretrained_step2")
        result["saved"] = gathered(model, optimizer)
        steps(model, ddp, optimizer, 2, 2, rank, world)
        result["uninterrupted"] = gathered(model, optimizer)
    else:
        md.load_sharded(out / "sharded", ddp, optimizer)
        result["loaded"] = gathered(model, optimizer)
        result["local_experts"] = moeify.moe_layers(model)[0][1].experts.w_in.to_local().shape[0]
        if mode == "resume":
            steps(model, ddp, optimizer, 2, 2, rank, world)
            result["resumed"] = gathered(model, optimizer)
    torch.save(result, out / f"{mode}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
