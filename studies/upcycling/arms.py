"""What the study compares, as data: the scales it runs at and the arms (dense, and moeify
recipes). Every arm of one seed sees the same batches in the same order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scale:
    name: str
    seq_len: int
    batch_size: int
    steps: int
    eval_every: int
    val_blocks: int  # held-out blocks evaluated, spread evenly over the held-out text
    layers: int | None  # None: all 30 decoder layers; quick mode keeps the first N
    seeds: tuple[int, ...]
    dense_lrs: tuple[float, ...]  # the dense baseline's sweep; the best one is every arm's lr
    warmup: int  # linear warm-up of every parameter group, optimizer steps
    router_lr: float  # the router learning rate of the arms that give routers their own


# ~60 min on 2 CPU cores: 14 runs, one dense step of 4 x 64 tokens ~3.2 s, a top-1 MoE step ~5 s
# (results/study.json: runs_wall_s).
FULL = Scale(
    name="full",
    seq_len=64,
    batch_size=4,
    steps=50,
    eval_every=10,
    val_blocks=24,
    layers=None,
    seeds=(0, 1, 2),
    dense_lrs=(3e-5, 1e-4, 3e-4),
    warmup=5,
    router_lr=1e-3,
)
# The CI smoke run of the same code: the real checkpoint cut to 2 layers, a few steps (~1 min).
QUICK = Scale(
    name="quick",
    seq_len=32,
    batch_size=2,
    steps=4,
    eval_every=2,
    val_blocks=4,
    layers=2,
    seeds=(0, 1),
    dense_lrs=(1e-4, 3e-4),
    warmup=1,
    router_lr=1e-3,
)
SCALES = {scale.name: scale for scale in (FULL, QUICK)}


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    why: str
    moeify: dict[str, Any] | None = None  # None: the dense model
    own_router_lr: bool = False  # routers at Scale.router_lr (moeify.param_groups), the rest at the best dense lr
    equal_flops: bool = False  # the same active FLOPs per token as dense (up to the router)


DENSE = Arm("dense", "dense", "the baseline, at each learning rate of the sweep")

# Equal compute: 2 copies of each FFN cut into 4 slices of a quarter of its width, top-4 of the 8:
# a token runs through one FFN's worth of weights, as in the dense model, and each copy's slices
# differ from each other from step 0, so the router's choice changes the output and the routers get
# a task gradient at once (identical clones give them none: any mix of equal experts is the same
# function). Once a copy's tied router rows untie, top-4 may take slice 1 of both copies and slice
# 2 of neither: a quarter of the FFN's neurons dropped for that token.
FINE = {"num_experts": 8, "granularity": 4, "top_k": 4, "num_shared_experts": 0}

ARMS: tuple[Arm, ...] = (
    Arm(
        "clone_top2_shared",
        "4 clones, top-2, 1 shared (zero)",
        "the plain recipe: identical clones, 2.2x the dense FLOPs per token",
        moeify={"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "shared_expert_init": "zero_out"},
    ),
    Arm(
        "fine",
        "fine-grained 8 x 1/4, top-4",
        "equal FLOPs; every parameter at the dense lr. Each copy's router rows start tied, so top-4 takes one "
        "whole copy (the dense FFN); once they untie, top-4 can take the same slice from both copies and "
        "drop another, a quarter of the FFN's neurons lost for that token",
        moeify=FINE,
        equal_flops=True,
    ),
    Arm(
        "fine_router_lr",
        "fine-grained 8 x 1/4, top-4, router lr",
        "equal FLOPs; routers at their own learning rate (moeify.param_groups)",
        moeify=FINE,
        own_router_lr=True,
        equal_flops=True,
    ),
    Arm(
        "fine_router_lr_bias",
        "fine-grained + router lr + bias balancing",
        "equal FLOPs; loss-free balancing: a per-expert bias on the routing scores, moved toward even load",
        moeify={**FINE, "balance_bias_rate": 1e-3},
        own_router_lr=True,
        equal_flops=True,
    ),
    Arm(
        "fine_router_lr_drop",
        "fine-grained + router lr + 10% re-init",
        "equal FLOPs; Drop-Upcycling: 10% of each expert's neurons re-initialised, so the copies differ too",
        moeify={**FINE, "reinit_fraction": 0.1},
        own_router_lr=True,
        equal_flops=True,
    ),
    Arm(
        "slices_top4",
        "1 copy in 4 slices x 1/4, all active",
        "equal FLOPs, no neuron ever dropped: the router re-weights the FFN's four neuron groups per token "
        "(weights 4·p, so uniform scores are the dense FFN) and gets a task gradient from step 1",
        moeify={"num_experts": 4, "granularity": 4, "top_k": 4, "num_shared_experts": 0},
        equal_flops=True,
    ),
    Arm(
        "clone_top1",
        "4 clones, top-1",
        "equal FLOPs, sparse: each clone trains on the tokens routed to it; the routers learn from the router "
        "losses only (a top-1 weight is always 1)",
        moeify={"num_experts": 4, "top_k": 1, "num_shared_experts": 0},
        equal_flops=True,
    ),
)


def recommended(runs: list[dict[str, Any]], lr: float, seed: int) -> str:
    """The recipe the study recommends, chosen by a rule fixed before the results: the equal-FLOPs
    arm with the lowest final held-out loss on the first seed; the other seeds then test it."""
    candidates = {arm.name for arm in ARMS if arm.equal_flops}
    first = [r for r in runs if r["arm"] in candidates and r["lr"] == lr and r["seed"] == seed]
    return min(first, key=lambda r: r["final_val_loss"])["arm"]
