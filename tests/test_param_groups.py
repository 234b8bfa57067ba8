"""`moeify.param_groups` and `moeify.warmup_schedule`: the three groups partition the trainable
parameters exactly (tied, frozen, granular, peft-wrapped and expert-parallel models), refusals come
before anything else, the warm-up gives each group its exact lr over real AdamW steps (also behind
`guard_bf16`), and per-group rates move routers and copied weights by what they say."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from core_helpers import HIDDEN, INTERMEDIATE, VOCAB, tiny_llama, tokens
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import moeify

E, LAYERS = 4, 2
# The tiny Llama converted with 4 experts and 1 shared expert, counted by hand per layer:
ROUTER = E * HIDDEN  # gate [E, D], no bias: 128
SHARED = 2 * INTERMEDIATE * HIDDEN + HIDDEN * INTERMEDIATE  # gate+up [1, 2I, D], down [1, D, I]: 6144
ATTENTION = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32  # q, k, v (2 kv heads of 8), o: 3072
ROUTED = E * SHARED  # E clones of the FFN: 24576
NORMS = 2 * HIDDEN
EMBED = VOCAB * HIDDEN  # 3200, and as much for the untied output head
COPIED = EMBED + LAYERS * (ATTENTION + ROUTED + NORMS) + HIDDEN + EMBED  # 61856


def converted(seed: int = 0, **extra) -> nn.Module:
    tied = extra.pop("tie_word_embeddings", False)
    recipe = {"num_experts": E, "top_k": 2, "num_shared_experts": 1} | extra
    return moeify.moeify(tiny_llama(seed, tie_word_embeddings=tied), **recipe)


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {group["name"]: group for group in groups}


def numel(group: dict) -> int:
    return sum(p.numel() for p in group["params"])


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, nothing else in any."""
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_three_groups_partition_the_trainable_parameters_with_their_settings():
    model = converted()
    groups = moeify.param_groups(
        model, 1e-5, router_lr=1e-3, shared_lr=3e-4, weight_decay=0.1, router_warmup=50, shared_warmup=20
    )
    assert [g["name"] for g in groups] == ["copied", "routers", "shared_experts"]
    assert_partition(model, groups)
    got = by_name(groups)
    assert (numel(got["copied"]), numel(got["routers"]), numel(got["shared_experts"])) == (61856, 256, 12288)
    assert (
        numel(got["routers"])
        == LAYERS * ROUTER
        == sum(p.numel() for _, layer in moeify.moe_layers(model) for p in layer.router.parameters())
    )
    assert numel(got["shared_experts"]) == LAYERS * SHARED and numel(got["copied"]) == COPIED
    settings = {g["name"]: (g["lr"], g["weight_decay"], g["warmup_steps"]) for g in groups}
    # The shared experts' weight decay defaults to the copied one; routers get none unless asked.
    assert settings == {"copied": (1e-5, 0.1, 0), "routers": (1e-3, 0.0, 50), "shared_experts": (3e-4, 0.1, 20)}
    assert all(set(g) == {"params", "lr", "weight_decay", "name", "warmup_steps"} for g in groups)
    # Defaults: every rate is lr, no decay, no warm-up; torch takes the groups as they are.
    defaults = moeify.param_groups(model, 2e-4, shared_weight_decay=0.05)
    assert [(g["lr"], g["weight_decay"], g["warmup_steps"]) for g in defaults] == [
        (2e-4, 0.0, 0),
        (2e-4, 0.0, 0),
        (2e-4, 0.05, 0),
    ]
    optimizer = torch.optim.AdamW(defaults)
    assert [g["name"] for g in optimizer.param_groups] == ["copied", "routers", "shared_experts"]


def test_tied_embeddings_count_once_and_frozen_parameters_are_left_out():
    model = converted(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = moeify.param_groups(model, 1e-4)
    assert_partition(model, groups)
    copied = by_name(groups)["copied"]
    assert numel(copied) == COPIED - EMBED == 58656
    assert sum(p is model.lm_head.weight for p in copied["params"]) == 1

    model = converted()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.experts.requires_grad_(False)
    for _, layer in moeify.moe_layers(model):
        layer.router.requires_grad_(False)
    groups = moeify.param_groups(model, 1e-4)
    assert [g["name"] for g in groups] == ["copied", "shared_experts"]  # the empty router group is left out
    assert_partition(model, groups)
    assert numel(by_name(groups)["copied"]) == COPIED - EMBED - ROUTED == 34080

    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^param_groups: LlamaForCausalLM has no trainable parameter"):
        moeify.param_groups(model, 1e-4)


def test_fine_grained_experts_and_no_shared_experts():
    model = converted(num_experts=8, top_k=4, granularity=4)
    groups = by_name(moeify.param_groups(model, 1e-4, router_lr=1e-3))
    assert_partition(model, list(groups.values()))
    # 8 slices of a quarter FFN each: the routed parameters are twice the dense FFN's, the router 8 rows.
    assert numel(groups["routers"]) == LAYERS * 8 * HIDDEN == 512
    assert numel(groups["copied"]) == COPIED - LAYERS * ROUTED + LAYERS * 2 * SHARED == 37280
    assert numel(groups["shared_experts"]) == LAYERS * SHARED

    model = converted(num_shared_experts=0)
    assert [g["name"] for g in moeify.param_groups(model, 1e-4)] == ["copied", "routers"]


def test_a_dense_model_is_refused_with_the_package_message():
    with pytest.raises(ValueError, match=r"^param_groups: LlamaForCausalLM has no moeify MoE layers: call moeify"):
        moeify.param_groups(tiny_llama(), 1e-4)
    with pytest.raises(TypeError, match="param_groups takes an nn.Module, got dict"):
        moeify.param_groups({}, 1e-4)


BAD = [
    ({"lr": 0.0}, ValueError, r"lr must be in \(0, inf\), got 0.0"),
    ({"lr": -1e-3}, ValueError, r"lr must be in \(0, inf\), got -0.001"),
    ({"lr": math.nan}, ValueError, r"lr must be in \(0, inf\), got nan"),
    ({"lr": math.inf}, ValueError, r"lr must be in \(0, inf\), got inf"),
    ({"lr": "1e-3"}, TypeError, "lr must be a number, got str"),
    ({"router_lr": 0}, ValueError, r"router_lr must be in \(0, inf\), got 0"),
    ({"shared_lr": math.nan}, ValueError, r"shared_lr must be in \(0, inf\), got nan"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
    ({"router_weight_decay": math.nan}, ValueError, r"router_weight_decay must be in \[0, inf\), got nan"),
    ({"shared_weight_decay": math.inf}, ValueError, r"shared_weight_decay must be in \[0, inf\), got inf"),
    ({"router_warmup": -1}, ValueError, "router_warmup must be >= 0 steps, got -1"),
    ({"shared_warmup": 1.5}, TypeError, r"shared_warmup must be an int \(optimizer steps\), got float"),
    ({"copied_warmup": True}, TypeError, r"copied_warmup must be an int \(optimizer steps\), got bool"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_settings_are_refused_before_the_model_is_looked_at(kwargs, error, message):
    kwargs = {"lr": 1e-4} | kwargs
    for model in (converted(), tiny_llama()):  # a dense model too: the setting is named first
        with pytest.raises(error, match=message):
            moeify.param_groups(model, **kwargs)


def lrs_over_steps(optimizer: torch.optim.Optimizer, model: nn.Module, steps: int) -> list[tuple[float, ...]]:
    """Each group's lr at every optimizer step of a real training run (step, then schedule)."""
    scheduler = moeify.warmup_schedule(optimizer)
    ids, seen = tokens(), []
    model.train()
    for _ in range(steps):
        seen.append(tuple(g["lr"] for g in optimizer.param_groups))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return seen


# lr 1e-3 everywhere; routers warm up over 3 steps, shared experts over 1, copied none.
WANT = [
    (1e-3, 2.5e-4, 5e-4),
    (1e-3, 5e-4, 1e-3),
    (1e-3, 7.5e-4, 1e-3),
    (1e-3, 1e-3, 1e-3),
    (1e-3, 1e-3, 1e-3),
]


def test_warmup_gives_each_group_its_exact_lr_over_adamw_steps():
    model = converted()
    optimizer = torch.optim.AdamW(moeify.param_groups(model, 1e-3, router_warmup=3, shared_warmup=1))
    assert lrs_over_steps(optimizer, model, 5) == [pytest.approx(row, rel=1e-12, abs=0) for row in WANT]
    # A plain optimizer (no warmup key) runs at its lr throughout.
    plain = torch.optim.AdamW(model.parameters(), lr=2e-3)
    assert lrs_over_steps(plain, model, 3) == [(2e-3,)] * 3


def test_warmup_schedule_refusals():
    with pytest.raises(TypeError, match="warmup_schedule takes a torch.optim.Optimizer, got list"):
        moeify.warmup_schedule([])
    model = converted()
    optimizer = torch.optim.AdamW(moeify.param_groups(model, 1e-3))
    optimizer.param_groups[1]["warmup_steps"] = -2
    with pytest.raises(ValueError, match="param group 'routers' warmup_steps must be >= 0 steps, got -2"):
        moeify.warmup_schedule(optimizer)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and "initial_lr" not in optimizer.param_groups[0]


@pytest.mark.parametrize("method", ["fp32_master", "stochastic_rounding"])
def test_warmup_behind_guard_bf16(method):
    """The guard's groups are the model's own dicts with our keys; each step hands the scheduled lr
    to the optimizer it steps inside."""
    model = converted().to(torch.bfloat16)
    groups = moeify.param_groups(model, 1e-3, router_warmup=3, shared_warmup=1)
    guarded = moeify.guard_bf16(model, torch.optim.AdamW(groups), method=method, seed=0)
    assert isinstance(guarded, moeify.precision.Bf16Guard)
    assert [(g["name"], g["warmup_steps"]) for g in guarded.param_groups] == [
        ("copied", 0),
        ("routers", 3),
        ("shared_experts", 1),
    ]
    assert lrs_over_steps(guarded, model, 5) == [pytest.approx(row, rel=1e-12, abs=0) for row in WANT]
    # The last step ran at the full rates: what the inner optimizer read.
    assert [g["lr"] for g in guarded._inner.param_groups] == pytest.approx([1e-3] * 3, rel=1e-12)


def test_router_rate_moves_routers_while_copied_weights_stay():
    """Routers at 1e-2, everything else at 1e-9, three AdamW steps: Adam's first steps move each
    weight by about its lr, so the routers move by ~1e-2 and the copied experts by ~1e-9."""
    model = converted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(moeify.param_groups(model, 1e-9, router_lr=1e-2))
    lrs_over_steps(optimizer, model, 3)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    router = min(v for n, v in moved.items() if ".router." in n)
    copied = max(v for n, v in moved.items() if ".router." not in n)
    # Measured: routers 2.83e-2 and 3.00e-2 (each layer's largest move); copied at most 5.6e-9, the
    # ~3e-9 of three steps rounded to fp32 neighbours of the weights (the norms' 1.0 does not move).
    assert router > 1e-2, router
    assert copied < 1e-8, copied
    assert max(v for n, v in moved.items() if ".experts." in n) > 0  # the experts did step


def test_peft_wrapped_model_groups_by_the_adapted_part():
    """ "routers+lora": the routers' trained copies, LoRA on the shared experts, LoRA on the routed
    experts (copied); the frozen base is left out. Same counts as peft's own grouping."""
    peft = pytest.importorskip("peft")
    from moeify.integrations.peft import trainable_summary

    model = converted(shared_expert_init="zero_out")
    model = peft.get_peft_model(model, moeify.lora_config(model, "routers+lora", r=2))
    groups = by_name(moeify.param_groups(model, 1e-4, router_lr=1e-3))
    assert_partition(model, list(groups.values()))
    summary = trainable_summary(model)
    assert numel(groups["routers"]) == summary["routers"]["trainable"] == LAYERS * ROUTER
    assert numel(groups["shared_experts"]) == summary["shared_experts"]["trainable"] > 0
    assert numel(groups["copied"]) == summary["routed_experts"]["trainable"] > 0
    assert summary["other"]["trainable"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_" in names[id(p)] and ".experts." in names[id(p)] for p in groups["copied"]["params"])
    assert all("modules_to_save" in names[id(p)] for p in groups["routers"]["params"])


@pytest.fixture
def one_rank():
    """A gloo process group of one rank, in this process (torch.distributed's global state)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_expert_parallel_shards_pass_through_as_copied(one_rank):
    import moeify.distributed as md

    plain, parallel = converted(), converted()
    md.apply_expert_parallel(parallel, one_rank)
    groups = by_name(moeify.param_groups(parallel, 1e-3, router_lr=1e-2))
    assert_partition(parallel, list(groups.values()))
    sharded = [p for p in groups["copied"]["params"] if isinstance(p, DTensor)]
    assert len(sharded) == LAYERS * 2  # w_in and w_out of each layer's routed experts
    assert not any(isinstance(p, DTensor) for g in ("routers", "shared_experts") for p in groups[g]["params"])
    for model in (plain, parallel):
        lrs_over_steps(torch.optim.AdamW(moeify.param_groups(model, 1e-3, router_lr=1e-2)), model, 2)
    for (name, p), q in zip(plain.named_parameters(), parallel.parameters(), strict=True):
        got = q.full_tensor() if isinstance(q, DTensor) else q
        torch.testing.assert_close(got, p, rtol=5e-5, atol=1e-7, msg=name)
