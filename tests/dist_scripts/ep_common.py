"""Models, batches and losses of the expert-parallel scenarios (tests/dist_scripts/ep_scenarios.py),
shared with the single-process references of tests/test_expert_parallel.py.

Scenarios: "llama" (tiny Llama, 8 experts top-2 + a shared expert, balance and z losses, 5 AdamW
steps), "skewed" (every rank sends half its tokens to expert 0 first and none to expert 3: uneven
splits and an expert with no tokens anywhere), "empty_rank" (a toy net with unaligned sizes: the
per-expert product; the last rank has no tokens at all). Rank r's batch at step s is seeded by
(s, r); the reference runs the ranks' batches concatenated. Losses are what data parallelism
averages: each rank's, so that their mean is the reference's loss on the concatenated batch.
"""

from __future__ import annotations

import torch
from dist_common import VOCAB, ToyNet, starve, tiny_llama
from torch import nn

import moeify

BATCH, SEQ, TOY_TOKENS = 2, 8, 6
SCENARIOS = {
    "llama": {"steps": 5},
    "llama_fsdp2": {"steps": 5, "fsdp": True},  # the rest under FSDP2 instead of DDP
    "skewed": {"steps": 2},
    "empty_rank": {"steps": 2},
}
ADAMW = {"lr": 1e-2}


def monitors(model: nn.Module) -> moeify.monitors.MonitorRunner:
    """The load monitor and the weight-reading one (every step), which gathers its fingerprint
    of the sharded experts across the ranks."""
    from moeify.monitors.homogenization import ExpertHomogenization

    return moeify.attach_monitors(model, ["expert_load", ExpertHomogenization(every_n_steps=1)])


def build_scenario(name: str, world: int) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("empty_rank"):
        model = ToyNet(d=10, generic=False)
        return moeify.moeify(
            model,
            num_experts=4,
            top_k=2,
            target_modules=r"layers\.\d+\.mlp",
            balance_loss_weight=0.01,
            z_loss_weight=0.0,
            num_shared_experts=1,
            shared_expert_init="zero_out",
        )
    model = moeify.moeify(
        tiny_llama(),
        num_experts=8,
        top_k=2,
        balance_loss_weight=0.01,
        z_loss_weight=1e-3,
        num_shared_experts=1,
        shared_expert_init="zero_out",
    )
    if name.startswith("skewed"):
        skew(model)
    return model


def skew(model: nn.Module) -> None:
    """Half of every batch's tokens (the even ones) pick expert 0 first; nobody picks expert 3."""
    starve(model, slice(None))

    def hook(module: nn.Module, args, logits_TE: torch.Tensor) -> torch.Tensor:
        bias_TE = torch.zeros_like(logits_TE)
        bias_TE[::2, 0] = 1e4
        return logits_TE + bias_TE

    for _, layer in moeify.moe_layers(model):
        layer.router.register_forward_hook(hook)


def rank_batch(name: str, step: int, rank: int, world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    if name.startswith("empty_rank"):
        rows = 0 if rank == world - 1 else BATCH
        return torch.randn(rows, TOY_TOKENS, 8, generator=gen)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def global_batch(name: str, step: int, world: int) -> torch.Tensor:
    return torch.cat([rank_batch(name, step, rank, world) for rank in range(world)])


def loss_for(
    name: str, model: nn.Module, x: torch.Tensor, ranks: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, aux, output) on one rank's batch, or in one process on the `ranks` ranks' batches
    concatenated. The toy's task loss is a sum over tokens divided by a rank's batch size, so that
    a rank without tokens contributes zero and the ranks' mean is the reference's sum / (N·ranks)."""
    if name.startswith("empty_rank"):
        output = model(x)
        aux = moeify.aux_loss(model)
        return output.pow(2).sum() / (BATCH * TOY_TOKENS * ranks) + aux, aux.detach(), output
    output = model(x, labels=x)  # a transformers model's loss holds the router losses
    return output.loss, _aux(model), output.logits


def _aux(model: nn.Module) -> torch.Tensor:
    """The weighted router losses of the last forward (already inside a transformers model's loss)."""
    total = torch.zeros(())
    for _, layer in moeify.moe_layers(model):
        total = total + sum(layer.loss_weights[k] * v for k, v in layer.last_losses.items())
    return total
