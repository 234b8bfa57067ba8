"""Layer mechanics: packed experts against module (generic) experts, the CPU expert loop against
the grouped path, the grouped-mm path against the per-expert loop, mixed precision, routing counts, routers, router losses, and the
gradients of shared experts under each training init.

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import HIDDEN, INNER, D, logits, tiny_llama, tokens
from host_reads import HostReads
from torch import Tensor, nn

import moeify
from moeify import FFNLayout, MoeLayer, moe_layers
from moeify.architectures.layouts import Piece, read_weights
from moeify.layers import dispatch, expert_loop, losses
from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.routers import ConditioningContext, RouterSpec, build_router, router_kinds

E, K = 4, 2

# ---------------------------------------------------------------------------------------------
# One dense FFN per layout kind, with and without biases


class Mlp(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc_in, self.fc_out, self.act = (
            nn.Linear(D, INNER, bias=bias),
            nn.Linear(INNER, D, bias=bias),
            nn.GELU("tanh"),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Gated(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(D, INNER, bias=bias), nn.Linear(D, INNER, bias=bias)
        self.down, self.act = nn.Linear(INNER, D, bias=bias), nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class FusedGated(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.gate_up, self.down, self.act = (
            nn.Linear(D, 2 * INNER, bias=bias),
            nn.Linear(INNER, D, bias=bias),
            nn.SiLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


KINDS = {
    "mlp": (Mlp, FFNLayout("mlp", proj_in="fc_in", proj_out="fc_out", act="act")),
    "gated": (Gated, FFNLayout("gated", proj_gate="gate", proj_in="up", proj_out="down", act="act")),
    "fused_gated": (FusedGated, FFNLayout("fused_gated", proj_in="gate_up", proj_out="down", act="act")),
}


def _stack(pieces: list[Piece]) -> Tensor:
    return torch.cat([piece.value() for piece in pieces])


def _grad_pieces(pieces: list[Piece] | None) -> Tensor | None:
    """The gradient of the packed rows read from these pieces (zero where an expert never ran)."""
    if pieces is None:
        return None
    grads = [
        Piece(p.param.grad if p.param.grad is not None else torch.zeros_like(p.param), p.transposed, p.half)
        for p in pieces
    ]
    return _stack(grads)


def make_pair(kind: str, bias: bool, seed: int = 0) -> tuple[PackedExperts, ModuleExperts, FFNLayout]:
    """The same E experts twice, as PackedExperts and as ModuleExperts. Each expert is perturbed
    differently, so a token sent to the wrong expert shows."""
    cls, layout = KINDS[kind]
    torch.manual_seed(seed)
    modules = ModuleExperts(cls(bias), E)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(0.1 * torch.randn_like(p))
    first = read_weights(modules.experts[0], layout)
    packed = PackedExperts(E, D, INNER, D, gated=first.gated, act=first.act, bias_in=bias, bias_out=bias)
    with torch.no_grad():
        for e, expert in enumerate(modules.experts):
            w = read_weights(expert, layout)
            packed.w_in[e].copy_(_stack(w.w_in))
            packed.w_out[e].copy_(_stack(w.w_out))
            if bias:
                packed.b_in[e].copy_(_stack(w.b_in))
                packed.b_out[e].copy_(_stack(w.b_out))
    return packed, modules, layout


ROUTE_CASES = ("normal", "skewed", "empty", "single")


def routes(case: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """expert_idx_TK (distinct experts per token) and renormalised weights_TK."""
    g = torch.Generator().manual_seed(seed)
    tokens_ = 1 if case == "single" else 12
    if case in ("normal", "single"):
        idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens_)])
    elif case == "skewed":  # expert 0 is in every token's top-k: half of all assignments
        idx_TK = torch.stack([torch.zeros(tokens_, dtype=torch.long), torch.randint(1, E, (tokens_,), generator=g)], 1)
    else:  # only experts 0 and 3: experts 1 and 2 (in the middle of the offsets) get nothing
        idx_TK = torch.tensor([[0, 3], [3, 0]]).repeat(tokens_ // 2, 1)
    return idx_TK, torch.softmax(torch.randn(tokens_, K, generator=g), dim=-1)


def run(experts: nn.Module, layout: FFNLayout, idx_TK: Tensor, weights_TK: Tensor, seed: int = 1) -> dict:
    """Forward, backward with a random upstream gradient; outputs and every gradient, the expert
    gradients in packed form."""
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(idx_TK.shape[0], D, generator=g).requires_grad_()
    w_TK = weights_TK.clone().requires_grad_()
    y_TD, counts_E = experts(x_TD, idx_TK, w_TK)
    (y_TD * torch.randn(y_TD.shape, generator=g)).sum().backward()
    result = {"y": y_TD.detach(), "counts": counts_E, "x.grad": x_TD.grad, "weights.grad": w_TK.grad}
    if isinstance(experts, PackedExperts):
        for name in ("w_in", "b_in", "w_out", "b_out"):
            param = getattr(experts, name)
            result[name] = (
                None if param is None else (param.grad if param.grad is not None else torch.zeros_like(param))
            )
    else:
        read = [read_weights(expert, layout) for expert in experts.experts]
        for name in ("w_in", "b_in", "w_out", "b_out"):
            per_expert = [_grad_pieces(getattr(w, name)) for w in read]
            result[name] = None if per_expert[0] is None else torch.stack(per_expert)
    return result


def assert_same(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None:
            assert b[key] is None, key
        elif key == "counts":
            assert torch.equal(a[key], b[key])
        else:
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_matches_module_experts(kind: str, bias: bool, case: str) -> None:
    packed, modules, layout = make_pair(kind, bias)
    idx_TK, weights_TK = routes(case)
    grouped = run(packed, layout, idx_TK, weights_TK)
    generic = run(modules, layout, idx_TK, weights_TK)
    assert_same(grouped, generic, tol=1e-5)
    counts = grouped["counts"]
    assert counts.dtype == torch.int64 and int(counts.sum()) == idx_TK.numel()
    assert torch.equal(counts, torch.bincount(idx_TK.flatten(), minlength=E))
    if case == "skewed":
        assert int(counts[0]) * 2 >= idx_TK.numel()
    if case == "empty":
        assert counts[1:3].tolist() == [0, 0]
        assert float(grouped["w_in"][1:3].abs().max()) == 0.0 and float(grouped["w_out"][1:3].abs().max()) == 0.0
    assert float(grouped["w_in"][int(idx_TK[0, 0])].abs().max()) > 0  # a used expert got a gradient


@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_grouped_mm_matches_per_expert_loop(kind: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packed, _, layout = make_pair(kind, bias=True)
    idx_TK, weights_TK = routes(case)
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    monkeypatch.setattr(expert_loop, "applies", lambda *args: False)  # the grouped path, as on a GPU
    grouped = run(packed, layout, idx_TK, weights_TK)
    assert len(calls) == 2  # both projections took the grouped path
    packed.zero_grad()
    monkeypatch.setattr(dispatch, "_grouped_mm_ok", lambda x, w: False)
    loop = run(packed, layout, idx_TK, weights_TK)
    assert len(calls) == 2  # ... and now neither did
    assert_same(grouped, loop, tol=1e-6)


@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_expert_loop_matches_grouped_path(kind: str, bias: bool, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packed, _, layout = make_pair(kind, bias)
    idx_TK, weights_TK = routes(case)
    calls = []
    real = expert_loop.ExpertLoop.apply
    monkeypatch.setattr(expert_loop.ExpertLoop, "apply", lambda *args: calls.append(1) or real(*args))
    looped = run(packed, layout, idx_TK, weights_TK)
    assert calls == [1]  # the CPU default is the expert loop, with its own backward
    packed.zero_grad()
    monkeypatch.setattr(expert_loop, "applies", lambda *args: False)
    grouped = run(packed, layout, idx_TK, weights_TK)
    assert calls == [1]
    assert_same(looped, grouped, tol=1e-6)
    if case == "empty":  # idle experts' gradients are written as exact zeros, not left as garbage
        assert float(looped["w_in"][1:3].abs().max()) == 0.0 and float(looped["w_out"][1:3].abs().max()) == 0.0


@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_expert_loop_without_autograd_matches(
    kind: str, bias: bool, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference gathers, weights and adds back inside the loop: same output and counts."""
    packed, _, _ = make_pair(kind, bias)
    idx_TK, weights_TK = routes(case)
    x_TD = torch.randn(idx_TK.shape[0], D, generator=torch.Generator().manual_seed(1))
    calls = []
    real, real_few = expert_loop.run_combined, expert_loop.run_few
    monkeypatch.setattr(expert_loop, "run_combined", lambda *args: calls.append("sorted") or real(*args))
    monkeypatch.setattr(expert_loop, "run_few", lambda *args: calls.append("one token") or real_few(*args))
    with torch.no_grad():
        y_TD, counts_E = packed(x_TD, idx_TK, weights_TK)
    expected = ["one token" if idx_TK.shape[0] <= expert_loop.FEW_TOKENS else "sorted"]
    assert calls == expected
    trained_TD, trained_counts_E = packed(x_TD, idx_TK, weights_TK)  # the autograd path
    assert calls == expected and trained_TD.grad_fn is not None
    torch.testing.assert_close(y_TD, trained_TD.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(counts_E, trained_counts_E)


@pytest.mark.parametrize("kind", list(KINDS))
def test_expert_loop_gradcheck(kind: str) -> None:
    """Every gradient of the loop against finite differences (float64), idle expert included."""
    packed, _, _ = make_pair(kind, bias=True)
    packed.double()
    idx_TK, _ = routes("empty")
    _, _, expert_A, counts_E = dispatch.sort_by_expert(idx_TK[:3], E)
    x_AD = torch.randn(expert_A.shape[0], D, dtype=torch.float64, requires_grad=True)
    tensors = [x_AD] + [
        p.detach().clone().requires_grad_() for p in (packed.w_in, packed.b_in, packed.w_out, packed.b_out)
    ]

    def loop(*inputs: Tensor) -> Tensor:
        return expert_loop.run(*inputs, counts_E, packed._activation)

    assert torch.autograd.gradcheck(loop, tuple(tensors), eps=1e-6, atol=1e-5)


def test_expert_loop_computes_only_the_gradients_asked_for() -> None:
    """Frozen experts (the "routers+shared" recipe): only the tokens' gradient is computed, and it
    equals the one computed alongside the weight gradients."""
    packed, _, _ = make_pair("gated", bias=True)
    idx_TK, weights_TK = routes("normal")
    x_TD = torch.randn(idx_TK.shape[0], D, requires_grad=True)
    packed(x_TD, idx_TK, weights_TK)[0].square().sum().backward()
    full = x_TD.grad.clone()
    x_TD.grad = None
    packed.zero_grad(set_to_none=True)
    packed.w_in.requires_grad_(False)
    packed.b_out.requires_grad_(False)
    packed(x_TD, idx_TK, weights_TK)[0].square().sum().backward()
    assert packed.w_in.grad is None and packed.b_out.grad is None
    assert packed.b_in.grad is not None and packed.w_out.grad is not None
    assert torch.equal(x_TD.grad, full)


def test_expert_loop_runs_only_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    packed, _, _ = make_pair("gated", bias=False)
    tensors = (packed.w_in, packed.b_in, packed.w_out, packed.b_out)
    x = torch.zeros(3, D)
    # Large enough: the [A, 2*INNER] fp32 intermediate of 100 assignments.
    monkeypatch.setattr(expert_loop, "MIN_INTERMEDIATE_BYTES", 100 * 2 * INNER * 4)
    assert packed._runs_expert_by_expert(x, tensors, 100)
    assert not packed._runs_expert_by_expert(x, tensors, 99)  # fits in cache: the grouped path
    assert not packed._runs_expert_by_expert(x.bfloat16(), tensors, 100)  # mixed dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not packed._runs_expert_by_expert(x, tensors, 100)  # autocast picks the projections' dtype
    packed.mid_dropout = 0.1
    packed.eval()
    assert packed._runs_expert_by_expert(x, tensors, 100)  # eval: dropout is the identity
    packed.train()
    assert not packed._runs_expert_by_expert(x, tensors, 100)  # its mask would have to be replayed in backward
    packed.mid_dropout, packed.act = 0.0, nn.SiLU(inplace=True)
    assert not packed._runs_expert_by_expert(x, tensors, 100)  # backward recomputes from the pre-activation


def test_grouped_path_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole MoE layer forward (routing, losses, counts, grouped dispatch) on the grouped path,
    the one GPUs take: no value is copied to the host, so nothing waits for the device."""
    monkeypatch.setattr(expert_loop, "MIN_INTERMEDIATE_BYTES", 1 << 62)
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2)
    _, layer = moe_layers(model)[0]
    x = torch.randn(2, 8, HIDDEN)
    with HostReads() as reads:
        y = layer(x)
    assert reads.calls == []
    monkeypatch.setattr(expert_loop, "MIN_INTERMEDIATE_BYTES", 0)
    with HostReads() as reads:
        looped = layer(x)
    torch.testing.assert_close(looped, y, rtol=1e-6, atol=1e-6)
    assert reads.calls == ["tolist"]  # the CPU expert loop reads its split sizes once (a CPU memory read)


def test_grouped_mm_is_chosen_only_where_supported() -> None:
    x = torch.zeros(3, 16)
    assert dispatch._grouped_mm_ok(x, torch.zeros(4, 32, 16))
    assert dispatch._grouped_mm_ok(x.bfloat16(), torch.zeros(4, 32, 16, dtype=torch.bfloat16))
    assert not dispatch._grouped_mm_ok(x, torch.zeros(4, 32, 16, dtype=torch.bfloat16))  # mixed dtypes
    assert not dispatch._grouped_mm_ok(torch.zeros(3, 15), torch.zeros(4, 32, 15))  # rows not 16-byte aligned
    assert not dispatch._grouped_mm_ok(x.half(), torch.zeros(4, 32, 16, dtype=torch.float16))  # CPU: fp32/bf16 only


# ---------------------------------------------------------------------------------------------
# Mixed precision


def _router_logit_dtypes(model: nn.Module) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []
    for _, layer in moe_layers(model):
        layer.router.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    return dtypes


def test_bf16_autocast_forward_backward() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4).train()
    dtypes = _router_logit_dtypes(model)
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss  # includes aux_loss in training mode
    assert out.logits.dtype == torch.bfloat16  # the experts really ran in bf16
    assert dtypes == [torch.float32, torch.float32]
    layer = model.model.layers[0].mlp
    assert all(value.dtype == torch.float32 for value in layer.last_losses.values())
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    for name, param in model.named_parameters():
        assert param.grad is None or bool(torch.isfinite(param.grad).all()), name
    router_grad = layer.router.gate.weight.grad
    assert router_grad.dtype == torch.float32 and float(router_grad.abs().max()) > 0
    assert float(layer.experts.w_in.grad.abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routers_stay_fp32_when_the_model_is_cast(dtype: torch.dtype) -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, router="mlp")
    model.to(dtype) if dtype == torch.bfloat16 else model.half()
    for _, layer in moe_layers(model):
        assert {p.dtype for p in layer.router.parameters()} == {torch.float32}
        assert {p.dtype for p in layer.experts.parameters()} == {dtype}
        assert {p.dtype for p in layer.shared_experts.parameters()} == {dtype}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    if dtype == torch.bfloat16:
        dtypes = _router_logit_dtypes(model)
        out = logits(model, tokens())
        assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
        assert dtypes == [torch.float32, torch.float32]


# ---------------------------------------------------------------------------------------------
# Routing counts, routers, router losses


def test_tokens_per_expert_counts_assignments() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2)
    layer = model.model.layers[0].mlp
    assert layer.tokens_per_expert.dtype == torch.int64
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer(x)
        _, _, _, idx_TK, _ = layer.route(x.reshape(-1, 32), x.shape[:-1])
    assert int(layer.tokens_per_expert.sum()) == 2 * 8 * 2
    assert torch.equal(layer.tokens_per_expert, torch.bincount(idx_TK.flatten(), minlength=4))
    with torch.no_grad():
        layer(x)  # counts build up until the monitors read and reset them
    assert int(layer.tokens_per_expert.sum()) == 2 * 2 * 8 * 2
    layer.reset_stats()
    assert int(layer.tokens_per_expert.sum()) == 0


@pytest.mark.parametrize("kind", router_kinds())
def test_router_kind_builds_and_gives_finite_fp32_logits(kind: str) -> None:
    torch.manual_seed(0)
    spec = RouterSpec(
        hidden_size=D, num_experts=E, router_hidden_size=8, num_heads=2, init_std=0.02, conditioning_dim=12
    )
    router = build_router(kind, spec)
    assert router.num_experts == E
    batch, seq = 2, 5
    if kind == "cross_attention":
        router.context = ConditioningContext("encoder_hidden_states", "Test")
        router.context.value = torch.randn(batch, 3, 12)
    x_TD = torch.randn(batch * seq, D, dtype=torch.bfloat16)
    logits_TE = router(x_TD, torch.Size([batch, seq]))
    assert logits_TE.shape == (batch * seq, E) and logits_TE.dtype == torch.float32
    assert bool(torch.isfinite(logits_TE).all()) and float(logits_TE.detach().abs().max()) > 0
    logits_TE.sum().backward()
    assert all(p.grad is not None for p in router.parameters())


def test_unknown_router_kind() -> None:
    spec = RouterSpec(
        hidden_size=D, num_experts=E, router_hidden_size=8, num_heads=2, init_std=0.02, conditioning_dim=None
    )
    with pytest.raises(
        ValueError, match=r"unknown router kind 'foo'; registered kinds: \['cross_attention', 'linear', 'mlp'"
    ):
        build_router("foo", spec)


def test_balance_loss() -> None:
    tokens_, top_k = 8, 2
    uniform_TE = torch.full((tokens_, E), 1 / E)
    even_E = torch.full((E,), tokens_ * top_k // E)
    assert float(losses.balance_loss(uniform_TE, even_E, top_k)) == pytest.approx(1.0, abs=1e-7)
    # Skewed: every token's top-1 is expert 0, with probability 0.7: E * 1 * 0.7.
    skewed_TE = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(tokens_, E)
    all_on_0 = torch.tensor([tokens_, 0, 0, 0])
    assert float(losses.balance_loss(skewed_TE, all_on_0, top_k=1)) == pytest.approx(2.8, abs=1e-6)
    # Uneven counts with uniform probabilities still give 1: the loss needs both to be skewed.
    assert float(losses.balance_loss(uniform_TE, all_on_0 * 2, top_k)) == pytest.approx(1.0, abs=1e-7)


def test_z_loss_on_known_logits() -> None:
    logits_TE = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # logsumexp: log 4, log 2
    expected = (math.log(4) ** 2 + math.log(2) ** 2) / 2
    assert float(losses.z_loss(logits_TE)) == pytest.approx(expected, rel=1e-6)
    assert float(losses.z_loss(torch.zeros(3, 8))) == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_entropy_bonus() -> None:
    uniform_TE = torch.full((5, E), 1 / E)
    assert float(losses.entropy_bonus(losses.entropy(uniform_TE), E)) == pytest.approx(-1.0, abs=1e-6)
    one_hot_TE = torch.eye(E)
    assert float(losses.entropy_bonus(losses.entropy(one_hot_TE), E)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.entropy_bonus(losses.entropy(torch.ones(3, 1)), 1)) == 0.0


def test_layer_aux_loss_is_the_weighted_sum() -> None:
    model = moeify.moeify(
        tiny_llama(), num_experts=4, balance_loss_weight=0.5, z_loss_weight=0.25, entropy_loss_weight=0.125
    )
    layer = model.model.layers[0].mlp
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    layer(x)
    logits_TE, probs_TE, _, idx_TK, _ = layer.route(x.reshape(-1, 32), x.shape[:-1])
    counts_E = torch.bincount(idx_TK.flatten(), minlength=4)
    expected = (
        0.5 * losses.balance_loss(probs_TE, counts_E, 2)
        + 0.25 * losses.z_loss(logits_TE)
        + 0.125 * losses.entropy_bonus(losses.entropy(probs_TE), 4)
    )
    torch.testing.assert_close(layer.aux_loss(), expected, rtol=1e-6, atol=1e-7)
    assert layer.aux_loss().requires_grad


# ---------------------------------------------------------------------------------------------
# Shared experts: identity at conversion, gradients under each training init


def _shared_out(layer: MoeLayer, x: Tensor) -> Tensor:
    with torch.no_grad():
        return layer.shared_experts.forward_all(x.reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("init", ["noise", "zero_out"])
def test_shared_expert_init(init: str) -> None:
    dense = tiny_llama()
    ids = tokens()
    ref = logits(dense, ids)
    model = moeify.moeify(tiny_llama(), num_experts=4, shared_expert_init=init)
    out = logits(model, ids)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    layers = [layer for _, layer in moe_layers(model)]
    if init == "zero_out":
        for layer in layers:
            assert float(layer.shared_experts.w_out.detach().abs().max()) == 0.0
            assert torch.equal(layer.shared_experts.w_in[0], layer.experts.w_in[0])  # cloned from the FFN
            assert torch.equal(_shared_out(layer, x), torch.zeros(16, 32))
        # Exactly the routed model: removing the shared experts changes no bit.
        for layer in layers:
            layer.shared_experts = None
        assert torch.equal(logits(model, ids), out)
    else:
        for layer in layers:
            for p in (layer.shared_experts.w_in, layer.shared_experts.w_out):
                assert 0.5e-4 < float(p.detach().std()) < 2e-4  # N(0, 1e-4)
            assert 0 < float(_shared_out(layer, x).abs().max()) < 1e-5


@pytest.mark.parametrize("init", ["noise", "zero_out"])
def test_gradients_reach_the_shared_experts(init: str) -> None:
    """ "noise": both projections get a gradient at once (tiny: each is proportional to the other's
    1e-4 weights). "zero_out": the zero output projection gets a full-size gradient at once; the
    input projection's gradient flows through it, so it is exactly zero until the first step."""
    model = moeify.moeify(tiny_llama(), num_experts=4, shared_expert_init=init).train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in moe_layers(model):
        w_in, w_out = layer.shared_experts.w_in.grad, layer.shared_experts.w_out.grad
        assert float(w_out.abs().max()) > 0
        if init == "noise":
            assert float(w_in.abs().max()) > 0
        else:
            assert float(w_out.abs().max()) > 1e-4
            assert float(w_in.abs().max()) == 0.0
    if init == "zero_out":
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for _, layer in moe_layers(model):
            assert float(layer.shared_experts.w_in.grad.abs().max()) > 0
