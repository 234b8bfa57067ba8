"""Two gloo ranks train converted models through accelerate's DDP (launched by
tests/test_distributed.py: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ddp_scenarios.py OUT).

Writes OUT/rank<r>.pt (tensors and primitives) with what the tests compare against a single
process: parameters after each step for every kind, routing statistics, checkpoint/resume."""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from dist_common import KINDS, STARVED, batch, build, flat_params, loss_of, starve

import moeify
from moeify.integrations.accelerate import prepare, register_state, save_state
from moeify.monitors import attach_monitors, gather

STEPS = 3
MICRO = 2  # forwards per optimizer step (gradient accumulation)


def train_kind(kind: str, rank: int) -> dict:
    """SGD steps with expert STARVED getting no tokens on rank 1; parameters after every step."""
    model = build(kind)
    starve(model, slice(None) if rank == 1 else slice(0, 0))
    accelerator = Accelerator()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp, optimizer = prepare(accelerator, model, optimizer)
    params = []
    for step in range(STEPS):
        accelerator.backward(loss_of(kind, ddp, batch(kind, step, rank)))
        optimizer.step()
        optimizer.zero_grad()
        params.append(flat_params(model))
    counts = [layer.tokens_per_expert.clone() for _, layer in moeify.moe_layers(model)]
    return {
        "params": params,
        "tokens_per_expert": counts,
        "find_unused_parameters": bool(ddp.find_unused_parameters),
        "ddp": type(ddp).__name__,
    }


def routing_stats(rank: int, plain: bool = False) -> dict:
    """The runner's gathered statistics and monitor records over two optimizer steps of two
    micro-batches each; `plain`: prepared by `accelerator.prepare` instead of moeify's `prepare`."""
    model = build("llama")
    accelerator = Accelerator()
    runner = attach_monitors(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp, optimizer = (accelerator.prepare if plain else partial(prepare, accelerator))(model, optimizer)
    gathered = []
    for step in range(2):
        for micro in range(MICRO):
            accelerator.backward(loss_of("llama", ddp, batch("llama", MICRO * step + micro, rank)) / MICRO)
        optimizer.step()
        optimizer.zero_grad()
        gathered.append([dataclasses.asdict(s) for s in gather(runner.layers, reset=False)])
        runner.step()
    runner.close()
    return {"gathered": gathered, "history": runner.history}


def bias_balancing(rank: int) -> list[list[torch.Tensor]]:
    """Every layer's expert bias after each of 3 optimizer steps of MICRO micro-batches, the
    bias moved by the optimizer hook that moeify's `prepare` installs (once per real step)."""
    model = build("llama", balance_bias_rate=0.01)
    accelerator = Accelerator(gradient_accumulation_steps=MICRO)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp, optimizer = prepare(accelerator, model, optimizer)
    biases = []
    for step in range(3):
        for micro in range(MICRO):
            with accelerator.accumulate(ddp):
                accelerator.backward(loss_of("llama", ddp, batch("llama", MICRO * step + micro, rank)))
                optimizer.step()
                optimizer.zero_grad()
        biases.append([layer.expert_bias.clone() for _, layer in moeify.moe_layers(model)])
    return biases


def run_with_checkpoint(rank: int, out: Path, steps: int, save_at: int | None, resume: bool) -> dict:
    model = build("llama", balance_loss_weight=0.01)
    accelerator = Accelerator()
    runner = attach_monitors(model, monitors=["expert_load"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    register_state(accelerator, model, runner)
    ddp, optimizer = prepare(accelerator, model, optimizer)
    if resume:
        accelerator.load_state(str(out / "checkpoint"))
    resumed_at = runner.steps
    for step in range(runner.steps, steps):
        accelerator.backward(loss_of("llama", ddp, batch("llama", step, rank)))
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
        if step + 1 == save_at:
            save_state(accelerator, out / "checkpoint")  # every rank into one staging directory
    return {"params": flat_params(model), "resumed_at": resumed_at, "steps": runner.steps}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator()  # gloo under ACCELERATE_USE_CPU=1
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and accelerator.num_processes == 2, f"expected 2 ranks, got {world}"
    result = {"rank": rank, "world_size": world, "backend": dist.get_backend()}
    result["train"] = {kind: train_kind(kind, rank) for kind in KINDS}
    result["stats"] = routing_stats(rank)
    result["stats_plain_prepare"] = routing_stats(rank, plain=True)
    result["bias"] = bias_balancing(rank)
    result["uninterrupted"] = run_with_checkpoint(rank, out, steps=4, save_at=2, resume=False)
    result["resumed"] = run_with_checkpoint(rank, out, steps=4, save_at=None, resume=True)
    result["starved"] = STARVED
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
