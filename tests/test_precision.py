"""bf16 safeguards (issue 4): the preflight against every bf16/fp16 value and against AdamW, the
three guards (exactness, optimizer protocol, resume), the lost-update counter and monitor, and
the trap itself: a converted tiny Llama stored in bf16 at lr 1e-5 keeps its experts clones."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch
from core_helpers import llama_config
from host_reads import HostReads
from torch import nn
from transformers import AutoModelForCausalLM

import moeify as moeify_pkg
from moeify import check_bf16, guard_bf16, moe_layers, moeify
from moeify.monitors import LostUpdates, attach_monitors, monitor_names
from moeify.monitors.base import DEFAULT_MONITORS, build_monitor
from moeify.precision import (
    Bf16Guard,
    LostUpdateCounter,
    kahan,
    lost_probability,
    spacing,
    stochastic_round_to_bf16,
    warn_if_lossy,
)

GUARDS = ("fp32_master", "kahan", "stochastic_rounding")


def tiny_llama(*, experts: bool = True) -> nn.Module:
    """2-layer Llama, init std 0.02; FFN weights with |w| in [0.01, 0.03] (the "|w| ≈ 0.02" of
    upcycled experts: N(0, 0.02) would leave 15% of the elements small enough to move at lr 1e-5)."""
    torch.manual_seed(0)
    config = llama_config(max_position_embeddings=64, initializer_range=0.02)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.copy_(torch.empty_like(p).uniform_(0.01, 0.03) * torch.randn_like(p).sign())
    return moeify(model, num_experts=4, top_k=2, num_shared_experts=0) if experts else model


def bf16_pair(n: int = 4096, seed: int = 0) -> tuple[nn.Parameter, torch.Tensor]:
    """A bf16 weight with |w| ≈ 0.02 and a constant bf16 gradient (Adam then steps ±lr)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.empty(n).uniform_(0.015, 0.025, generator=g) * torch.randn(n, generator=g).sign()).bfloat16()
    return nn.Parameter(w), torch.randn(n, generator=g).bfloat16()


def train(params: list[nn.Parameter], grads: list[torch.Tensor], optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------- preflight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("update", [1e-5, 3e-3, 2.0**-8, 2.0**-9, 2.0**-15, 2.0**-24, 2.0**-133, 0.5])
def test_lost_probability_is_exact_on_every_finite_value(dtype, update):
    """Against real rounding of x ± update, both directions, ties included (2^-8 is half of 1.0's
    spacing in bf16, 2^-133 half of the smallest bf16 subnormal)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    away = torch.where(x.float() < 0, -update, update)
    lost_away = (x.float() + away).to(dtype) == x
    lost_toward = (x.float() - away).to(dtype) == x
    expected = (lost_away.double() + lost_toward.double()) / 2
    assert torch.equal(lost_probability(x, update), expected)


def test_spacing():
    values = torch.tensor([1.0, 1.5, 0.02, -0.02, 0.0, 2.0**-130])
    assert spacing(values.bfloat16()).tolist() == [2.0**-7, 2.0**-7, 2.0**-13, 2.0**-13, 2.0**-133, 2.0**-133]
    assert spacing(torch.tensor([1.0, 0.0]).half()).tolist() == [2.0**-10, 2.0**-24]


@pytest.mark.parametrize("lr", [1e-5, 1e-4, 1e-3])
def test_check_bf16_predicts_what_adamw_loses(lr):
    """N(0, 0.02) weights in bf16, constant gradients, 5 AdamW steps: predicted lost fraction vs the
    observed fraction of elements that never changed, and vs the runtime counter."""
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter((torch.randn(100_000, generator=g) * 0.02).bfloat16())
    grad = torch.randn(100_000, generator=g).bfloat16()
    optimizer = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    predicted = check_bf16(optimizer).lost
    counter = LostUpdateCounter(optimizer, sample_size=20_000)
    start = w.detach().clone()
    changed = torch.zeros(w.shape, dtype=torch.bool)
    for _ in range(5):
        before = w.detach().clone()
        train([w], [grad], optimizer, 1)
        changed |= w.detach() != before
    observed = 1 - changed.double().mean().item()
    assert abs(predicted - observed) < 0.01, (predicted, observed)
    assert abs(counter.read().fraction - observed) < 0.02
    if lr == 1e-5:
        assert 0.83 < predicted < 0.86  # NOTES: 0.844 predicted vs 0.846 observed
        assert not torch.equal(w.detach(), start)


def test_check_bf16_report_groups_tensors_and_dtypes():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.LayerNorm(64))
    model[1].to(torch.bfloat16)
    model[2].to(torch.bfloat16)  # gains of 1.0: every update below ~4e-3 is lost
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 1e-5},
            {"params": [*model[1].parameters(), *model[2].parameters()], "lr": 1e-5},
        ]
    )
    report = check_bf16(optimizer, model=model)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["0.weight"].lost == 0.0 and by_name["0.weight"].dtype == "float32"
    assert by_name["2.weight"].lost == 1.0 and by_name["2.weight"].dtype == "bfloat16"
    assert [g.index for g in report.groups] == [0, 1]
    assert report.groups[0].lost == 0.0 and report.groups[0].low_precision_numel == 0
    assert report.groups[1].low_precision_numel == report.groups[1].numel == 64 * 64 + 64 + 128
    total = sum(t.lost * t.numel for t in report.tensors) / report.numel
    assert report.lost == pytest.approx(total)
    assert check_bf16(optimizer, lr=1.0).lost < check_bf16(optimizer).lost  # lr overrides the groups'
    assert check_bf16(model, lr=1e-5).lost == pytest.approx(report.lost)
    assert "bf16 preflight" in str(report) and report.to_dict()["groups"][1]["index"] == 1
    with pytest.raises(ValueError, match="needs the learning rate"):
        check_bf16(model)
    with pytest.raises(TypeError):
        check_bf16("model", lr=1e-5)


def test_warn_if_lossy_warns_or_raises_with_the_remedy():
    w, _ = bf16_pair()
    report = check_bf16(torch.optim.AdamW([w], lr=1e-5), threshold=0.5)
    assert report.lossy and report.lost == 1.0
    with pytest.warns(UserWarning, match="100.0%.*guard_bf16"):
        assert warn_if_lossy(report)
    with pytest.raises(ValueError, match="guard_bf16"):
        warn_if_lossy(report, strict=True)
    assert not warn_if_lossy(check_bf16(torch.optim.AdamW([w], lr=1e-2)), strict=True)


@pytest.mark.parametrize("method", GUARDS)
def test_check_bf16_sees_the_guards(method):
    w, _ = bf16_pair()
    model = nn.Module()
    model.w = w
    guarded = guard_bf16(model, torch.optim.AdamW([w], lr=1e-5), method, seed=0)
    assert isinstance(guarded, Bf16Guard) and guarded.protects(w)
    assert moeify_pkg.check_bf16 is check_bf16 and moeify_pkg.guard_bf16 is guard_bf16
    report = check_bf16(guarded)
    assert report.lost == 0.0 and report.tensors[0].protected


# ---------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2.0**-9, -(1.0 + 3 * 2.0**-10), 0.02 + 1e-5, -3e-3, 1e-30, 2.0**-130 * 1.3, 7.0, 0.0])
    draws = 20_000
    rounded = stochastic_round_to_bf16(x.repeat(draws, 1), g)
    assert rounded.dtype == torch.bfloat16
    down, gap = x.bfloat16().float(), spacing(x.bfloat16()).float()  # round-to-nearest and its spacing
    up = torch.where(down.abs() <= x.abs(), down + gap * x.sign(), down)
    low = torch.where(down.abs() <= x.abs(), down, down - gap * x.sign())
    assert ((rounded.float() == up) | (rounded.float() == low)).all()  # only the two neighbours
    mean = rounded.double().mean(0)
    sigma = gap.double() / 2 / draws**0.5
    assert ((mean - x.double()).abs() <= 5 * sigma + 1e-45).all(), (mean - x.double()) / sigma
    exact = torch.tensor([1.0, -0.5, 0.0, float("inf"), -float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact.repeat(100, 1), g), exact.bfloat16().repeat(100, 1))
    assert stochastic_round_to_bf16(torch.tensor([float("nan")])).isnan().all()
    same = [stochastic_round_to_bf16(x, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*same)


# ---------------------------------------------------------------- guards


def holder(*params: nn.Parameter) -> nn.Module:
    module = nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    return module


def test_fp32_master_follows_fp32_training_exactly():
    """Same grads (exact in bf16): the masters track an fp32 AdamW bit for bit; the bf16
    weights are their rounding."""
    w, grad = bf16_pair()
    ref = nn.Parameter(w.detach().float())
    guarded = guard_bf16(holder(w), torch.optim.AdamW([w], lr=1e-5, weight_decay=0.1))
    reference = torch.optim.AdamW([ref], lr=1e-5, weight_decay=0.1)
    train([w], [grad], guarded, 10)
    train([ref], [grad.float()], reference, 10)
    assert torch.equal(guarded.effective_value(w), ref.detach())
    assert torch.equal(w.detach(), ref.detach().bfloat16())
    assert (w.detach() != bf16_pair()[0].detach()).float().mean() > 0.5  # 10 · 1e-5 ≈ a bf16 spacing


def test_fp32_master_is_a_full_optimizer():
    w, grad = bf16_pair()
    model = holder(w)
    plain = torch.optim.AdamW([w], lr=1e-5)
    train([w], [grad], plain, 1)  # a step already taken: its state is carried over, in fp32
    guarded = guard_bf16(model, plain, "fp32_master")
    assert isinstance(guarded, torch.optim.Optimizer) and guarded.param_groups[0]["params"][0] is w
    assert guarded.state[w]["exp_avg"].dtype == torch.float32 and int(guarded.state[w]["step"]) == 1
    with pytest.raises(RuntimeError, match="replaced by moeify.guard_bf16"):
        plain.step()
    calls = []
    guarded.register_step_pre_hook(lambda *_: calls.append("pre"))
    guarded.register_step_post_hook(lambda *_: calls.append("post"))
    schedule = torch.optim.lr_scheduler.LambdaLR(guarded, lambda step: 1.0 if step < 2 else 0.0)
    for _ in range(3):
        w.grad = grad.clone()
        master = guarded.effective_value(w).clone()
        guarded.step()
        schedule.step()
    assert calls == ["pre", "post"] * 3
    assert torch.equal(guarded.effective_value(w), master)  # lr 0 at the third step: nothing moved
    guarded.zero_grad()
    assert w.grad is None


@pytest.mark.parametrize("method", ["fp32_master", "stochastic_rounding"])
def test_state_dict_is_tensors_only_and_resumes_exactly(method):
    def fresh():
        w, grad = bf16_pair()
        return w, grad, guard_bf16(holder(w), torch.optim.AdamW([w], lr=1e-4), method, seed=0)

    w, grad, guarded = fresh()
    train([w], [grad], guarded, 3)
    buffer = io.BytesIO()
    torch.save({"weights": w.detach().clone(), "optimizer": guarded.state_dict()}, buffer)
    train([w], [grad], guarded, 3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and primitives only
    assert set(saved["optimizer"]) == {"state", "param_groups", guarded.extra_key}
    w2, grad2, resumed = fresh()
    with torch.no_grad():
        w2.copy_(saved["weights"])
    resumed.load_state_dict(saved["optimizer"])
    train([w2], [grad2], resumed, 3)
    assert torch.equal(resumed.effective_value(w2), guarded.effective_value(w))
    assert torch.equal(w2, w)


def test_kahan_translates_torch_hyperparameters_exactly():
    """On fp32 weights (no compensation) optimi must follow torch step for step."""
    optimi = pytest.importorskip("optimi")
    cases = [
        (torch.optim.AdamW, {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
        (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.01}),
        (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.9}),
    ]
    g = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(256, generator=g), [torch.randn(256, generator=g) for _ in range(5)]
    for cls, kwargs in cases:
        a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
        reference = cls([a], **kwargs)
        guarded = kahan.kahan(cls([b], **kwargs))  # the translation (guard_bf16 leaves fp32 alone)
        assert isinstance(guarded, optimi.optimizer.OptimiOptimizer) and guarded.param_groups[0]["kahan_sum"]
        for grad in grads:
            a.grad, b.grad = grad.clone(), grad.clone()
            reference.step()
            guarded.step()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{cls.__name__} {kwargs}")


def test_kahan_errors_and_missing_optimi(monkeypatch):
    pytest.importorskip("optimi")
    w, _ = bf16_pair()
    model = holder(w)
    with pytest.raises(TypeError, match=r"torch\.optim\.AdamW, torch\.optim\.Adam, torch\.optim\.SGD"):
        guard_bf16(model, torch.optim.RMSprop([w]), "kahan")
    with pytest.raises(ValueError, match="amsgrad"):
        guard_bf16(model, torch.optim.AdamW([w], amsgrad=True), "kahan")
    with pytest.raises(ValueError, match="nesterov"):
        guard_bf16(model, torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True), "kahan")
    stepped = torch.optim.AdamW([w])
    train([w], [torch.ones_like(w)], stepped, 1)
    with pytest.raises(ValueError, match="before the first step"):
        guard_bf16(model, stepped, "kahan")
    monkeypatch.setitem(sys.modules, "optimi", None)  # as if torch-optimi were not installed
    with pytest.raises(ImportError, match="pip install torch-optimi"):
        guard_bf16(model, torch.optim.AdamW([w]), "kahan")
    assert isinstance(guard_bf16(model, torch.optim.AdamW([w]), "fp32_master"), Bf16Guard)


def test_stochastic_rounding_guard_is_unbiased_and_reproducible():
    """|w| ≈ 0.02 at lr 1e-5: plain bf16 never moves; stochastic rounding moves by fp32's progress
    on average while every stored value stays on the bf16 grid."""
    steps, lr = 30, 1e-5
    w, grad = bf16_pair(8192)
    start = w.detach().float().clone()
    guarded = guard_bf16(holder(w), torch.optim.AdamW([w], lr=lr, weight_decay=0.0), "stochastic_rounding", seed=0)
    counter = LostUpdateCounter(guarded)
    train([w], [grad], guarded, steps)
    assert w.dtype == torch.bfloat16
    progress = ((start - w.detach().float()) * grad.float().sign()).mean().item()  # fp32 would move steps·lr
    assert progress == pytest.approx(steps * lr, rel=0.05)
    assert counter.read().fraction == 0.0
    assert guarded.state[w]["exp_avg"].dtype == torch.float32

    w2, grad2 = bf16_pair(8192)
    again = guard_bf16(holder(w2), torch.optim.AdamW([w2], lr=lr, weight_decay=0.0), "stochastic_rounding", seed=0)
    train([w2], [grad2], again, steps)
    assert torch.equal(w2, w)  # same seed, same draws
    plain_w, plain_grad = bf16_pair(8192)
    train([plain_w], [plain_grad], torch.optim.AdamW([plain_w], lr=lr, weight_decay=0.0), steps)
    assert torch.equal(plain_w.detach().float(), start)


def test_guard_errors_and_scope():
    w, _ = bf16_pair()
    model = holder(w)
    with pytest.raises(ValueError, match="method must be one of"):
        guard_bf16(model, torch.optim.AdamW([w]), "magic")
    with pytest.raises(ValueError, match="scope must be one of"):
        guard_bf16(model, torch.optim.AdamW([w]), scope="some")
    with pytest.raises(ValueError, match="not parameters of the model"):
        guard_bf16(nn.Linear(2, 2), torch.optim.AdamW([w]))
    with pytest.raises(ValueError, match="already guarded"):
        guard_bf16(model, guard_bf16(model, torch.optim.AdamW([w])))
    with pytest.raises(ValueError, match="has none"):
        guard_bf16(model, torch.optim.AdamW([w]), scope="moe")
    fp32 = nn.Parameter(torch.ones(4))  # refused for the combination, not warned about as nothing to guard
    with pytest.raises(ValueError, match="method='kahan' compensates every bf16/fp16 parameter"):
        guard_bf16(holder(fp32), torch.optim.AdamW([fp32]), "kahan", scope="moe")
    half = nn.Parameter(torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp16"):
        guard_bf16(holder(half), torch.optim.AdamW([half]), "stochastic_rounding")

    llama = tiny_llama().to(torch.bfloat16)
    guarded = guard_bf16(llama, torch.optim.AdamW(llama.parameters()), scope="moe")
    protected = {n for n, p in llama.named_parameters() if guarded.protects(p)}
    assert protected and all(".mlp.experts." in n for n in protected)
    assert not any(guarded.protects(p) for n, p in llama.named_parameters() if "self_attn" in n)


# ---------------------------------------------------------------- counter and monitor


@pytest.mark.parametrize("method", [None, *GUARDS])
def test_counter_adds_no_host_read_to_the_step(method):
    calls = {}
    for counted in (False, True):
        w, grad = bf16_pair(2048)
        optimizer = torch.optim.AdamW([w], lr=1e-5)
        if method:
            optimizer = guard_bf16(holder(w), optimizer, method, seed=0)
        counter = LostUpdateCounter(optimizer, sample_size=256) if counted else None
        train([w], [grad], optimizer, 1)  # lazy state set up outside the recording
        w.grad = grad.clone()
        with HostReads() as reads:
            optimizer.step()
        calls[counted] = reads.calls
    assert calls[True] == calls[False]
    reading = counter.read()
    assert reading.steps == 2 and reading.intended == 2 * 256
    assert reading.fraction == (1.0 if method is None else 0.0)


def test_lost_updates_monitor_reports_and_warns():
    assert "lost_updates" in monitor_names() and "lost_updates" not in DEFAULT_MONITORS
    with pytest.raises(ValueError, match="needs the optimizer"):
        build_monitor("lost_updates")
    model = tiny_llama().to(torch.bfloat16)
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    rest = [p for n, p in model.named_parameters() if ".experts." not in n]
    optimizer = torch.optim.AdamW([{"params": experts}, {"params": rest}], lr=1e-5)
    runner = attach_monitors(model, ["expert_load", LostUpdates(optimizer, model=model, sample_size=256)])
    runner.attach_optimizer(optimizer)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = runner.history[-1]["monitors"]["lost_updates"]
    assert metrics["param_group_0"]["lost_fraction"] == 1.0 and metrics["param_group_0"]["intended"] > 0
    assert 0.5 < metrics["model"]["lost_fraction"] < 1.0  # the N(0, 0.02) embeddings keep ~15%
    kinds = [e["kind"] for e in runner.events if e["monitor"] == "lost_updates"]
    assert kinds == ["updates_lost"]  # once, not every step
    assert "guard_bf16" in runner.events[0]["detail"]
    assert runner.close()["monitors"]["lost_updates"]["model"]["lost_fraction"] > 0.5


# ---------------------------------------------------------------- the trap (issue 4)


def test_routers_and_statistics_stay_fp32_in_a_bf16_model():
    model = tiny_llama()
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    model.to(torch.bfloat16)
    for name, param in model.named_parameters():
        if ".router." in name:
            assert param.dtype == torch.float32 and torch.equal(param, routers[name])  # not bf16-rounded
        else:
            assert param.dtype == torch.bfloat16
    for _, layer in moe_layers(model):
        assert layer.tokens_per_expert.dtype == torch.int64
        assert layer.stat_sums.dtype == layer.stat_prob_sum.dtype == torch.float32
    model.half()
    assert all(layer.stat_sums.dtype == torch.float32 for _, layer in moe_layers(model))
    model.to(torch.bfloat16)
    for lr, low, high in ((1e-5, 1.0, 1.0), (1e-2, 0.0, 0.0)):
        experts = [t for t in check_bf16(model, lr=lr).tensors if ".experts." in t.name]
        assert experts and all(low <= t.lost <= high for t in experts), (lr, experts)


@pytest.mark.parametrize("method", [None, *GUARDS])
def test_bf16_trap_keeps_experts_clones_unless_guarded(method):
    """Plain AdamW at lr 1e-5 on a bf16 model: the routed experts stay bit-identical to each other
    and to their init, and ~100% of their updates are counted lost. Each guard: ~0% lost and the
    experts separate (the router sends them different tokens)."""
    if method == "kahan":
        pytest.importorskip("optimi")
    model = tiny_llama().to(torch.bfloat16)
    experts = [layer.experts for _, layer in moe_layers(model)]
    start = [(e.w_in.detach().clone(), e.w_out.detach().clone()) for e in experts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if method is not None:
        optimizer = guard_bf16(model, optimizer, method, seed=0)
    counter = LostUpdateCounter(optimizer, model=model, sample_size=512)
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lost = counter.read().fraction_where(lambda name, group: ".mlp.experts." in name)
    clones = all(
        torch.equal(e.w_in[i], e.w_in[0]) and torch.equal(e.w_out[i], e.w_out[0]) for e in experts for i in range(4)
    )
    unchanged = all(torch.equal(e.w_in, a) and torch.equal(e.w_out, b) for e, (a, b) in zip(experts, start))
    if method is None:
        assert lost >= 0.95 and clones and unchanged
    else:
        assert lost <= 0.05 and not clones and not unchanged
        spread = max(
            (e.w_in[i].float() - e.w_in[0].float()).norm() / e.w_in[0].float().norm() for e in experts for i in range(4)
        )
        assert spread > 1e-3
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".router." in n)


def test_check_bf16_warns_above_threshold_and_raises_in_strict_mode():
    layer = nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.uniform_(0.01, 0.03)
    with pytest.warns(UserWarning, match="guard_bf16"):
        check_bf16(layer, lr=1e-5)
    with pytest.raises(ValueError, match="guard_bf16"):
        check_bf16(layer, lr=1e-5, strict=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_bf16(layer, lr=1e-5, warn=False)  # silent when asked
        check_bf16(layer, lr=1e-2)  # nothing lost: no warning


@pytest.mark.parametrize("lr", [0, 0.0, -1e-5, math.inf, math.nan, True])
def test_check_bf16_refuses_an_lr_it_cannot_judge(lr) -> None:
    model = holder(nn.Parameter(torch.randn(64).to(torch.bfloat16)))
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        check_bf16(model, lr=lr)


def test_check_bf16_judges_a_warm_up_at_its_peak() -> None:
    """During warm-up the optimizer's lr is 0: the prediction is made at the scheduler's peak
    (`initial_lr`), and says so; a group at lr 0 with no peak is left out, and said."""
    w = nn.Parameter((torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16))
    optimizer = torch.optim.AdamW([w], lr=1e-5)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 100)  # warm-up from 0
    assert optimizer.param_groups[0]["lr"] == 0
    report = check_bf16(optimizer, warn=False)
    at_peak = check_bf16(holder(w), lr=1e-5, warn=False)
    assert report.lost == at_peak.lost > 0.8
    assert report.notes == ("group 0 is at lr 0 (warm-up?): judged at its scheduler's peak lr 1e-05 (initial_lr)",)
    bare = torch.optim.AdamW([w], lr=0.0)
    report = check_bf16(bare, warn=False)
    assert report.numel == 0 and "not judged; pass lr=<its peak>" in report.notes[0]


@pytest.mark.parametrize("method", ["fp32_master", "kahan", "stochastic_rounding"])
def test_guard_bf16_with_nothing_to_guard_warns_and_keeps_the_optimizer(method: str) -> None:
    w = nn.Parameter(torch.randn(8))
    optimizer = torch.optim.SGD([w], lr=0.1)
    with pytest.warns(UserWarning, match="nothing to guard"):
        returned = guard_bf16(holder(w), optimizer, method)
    assert returned is optimizer
    w.grad = torch.ones(8)
    before = w.detach().clone()
    optimizer.step()  # not retired: it still steps
    assert torch.allclose(w.detach(), before - 0.1)
