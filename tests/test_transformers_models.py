"""Every transformers architecture of the registry, converted for real: sites found, outputs and
greedy generations preserved, experts bit-identical to the dense FFN, routers and shared experts
trained by one optimizer step; plus checkpointing, bf16 and train/eval on a few of them.

Tiny models from configs (tests/tiny_transformers.py), fp32, seeded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_transformers import BATCH, BY_NAME, CAUSAL_LMS, MODELS, SEQ, TinyModel
from torch import Tensor, nn

from moeify import MoeLayer, aux_loss, find_ffns, moe_layers, moeify

FEW = [BY_NAME[name] for name in ("llama", "bert", "gpt2")]
TOKENS = BATCH * SEQ


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spinning threads make this file 5x slower (62 s vs 9 s measured). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_diff(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| relative to max |ref|."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


@torch.no_grad()
def main_output(tiny: TinyModel, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return tiny.output(model(**inputs))


def task_loss(tiny: TinyModel, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The LM loss for causal LMs; elsewhere the MSE of the main output to a fixed random target
    (not its plain norm: LayerNorm'd outputs have a near-constant norm, hence no gradient)."""
    if tiny.causal_lm:
        return model(**inputs, labels=inputs["input_ids"]).loss
    out = tiny.output(model(**inputs)).float()
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    return (out - target).pow(2).mean()


def training_loss(tiny: TinyModel, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(task + router losses, router losses): a causal LM's output.loss has them added in training
    mode (aux_loss_in_output); for the others the loop adds moeify.aux_loss(model)."""
    if tiny.causal_lm:
        out = model(**inputs, labels=inputs["input_ids"])
        return out.loss, out.aux_loss
    loss = task_loss(tiny, model, inputs)
    aux = aux_loss(model)
    return loss + aux, aux


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every router and shared-expert parameter: what the task loss and aux_loss must move."""
    params = {}
    for name, layer in moe_layers(model):
        params |= {f"{name}.router.{n}": p for n, p in layer.router.named_parameters()}
        params |= {f"{name}.shared_experts.{n}": p for n, p in layer.shared_experts.named_parameters()}
    return params


# --------------------------------------------------------------------------------------------- sites


@pytest.mark.parametrize("tiny", MODELS, ids=str)
def test_find_ffns_finds_every_ffn_and_moeify_replaces_it(tiny: TinyModel) -> None:
    model = tiny.build()
    report = find_ffns(model)
    assert len(report.sites) == tiny.num_sites, str(report)
    assert report.skipped == []
    assert {site.source for site in report.sites} == {"registry"}

    moeify(model)

    assert len(moe_layers(model)) == tiny.num_sites
    for site in report.sites:
        install_path = f"{site.name}.{tiny.install_at}" if tiny.install_at else site.name
        assert site.install_path == install_path
        assert isinstance(model.get_submodule(install_path), MoeLayer)
        for path in tiny.identities:
            assert isinstance(model.get_submodule(f"{site.name}.{path}"), nn.Identity)


# ------------------------------------------------------------------------------------- equivalence


def output_tolerance(init: str, *, gated: bool) -> float:
    """1e-5 of the output scale, except for the "noise" init of plain (non-gated) FFNs.

    The noise shared expert adds about act'(0) * w_out @ w_in @ x: O(std^2 * sqrt(D * I)) = 5e-7 of
    the normalised FFN input per layer (std 1e-4, D=32, I=64); a gated one multiplies a third noisy
    factor in, O(std^3). The tiny random decoders carry a residual stream of ~0.05 that their final
    norm scales up, so their logits move by 0.8e-5 to 1.9e-5 (measured: gpt2, phi, opt, gpt_neox,
    falcon). zero_out is exact whatever the layout.
    """
    return 5e-5 if init == "noise" and not gated else 1e-5


@pytest.mark.parametrize("init", ["noise", "zero_out"])
@pytest.mark.parametrize("tiny", MODELS, ids=str)
def test_conversion_preserves_outputs(tiny: TinyModel, init: str) -> None:
    model = tiny.build()
    inputs = tiny.inputs(model)
    dense = main_output(tiny, model, inputs)

    # The zero_out run also goes through the whole-model check on example_inputs.
    moeify(model, shared_expert_init=init, example_inputs=inputs if init == "zero_out" else None)
    converted = main_output(tiny, model, inputs)

    layers = [layer for _, layer in moe_layers(model)]
    assert converted.shape == dense.shape
    assert relative_diff(converted, dense) <= output_tolerance(init, gated=layers[0].experts.gated)
    shared_w_out = [layer.shared_experts.w_out.detach() for layer in layers]
    if init == "noise":
        # Not vacuous: the shared experts carry their noise, std 1e-4.
        assert all(1e-5 < float(w.std()) < 1e-3 for w in shared_w_out)
    else:
        assert all(torch.count_nonzero(w) == 0 for w in shared_w_out)


@pytest.mark.parametrize("tiny", MODELS, ids=str)
def test_every_expert_equals_the_dense_ffn_bit_for_bit(tiny: TinyModel) -> None:
    model = tiny.build()
    sites = find_ffns(model).sites
    dense = {site.name: tiny.read_ffn(model.get_submodule(site.name)) for site in sites}

    num_experts = 4
    moeify(model, num_experts=num_experts)

    for site in sites:
        ref, experts = dense[site.name], model.get_submodule(site.install_path).experts
        assert experts.w_in.shape == (num_experts, *ref.w_in.shape)
        assert experts.w_out.shape == (num_experts, *ref.w_out.shape)
        assert (experts.b_in is None) == (ref.b_in is None)
        assert (experts.b_out is None) == (ref.b_out is None)
        for e in range(num_experts):
            assert torch.equal(experts.w_in[e], ref.w_in), f"{site.name} expert {e} w_in"
            assert torch.equal(experts.w_out[e], ref.w_out), f"{site.name} expert {e} w_out"
            if ref.b_in is not None:
                assert torch.equal(experts.b_in[e], ref.b_in), f"{site.name} expert {e} b_in"
            if ref.b_out is not None:
                assert torch.equal(experts.b_out[e], ref.b_out), f"{site.name} expert {e} b_out"


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("tiny", MODELS, ids=str)
def test_one_step_moves_every_router_and_shared_expert(tiny: TinyModel) -> None:
    model = moeify(tiny.build())
    model.train()
    params = trained_parameters(model)
    before = {name: p.detach().clone() for name, p in params.items()}
    # No weight decay: a parameter that moves had a gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    torch.manual_seed(0)
    loss, aux = training_loss(tiny, model, tiny.inputs(model))
    assert aux.grad_fn is not None
    assert torch.isfinite(aux) and float(aux.detach()) > 0
    loss.backward()
    optimizer.step()

    assert len(params) >= 3 * tiny.num_sites  # per layer: the router gate, shared w_in and w_out (+ biases)
    for name, p in params.items():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{name} got no gradient"
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"


# -------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("tiny", CAUSAL_LMS, ids=str)
def test_greedy_generation_matches_the_dense_model(tiny: TinyModel) -> None:
    dense = tiny.build()
    model = moeify(copy.deepcopy(dense), shared_expert_init="zero_out")
    inputs = tiny.inputs(dense)
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}

    expected = dense.generate(**inputs, **settings)
    generated = model.generate(**inputs, **settings)

    assert generated.shape == (BATCH, SEQ + 6)
    assert torch.equal(generated, expected)


# ------------------------------------------------------------------------------- model behaviours


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("tiny", FEW, ids=str)
def test_gradient_checkpointing_gives_the_same_router_gradients(tiny: TinyModel) -> None:
    grads = []
    for checkpointing in (False, True):
        model = moeify(tiny.build())
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs
        loss, aux = training_loss(tiny, model, tiny.inputs(model))
        assert aux.grad_fn is not None
        loss.backward()
        # The recompute inside backward neither counts tokens again nor replaces the losses.
        for _, layer in moe_layers(model):
            assert int(layer.tokens_per_expert.sum()) == TOKENS * layer.top_k
        grads.append({name: p.grad for name, p in trained_parameters(model).items()})

    plain, checkpointed = grads
    for name, grad in plain.items():
        assert checkpointed[name] is not None and torch.count_nonzero(checkpointed[name]) > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_reentrant_checkpointing_is_refused_with_the_fix() -> None:
    """Reentrant checkpointing runs the forward under no_grad, so the router losses of that forward
    carry no graph; aux_loss says so (and how to fix it) instead of silently never training routers."""
    tiny = BY_NAME["llama"]
    model = moeify(tiny.build())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    inputs = tiny.inputs(model)
    with pytest.raises(RuntimeError, match="use_reentrant"):  # the output's loss would include them
        model(**inputs, labels=inputs["input_ids"])
    model._moeify_output_loss.enabled = False  # as with aux_loss_in_output=False: the loop adds them
    model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(RuntimeError, match="use_reentrant"):
        aux_loss(model)
    with torch.no_grad():  # logging the value stays possible
        assert torch.isfinite(aux_loss(model))


@pytest.mark.parametrize("tiny", FEW, ids=str)
def test_bfloat16_keeps_routers_fp32(tiny: TinyModel) -> None:
    dense = tiny.build()
    model = moeify(copy.deepcopy(dense), shared_expert_init="zero_out")
    inputs = tiny.inputs(dense)

    dense.to(torch.bfloat16)
    model.to(torch.bfloat16)

    for name, layer in moe_layers(model):
        assert all(p.dtype == torch.float32 for p in layer.router.parameters()), name
        assert layer.experts.w_in.dtype == layer.experts.w_out.dtype == torch.bfloat16, name
    converted = main_output(tiny, model, inputs)
    assert torch.isfinite(converted).all()
    # fp32 routing picks the same experts; only bf16 rounding of the weighted sum differs.
    assert relative_diff(converted, main_output(tiny, dense, inputs)) < 2e-2


@pytest.mark.parametrize("tiny", FEW, ids=str)
def test_train_and_eval_reach_the_moe_layers(tiny: TinyModel) -> None:
    model = tiny.build().eval()
    moeify(model)
    layers = [layer for _, layer in moe_layers(model)]
    # Installed into an eval model, the MoE layers are in eval too.
    assert not any(m.training for layer in layers for m in layer.modules())

    model.train()
    assert all(m.training for layer in layers for m in layer.modules())
    model.eval()
    assert not any(m.training for layer in layers for m in layer.modules())

    # Of these, only GPT-2's FFN holds a dropout (resid_pdrop, after c_proj): the mode switches it.
    layer = layers[0]
    has_dropout = bool(layer.experts.out_dropout or layer.experts.mid_dropout)
    assert has_dropout == (tiny.name == "gpt2")
    x = torch.randn(TOKENS, layer.router.gate.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert torch.equal(layer(x), layer(x)) != has_dropout
