"""torch.compile: packed experts compile with `fullgraph=True` (the grouped product is one opaque
custom op, `moeify::grouped_linear`, moeify.layers.dispatch) and match eager, forward and every
gradient; a converted model compiles and trains; the generic experts compile with a graph break.

Eager runs the CPU expert loop here (conftest lowers its threshold to 0), so every comparison is
compiled grouped path vs eager expert loop. Inductor compiles C++ kernels (tens of seconds on 2
cores): one inductor test, the rest use `aot_eager` (dynamo + AOTAutograd, no code generation).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from core_helpers import HIDDEN, VOCAB, tiny_llama, tokens
from torch import Tensor, nn

import moeify
from moeify import moe_layers
from moeify.layers import dispatch, expert_loop
from moeify.layers.experts import ModuleExperts, PackedExperts

E, K, T = 4, 2, 12
TOL = 1e-5  # of the output's (or gradient's) scale, fp32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def assert_close_to_scale(actual: Tensor, expected: Tensor, name: str = "") -> None:
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max().clamp_min(1e-12))
    error = float((actual - expected).abs().max())
    assert error <= TOL * scale, f"{name}: max error {error:.2e} > {TOL:g} x scale {scale:.2e}"


def packed_experts(gated: bool, bias: bool, d: int = 16, inner: int = 32, seed: int = 0) -> PackedExperts:
    torch.manual_seed(seed)
    experts = PackedExperts(
        E, d, inner, d, gated=gated, act=nn.SiLU() if gated else nn.GELU("tanh"), bias_in=bias, bias_out=bias
    )
    for p in experts.parameters():
        nn.init.normal_(p, std=0.2)
    return experts


def routes(seed: int = 0, tokens_: int = T) -> tuple[Tensor, Tensor]:
    """Distinct experts per token, never expert 2 (an idle expert: its gradient must be zeros)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor([0, 1, 3])
    idx_TK = torch.stack([used[torch.randperm(3, generator=g)[:K]] for _ in range(tokens_)])
    return idx_TK, torch.softmax(torch.randn(tokens_, K, generator=g), dim=-1)


def forward_backward(experts: nn.Module, x_TD: Tensor, idx_TK: Tensor, weights_TK: Tensor, seed: int = 1) -> dict:
    """Output, counts and every gradient, from a random incoming gradient (not `.sum()`: CPU
    grouped_mm's backward rejects a stride-0 gradient)."""
    x_TD = x_TD.detach().clone().requires_grad_()
    w_TK = weights_TK.detach().clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    y_TD, counts_E = experts(x_TD, idx_TK, w_TK)
    y_TD.backward(torch.randn(y_TD.shape, generator=torch.Generator().manual_seed(seed)))
    module = getattr(experts, "_orig_mod", experts)  # the compiled wrapper prefixes parameter names
    grads = {f"{name}.grad": p.grad for name, p in module.named_parameters()}
    return {"y": y_TD.detach(), "counts": counts_E, "x.grad": x_TD.grad, "weights.grad": w_TK.grad} | grads


def assert_same(compiled: dict, eager: dict) -> None:
    assert compiled.keys() == eager.keys()
    assert torch.equal(compiled.pop("counts"), eager.pop("counts"))
    for name, value in eager.items():
        assert_close_to_scale(compiled[name], value, name)


@pytest.mark.parametrize(
    ("gated", "bias", "d"),
    [(True, False, 16), (True, True, 16), (False, False, 16), (False, True, 16), (True, True, 15)],
    ids=["gated", "gated-bias", "mlp", "mlp-bias", "gated-bias-unaligned"],
)
def test_packed_experts_compile_fullgraph(gated: bool, bias: bool, d: int) -> None:
    """d=15: fp32 rows not 16-byte aligned, so the op runs its per-expert loop instead of CPU grouped_mm."""
    experts = packed_experts(gated, bias, d=d)
    idx_TK, weights_TK = routes()
    x_TD = torch.randn(T, d, generator=torch.Generator().manual_seed(2))
    eager = forward_backward(experts, x_TD, idx_TK, weights_TK)
    compiled = forward_backward(torch.compile(experts, fullgraph=True, backend="aot_eager"), x_TD, idx_TK, weights_TK)
    assert float(compiled["w_in.grad"][2].abs().max()) == 0.0  # the idle expert's gradient: exact zeros
    assert_same(compiled, eager)
    with torch.no_grad():  # inference: eager takes the combined loop, compiled the same op
        compiled_y, _ = torch.compile(experts, fullgraph=True, backend="aot_eager")(x_TD, idx_TK, weights_TK)
        assert_close_to_scale(compiled_y, experts(x_TD, idx_TK, weights_TK)[0], "no_grad y")


def test_packed_experts_compile_with_dynamic_token_counts() -> None:
    """One graph for every batch size: the op's fake gives [A, O] for a symbolic A."""
    experts = packed_experts(gated=True, bias=True)
    compiled = torch.compile(experts, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens_ in (5, 12, 31):
        idx_TK, weights_TK = routes(seed=tokens_, tokens_=tokens_)
        x_TD = torch.randn(tokens_, 16)
        with torch.no_grad():
            assert_close_to_scale(compiled(x_TD, idx_TK, weights_TK)[0], experts(x_TD, idx_TK, weights_TK)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_custom_ops_pass_opcheck() -> None:
    """The fake (shape) and autograd registrations agree with the real kernels."""
    x_AI = torch.randn(10, 16, requires_grad=True)
    weight_EOI = torch.randn(E, 8, 16, requires_grad=True)
    counts_E = torch.tensor([3, 0, 5, 2])
    torch.library.opcheck(torch.ops.moeify.grouped_linear, (x_AI, weight_EOI, counts_E))
    torch.library.opcheck(torch.ops.moeify.grouped_linear_weight_grad, (torch.randn(10, 8), x_AI.detach(), counts_E))


def test_only_the_needed_gradients_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen expert weights (a LoRA-style fine-tune): no weight-gradient op runs."""
    experts = packed_experts(gated=True, bias=False).requires_grad_(False)
    idx_TK, weights_TK = routes()
    x_TD = torch.randn(T, 16, requires_grad=True)
    ran = []
    real = torch.ops.moeify.grouped_linear_weight_grad.default
    monkeypatch.setattr(dispatch, "_weight_grad_op", lambda *args: ran.append(1) or real(*args))
    y_TD, _ = torch.compile(experts, fullgraph=True, backend="aot_eager")(x_TD, idx_TK, weights_TK)
    y_TD.backward(torch.randn_like(y_TD))
    assert x_TD.grad is not None and ran == []


def test_compile_takes_the_grouped_op_where_eager_takes_the_expert_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose [A, H] intermediate reaches MIN_INTERMEDIATE_BYTES runs the CPU expert loop in
    eager; compiled, the loop (host reads) is skipped for the custom op, with the same results."""
    experts = packed_experts(gated=True, bias=True)
    tokens_ = 64
    idx_TK, weights_TK = routes(tokens_=tokens_)
    x_TD = torch.randn(tokens_, 16, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(expert_loop, "MIN_INTERMEDIATE_BYTES", tokens_ * K * experts.w_in.shape[1] * 4)
    loops, products = [], []
    real_apply, real_combined, real_product = expert_loop.ExpertLoop.apply, expert_loop.run_combined, dispatch._product
    monkeypatch.setattr(expert_loop.ExpertLoop, "apply", lambda *a: loops.append("train") or real_apply(*a))
    monkeypatch.setattr(expert_loop, "run_combined", lambda *a: loops.append("infer") or real_combined(*a))
    monkeypatch.setattr(dispatch, "_product", lambda *a: products.append(1) or real_product(*a))
    eager = forward_backward(experts, x_TD, idx_TK, weights_TK)
    with torch.no_grad():
        eager_y, _ = experts(x_TD, idx_TK, weights_TK)
    assert loops == ["train", "infer"] and products == []
    compiled_experts = torch.compile(experts, fullgraph=True, backend="aot_eager")
    compiled = forward_backward(compiled_experts, x_TD, idx_TK, weights_TK)
    with torch.no_grad():
        compiled_y, _ = compiled_experts(x_TD, idx_TK, weights_TK)
    assert loops == ["train", "infer"]
    # Inside the op: 2 projections forward and their 2 grad_x in backward; without autograd 3, the
    # gate and up products split on a CPU (PackedExperts._splits_gate_up).
    assert len(products) == 7
    assert_same(compiled, eager)
    assert_close_to_scale(compiled_y, eager_y, "no_grad y")


@pytest.mark.parametrize(
    "recipe",
    [{}, {"router_score": "sigmoid", "balance_bias_rate": 1e-2}, {"top_k": 1}],
    ids=["softmax", "sigmoid-bias", "top1"],
)
def test_moe_layer_compiles_fullgraph_with_inductor(recipe: dict) -> None:
    """The whole MoE layer (router, experts, losses, counts) in one inductor graph, forward and
    backward; its routing counts and router losses are updated as in eager. Also with sigmoid
    scores and a nonzero expert bias, and at top-1 (weight s / stop_gradient(s))."""
    model = moeify.moeify(tiny_llama(num_hidden_layers=1), **{"num_experts": E, "top_k": K} | recipe)
    _, layer = moe_layers(model)[0]
    with torch.no_grad():  # experts that differ (as after training): the router's gradient is then not ~0
        for p in layer.experts.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if layer.expert_bias is not None:
            layer.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(4))
    grad = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(5))

    def step(module: nn.Module) -> dict:
        layer.zero_grad()
        layer.reset_stats()
        x_ = x.clone().requires_grad_()
        y = module(x_)
        y.backward(grad)
        out = {"y": y.detach(), "x.grad": x_.grad, "counts": layer.tokens_per_expert.clone()}
        return out | {f"{n}.grad": p.grad for n, p in layer.named_parameters() if p.grad is not None}

    eager = step(layer)
    eager_loss = layer.aux_loss()
    compiled = step(torch.compile(layer, fullgraph=True))
    assert int(compiled["counts"].sum()) == 2 * 8 * layer.top_k
    assert_same(compiled, eager)
    assert_close_to_scale(layer.aux_loss(), eager_loss, "aux_loss")


def test_compiled_layer_trains_without_taking_the_losses() -> None:
    """As in eager: forward+backward steps that never call aux_loss (frozen routers, a loss without
    router terms) must each run (compiled, untaken losses with a graph are replaced, not added to)."""
    model = moeify.moeify(tiny_llama(num_hidden_layers=1), num_experts=E, top_k=K)
    _, layer = moe_layers(model)[0]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, HIDDEN, requires_grad=True)
    for _ in range(2):
        y = compiled(x)
        y.backward(torch.randn_like(y))


def cross_entropy(logits: Tensor, ids: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(model: nn.Module, run: nn.Module, ids: Tensor, steps: int = 3) -> list[float]:
    """AdamW steps on the task loss + moeify.aux_loss(model); the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(run(input_ids=ids).logits, ids)
        aux = moeify.aux_loss(model)
        assert aux.requires_grad
        (loss + aux).backward()
        optimizer.step()
        losses.append(float((loss + aux).detach()))
    return losses


# Inductor on the whole model compiles ~70-200 s on the 2-core CI machine (C++ kernels for every
# attention/norm op): opt in with MOEIFY_TEST_INDUCTOR=1. The MoE layer's inductor test runs always.
INDUCTOR_MODEL = pytest.mark.skipif(not os.environ.get("MOEIFY_TEST_INDUCTOR"), reason="slow: MOEIFY_TEST_INDUCTOR=1")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR_MODEL)])
def test_converted_model_compiles_matches_eager_and_trains(backend: str) -> None:
    model = moeify.moeify(tiny_llama(num_hidden_layers=1), num_experts=E, top_k=K)
    twin = copy.deepcopy(model)
    ids = tokens()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        assert_close_to_scale(compiled(input_ids=ids).logits, model(input_ids=ids).logits, "logits")
    model.train(), twin.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    compiled_losses, eager_losses = train(model, compiled, ids), train(twin, twin, ids)
    assert compiled_losses[-1] < compiled_losses[0]
    # AdamW's first steps are ~lr * sign(grad): tiny gradient differences can flip an update of a
    # near-zero gradient, so the losses agree to 1e-4, not 1e-5.
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(".router." in n for n in changed) and any(".experts.w_in" in n for n in changed)


class Ffn(nn.Module):
    """An FFN with no known layout: ModuleExperts, the generic path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_module_experts_compile_with_a_graph_break_and_no_recompiles() -> None:
    """Generic experts run eagerly inside a compiled model (torch.compiler.disable): one graph
    break, no recompile when the routing (and so every expert's token count) changes."""
    torch.manual_seed(0)
    experts = ModuleExperts(Ffn(), E)
    compiled = torch.compile(experts, backend="aot_eager")
    x_TD = torch.randn(T, 16)
    for seed in range(3):
        idx_TK, weights_TK = routes(seed)
        y_TD, counts_E = compiled(x_TD, idx_TK, weights_TK)
        eager_TD, eager_counts_E = experts(x_TD, idx_TK, weights_TK)
        assert_close_to_scale(y_TD, eager_TD, f"routing {seed}")
        assert torch.equal(counts_E, eager_counts_E)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_whole_model_with_its_output_loss_is_one_graph() -> None:
    """The root hooks (padding mask, router losses into output.loss) trace too: a converted causal
    LM trained through out.loss compiles with fullgraph=True, and its losses match eager."""
    torch._dynamo.reset()
    model = moeify.moeify(tiny_llama(), num_experts=E, top_k=K).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = tokens()
    mask = torch.ones_like(ids).index_fill_(1, torch.tensor([6, 7]), 0)
    for _ in range(2):
        out = compiled(input_ids=ids, attention_mask=mask, labels=ids)
        expected = twin(input_ids=ids, attention_mask=mask, labels=ids)
        assert_close_to_scale(out.loss, expected.loss, "loss")
        assert_close_to_scale(out.aux_loss, expected.aux_loss, "aux_loss")
        out.loss.backward()
        expected.loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close_to_scale(p.grad, q.grad, name)
