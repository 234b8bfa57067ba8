"""One run of the study: an arm, a learning rate and a seed, trained and measured.

Measured per run: the held-out loss every `eval_every` steps (the model's task loss in eval mode,
router losses left out), the FLOPs and wall time it took to get there, the training loss of each
step, and, for moeify arms, whether the experts specialised:

- router entropy (`router_entropy` monitor: mean per-token H(p) / log E over the layers) at the
  first and the last step: 1 is uniform routing, the state random routers start in;
- sibling distance: the mean relative distance ||W_a - W_b|| / ||W_a|| between routed experts that
  are the same part of the FFN (all pairs of clones; with granularity G, the same slice of
  different copies), at init and at the end. Clones start at exactly 0; they only move apart if
  the routers send them different tokens.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from typing import Any

import torch
from arms import Arm, Scale
from data import Corpus, batches
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import moeify
from moeify.layers.inventory import moe_layers, parameter_counts


def val_loss(model: nn.Module, val_BS: Tensor, batch_size: int) -> float:
    """Mean next-token loss over the held-out blocks (equal-sized blocks: the mean of means)."""
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=x, labels=x).loss.item() for x in val_BS.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def dense_step_flops(model: nn.Module, x_BS: Tensor) -> int:
    """FLOPs of one forward + backward of the dense model, counted by torch's FlopCounterMode.

    Counted on the dense model only: in torch 2.13 the counter sees neither `torch._grouped_mm`
    nor `mm(..., out=)`, the two ways moeify's experts run on CPU, so it would leave the experts
    out. A moeify arm's FLOPs are the dense ones plus 6 per token per extra active parameter
    (`flops_per_step`), the rule the dense count itself follows: 6 x 134.5M x tokens."""
    probe = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        probe(input_ids=x_BS, labels=x_BS).loss.backward()
    return counter.get_total_flops()


def flops_per_step(dense_flops: int, dense_active: int, active: int, tokens: int) -> int:
    return dense_flops + 6 * tokens * (active - dense_active)


def sibling_groups(model: nn.Module) -> list[tuple[str, list[tuple[int, int]]]]:
    """Per MoE layer, the pairs of routed experts that are the same part of the FFN: expert e is
    slice e % G of copy e // G (moeify.recipes.granularity's order)."""
    found = []
    for name, layer in moe_layers(model):
        g = layer.granularity
        pairs = [(a, b) for a, b in itertools.combinations(range(layer.num_experts), 2) if a % g == b % g]
        found.append((name, pairs))
    return found


def sibling_distance(model: nn.Module) -> float | None:
    """Mean over layers and sibling pairs of ||W_a - W_b|| / ||W_a|| (w_in and w_out together)."""
    distances = []
    layers = dict(moe_layers(model))
    for name, pairs in sibling_groups(model):
        experts = layers[name].experts
        flat_EN = torch.cat([experts.w_in.detach().flatten(1), experts.w_out.detach().flatten(1)], dim=1)
        for a, b in pairs:
            distances.append(((flat_EN[a] - flat_EN[b]).norm() / flat_EN[a].norm()).item())
    return sum(distances) / len(distances) if distances else None  # one copy in slices: no siblings


def _mean_entropy(record: dict[str, Any]) -> float:
    layers = record["monitors"]["router_entropy"]
    return statistics.fmean(m["entropy"] for name, m in layers.items() if name != "model")


def _optimizer(model: nn.Module, arm: Arm, lr: float, scale: Scale) -> torch.optim.Optimizer:
    if arm.moeify is None:
        groups = [{"params": list(model.parameters()), "lr": lr, "warmup_steps": scale.warmup, "name": "dense"}]
    else:
        groups = moeify.param_groups(
            model,
            lr,
            router_lr=scale.router_lr if arm.own_router_lr else lr,
            copied_warmup=scale.warmup,
            shared_warmup=scale.warmup,
            router_warmup=scale.warmup,
        )
    # betas and clipping as in SmolLM2's own training recipe; no weight decay in a 50-step run.
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)


def run(
    dense: nn.Module, corpus: Corpus, scale: Scale, arm: Arm, lr: float, seed: int, dense_flops: int
) -> dict[str, Any]:
    """Train a copy of `dense` as `arm` for `scale.steps` steps; the measurements as a dict."""
    torch.manual_seed(seed)
    model = copy.deepcopy(dense)
    dense_active = parameter_counts(model)["total"]
    if arm.moeify is not None:
        model = moeify.moeify(model, seed=seed, **arm.moeify)
    counts = parameter_counts(model) if arm.moeify is not None else {"total": dense_active}
    active = counts.get("active_per_token", dense_active)
    tokens = scale.batch_size * scale.seq_len
    step_flops = flops_per_step(dense_flops, dense_active, active, tokens)
    optimizer = _optimizer(model, arm, lr, scale)
    schedule = moeify.warmup_schedule(optimizer)
    runner = moeify.attach_monitors(model, ["router_entropy"]) if arm.moeify is not None else None
    siblings_at_init = sibling_distance(model) if arm.moeify is not None else None
    deviation = model.moeify_state.deviation if arm.moeify is not None else None
    val_BS = corpus.val_BS[:: max(1, len(corpus.val_BS) // scale.val_blocks)][: scale.val_blocks]

    evals = [{"step": 0, "val_loss": val_loss(model, val_BS, scale.batch_size), "flops": 0, "wall_s": 0.0}]
    train_losses, step_seconds, entropy = [], [], []
    wall = 0.0
    for step, x_BS in enumerate(batches(corpus, scale.batch_size, scale.steps, seed), start=1):
        start = time.perf_counter()
        loss = model(input_ids=x_BS, labels=x_BS).loss  # + the router losses (aux_loss_in_output)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        record = runner.step() if runner is not None else None
        seconds = time.perf_counter() - start
        wall += seconds
        step_seconds.append(seconds)
        train_losses.append(loss.item())
        if record is not None:
            entropy.append(_mean_entropy(record))
        if step % scale.eval_every == 0 or step == scale.steps:
            evals.append(
                {
                    "step": step,
                    "val_loss": val_loss(model, val_BS, scale.batch_size),
                    "flops": step * step_flops,
                    "wall_s": wall,
                }
            )
    result: dict[str, Any] = {
        "arm": arm.name,
        "seed": seed,
        "lr": lr,
        "router_lr": scale.router_lr if arm.own_router_lr else None,
        "moeify": arm.moeify,
        "params": {"total": counts["total"], "active_per_token": active, "dense": dense_active},
        "flops_per_step": step_flops,
        "flops_ratio_to_dense": step_flops / dense_flops,
        "tokens_per_step": tokens,
        "s_per_step_median": statistics.median(step_seconds),
        "evals": evals,
        "train_loss": train_losses,
        "final_val_loss": evals[-1]["val_loss"],
    }
    if arm.moeify is not None:
        result["specialisation"] = {
            "router_entropy_first": entropy[0],
            "router_entropy_last": entropy[-1],
            "sibling_distance_init": siblings_at_init,
            "sibling_distance_end": sibling_distance(model),
        }
        # Recipes that keep the dense function were checked to 1e-5 at conversion; the others
        # (re-initialisation) measured their largest per-layer deviation (moeify_state.deviation).
        result["init_deviation_max"] = max(deviation["layers"].values()) if deviation else None
        runner.close()
    return result
