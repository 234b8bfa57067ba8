"""Expert parallelism through accelerate (launched by tests/test_expert_parallel.py with
`accelerate launch --config_file <config> ep_accelerate.py OUT`): the "llama" scenario of
ep_common, an AdamW optimizer built BEFORE `prepare(..., ep_size=2)` (which moves it onto the
sharded experts), 5 steps with `accelerator.backward` and `moeify.distributed.clip_grad_norm_`.
Writes OUT/rank<r>.pt: the parameters gathered whole, the losses, what wrapped the model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from ep_common import ADAMW, SCENARIOS, build_scenario, loss_for, rank_batch

import moeify.distributed as md
from moeify.integrations.accelerate import fsdp2_plugin, prepare


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(fsdp_plugin=fsdp2_plugin())
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_scenario("llama", world)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    wrapped, optimizer = prepare(accelerator, model, optimizer, ep_size=world)
    inner = optimizer.optimizer
    owned = {id(p) for p in model.parameters()}
    losses = []
    for step in range(SCENARIOS["llama"]["steps"]):
        loss, _, _ = loss_for("llama", wrapped, rank_batch("llama", step, rank, world))
        accelerator.backward(loss)
        md.clip_grad_norm_(wrapped.parameters(), 1e9)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    result = {
        "world_size": world,
        "distributed_type": str(accelerator.distributed_type),
        "wrapper": type(wrapped).__name__,
        "optimizer_on_model": all(id(p) in owned for g in inner.param_groups for p in g["params"]),
        "expert_bytes": md.local_expert_bytes(model),
        "losses": losses,
        "params": {n: v.detach().clone() for n, v in md.full_state_dict(model).items()},
    }
    torch.save(result, out / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
