"""peft on converted models: the three recipes of `moeify.lora_config` (exact trainable sets and
counts, identity at init, one training step), per-expert LoRA on packed 3-D expert weights against a
hand-computed LoRA, the generic path, adapter save/load over `moeify.from_pretrained`, and the
refused orders (moeify on a peft model, moeify.save_pretrained of a peft model)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from core_helpers import INNER, Stack, assert_untouched, snapshot, stack_input, tiny_llama, tokens
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from tiny_transformers import BY_NAME
from torch import Tensor, nn

import moeify
from moeify import ConversionError
from moeify.integrations.peft import (
    GROUPS,
    RECIPES,
    adapted_expert_weights,
    format_summary,
    lora_config,
    moe_targets,
    trainable_summary,
)
from moeify.monitors import ExpertHomogenization, attach_monitors

ROOT = Path(__file__).resolve().parents[1]
E, R = 4, 2  # routed experts, LoRA rank
ZERO_OUT = {"shared_expert_init": "zero_out", "seed": 0}  # LoRA on noise-initialised shared experts barely trains
RECIPE = {"num_experts": E, "top_k": 2, **ZERO_OUT}


def converted(**extra) -> nn.Module:
    return moeify.moeify(tiny_llama(), **RECIPE | extra)


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def param_wrappers(experts: nn.Module) -> dict[str, ParamWrapper]:
    return {m.parameter_name: m for m in experts.modules() if isinstance(m, ParamWrapper)}


# Tiny Llama, 2 layers, D=32, I=64, E=4 routed + 1 shared, r=2. LoRA on a packed weight [E, out, in]:
# A [E*r, in] + B [out, E*r]; w_in [4, 128, 32] -> 256 + 1024, w_out [4, 32, 64] -> 512 + 256.
COUNTS = {
    "routers+shared": {
        "routers": (256, 512),  # 2 x gate [4, 32], plus its trained copy (modules_to_save)
        "routed_experts": (0, 49_152),
        "shared_experts": (12_288, 24_576),
        "other": (0, 12_704),
    },
    "routers+lora": {
        "routers": (256, 512),
        "routed_experts": (4_096, 53_248),  # 2 layers x (1280 + 768)
        "shared_experts": (1_024, 13_312),  # 2 layers x (320 + 192)
        "other": (0, 12_704),
    },
    "full": {
        "routers": (256, 512),
        "routed_experts": (4_096, 53_248),
        "shared_experts": (1_024, 13_312),
        "other": (896, 13_600),  # LoRA on q, k, v, o of both layers (lm_head excluded)
    },
}
LAYER = r"base_model\.model\.model\.layers\.[01]\.mlp"
ROUTER = rf"{LAYER}\.router\.modules_to_save\.default\.gate\.weight"
PACKED_LORA = r"(base_layer\.)?lora_[AB]\.default\.weight"
TRAINABLE = {  # every trainable name matches one pattern, and the counts say how many of each
    "routers+shared": {ROUTER: 2, rf"{LAYER}\.shared_experts\.modules_to_save\.default\.w_(in|out)": 4},
    "routers+lora": {ROUTER: 2, rf"{LAYER}\.experts\.{PACKED_LORA}": 8, rf"{LAYER}\.shared_experts\.{PACKED_LORA}": 8},
    "full": {
        ROUTER: 2,
        rf"{LAYER}\.experts\.{PACKED_LORA}": 8,
        rf"{LAYER}\.shared_experts\.{PACKED_LORA}": 8,
        r"base_model\.model\.model\.layers\.[01]\.self_attn\.[qkvo]_proj\.lora_[AB]\.default\.weight": 16,
    },
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_exactly_its_parts_and_starts_as_the_converted_model(recipe: str) -> None:
    model = converted()
    ids = tokens()
    before = logits(model, ids)
    peft_model = get_peft_model(model, moeify.lora_config(model, recipe, r=R, lora_alpha=4))
    summary = trainable_summary(peft_model)
    assert {g: (summary[g]["trainable"], summary[g]["total"]) for g in GROUPS} == COUNTS[recipe]
    assert (summary["all"]["trainable"], summary["all"]["total"]) == peft_model.get_nb_trainable_parameters()
    names = trainable(peft_model)
    for pattern, count in TRAINABLE[recipe].items():
        assert len([n for n in names if re.fullmatch(pattern, n)]) == count, pattern
    assert all(any(re.fullmatch(p, n) for p in TRAINABLE[recipe]) for n in names)
    assert torch.equal(logits(peft_model, ids), before)  # LoRA B = 0, trained copies equal the originals
    line = format_summary(summary)
    assert line.startswith(f"trainable params: {summary['all']['trainable']:,} || all params:")
    assert f"routers {256:,}/{512:,}" in line


def hand_lora(weight: Tensor, wrapper: ParamWrapper) -> Tensor:
    """W_e + (alpha / r) B_e A_e for every expert e, written out: A_e = rows e*r..e*r+r-1 of
    lora_A, B_e = columns e, e+E, ... of lora_B (peft's [out, r, E] flattening of the rank dim)."""
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    experts, rank = weight.shape[0], a.shape[0] // weight.shape[0]
    deltas = [b[:, e::experts] @ a[e * rank : (e + 1) * rank] for e in range(experts)]
    return weight + wrapper.scaling["default"] * torch.stack(deltas)


def hand_expert(x_D: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    gate, up = (w_in @ x_D).chunk(2)
    return w_out @ (F.silu(gate) * up)


@torch.no_grad()
def test_packed_experts_each_get_their_own_lora_update_hand_computed() -> None:
    torch.manual_seed(0)
    model = converted()
    model = get_peft_model(model, moeify.lora_config(model, "routers+lora", r=R, lora_alpha=4))
    layer = model.base_model.model.model.layers[0].mlp
    routed, shared = param_wrappers(layer.experts), param_wrappers(layer.shared_experts)
    for wrapper in [*routed.values(), *shared.values()]:
        nn.init.normal_(wrapper.lora_B["default"].weight, std=0.5)
    base = layer.experts.get_base_layer()
    w_in, w_out = hand_lora(base.w_in, routed["w_in"]), hand_lora(base.w_out, routed["w_out"])
    shared_base = layer.shared_experts.get_base_layer()
    s_in, s_out = hand_lora(shared_base.w_in, shared["w_in"]), hand_lora(shared_base.w_out, shared["w_out"])
    x_TD = torch.randn(16, 32)
    _, _, _, idx_TK, weights_TK = layer.route(x_TD, x_TD.shape[:-1])
    expected = torch.stack(
        [
            sum(w * hand_expert(x, w_in[e], w_out[e]) for e, w in zip(idx.tolist(), weights))
            + hand_expert(x, s_in[0], s_out[0])
            for x, idx, weights in zip(x_TD, idx_TK, weights_TK)
        ]
    )
    assert (layer(x_TD) - expected).abs().max() < 1e-5
    assert w_in.shape == base.w_in.shape == (E, 2 * 64, 32) and w_out.shape == base.w_out.shape == (E, 32, 64)
    read = adapted_expert_weights(layer.experts)  # what the homogenization monitor reads: W + ΔW
    assert torch.allclose(read[0], w_in.reshape(E, -1), atol=1e-6) and torch.allclose(read[1], w_out.reshape(E, -1))

    # Only expert 2's adapter non-zero: only the tokens routed to expert 2 change.
    for wrapper in [*routed.values(), *shared.values()]:
        wrapper.lora_B["default"].weight.zero_()
    plain = layer(x_TD)
    routed["w_out"].lora_B["default"].weight[:, 2::E] = 0.5
    moved_T = (layer(x_TD) - plain).abs().amax(dim=-1) > 0
    assert torch.equal(moved_T, (idx_TK == 2).any(dim=-1))
    assert 0 < int(moved_T.sum()) < len(moved_T)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_one_step_moves_routers_and_adapters_not_the_base(recipe: str) -> None:
    torch.manual_seed(0)
    model = converted()
    model = get_peft_model(model, moeify.lora_config(model, recipe, r=R, lora_alpha=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    layers = [layer for _, layer in moeify.moe_layers(model)]
    for layer in layers:
        layer.reset_stats()
    model.train()
    ids = tokens(batch=4, seq=8)
    loss = model(input_ids=ids, labels=ids).loss  # router losses added through the wrapper
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    moved = {n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])}
    assert {n for n in moved if ".router." in n} == {n for n in start if ".router." in n}
    if recipe == "routers+shared":
        # zero_out: w_out = 0 at init, so step one moves w_out only (w_in's gradient passes through w_out).
        w_out = {n for n in start if n.endswith("shared_experts.modules_to_save.default.w_out")}
        assert {n for n in moved if ".shared_experts." in n} == w_out
        return
    for layer in layers:
        got_tokens = layer.tokens_per_expert > 0
        assert bool(got_tokens.all())  # 32 tokens, top-2 of 4: every expert has some here
        for wrapper in param_wrappers(layer.experts).values():
            b = wrapper.lora_B["default"].weight  # zero at init: after one step, -lr * its gradient
            per_expert = [b[:, e::E] for e in range(E)]
            assert all(bool(d.abs().sum() > 0) for d in per_expert)
            assert all(not torch.allclose(per_expert[i], per_expert[j]) for i in range(E) for j in range(i + 1, E))


def test_an_expert_without_tokens_gets_no_adapter_gradient() -> None:
    model = converted()
    model = get_peft_model(model, moeify.lora_config(model, "routers+lora", r=R))
    layers = [layer for _, layer in moeify.moe_layers(model)]
    for layer in layers:
        layer.reset_stats()
    ids = tokens(batch=1, seq=1)  # one token, top-2: exactly two experts per layer get it
    (model(input_ids=ids).logits.pow(2).mean() + moeify.aux_loss(model)).backward()
    for layer in layers:
        got_tokens = (layer.tokens_per_expert > 0).tolist()
        assert sum(got_tokens) == 2
        for wrapper in param_wrappers(layer.experts).values():
            grad = wrapper.lora_B["default"].weight.grad
            assert [bool(grad[:, e::E].abs().sum() > 0) for e in range(E)] == got_tokens


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_adapter_round_trip_over_moeify_from_pretrained(tmp_path, recipe: str) -> None:
    model = converted()
    moeify.save_pretrained(model, tmp_path / "base")  # before get_peft_model: the frozen base
    peft_model = get_peft_model(model, moeify.lora_config(model, recipe, r=R, lora_alpha=4))
    peft_model.train()
    ids = tokens(batch=4)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2).step()
    peft_model.eval()
    trained = logits(peft_model, ids)
    assert not torch.equal(trained, logits(moeify.from_pretrained(tmp_path / "base"), ids))
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(moeify.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), trained)
    with pytest.raises(ValueError, match=r"holds peft adapters .*merge_and_unload\(\)"):
        moeify.save_pretrained(peft_model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    if recipe == "routers+lora":  # the other way to keep the result: merge, save as a moeify checkpoint
        moeify.save_pretrained(peft_model.merge_and_unload(), tmp_path / "merged")
        assert (logits(moeify.from_pretrained(tmp_path / "merged"), ids) - trained).abs().max() < 1e-6


class Mixer(nn.Module):
    """An FFN packed experts cannot hold (a learnable gain between its projections): converted by
    the generic path (ModuleExperts)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, INNER), nn.Linear(INNER, d)
        self.gain = nn.Parameter(torch.ones(INNER))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)) * self.gain)


def test_generic_experts_get_one_lora_per_copy_and_other_peft_methods_work() -> None:
    torch.manual_seed(0)
    model = moeify.moeify(Stack(Mixer(), Mixer()), num_experts=E, top_k=2, target_modules=["mlp"], **ZERO_OUT)
    x = stack_input()
    with torch.no_grad():
        before = model(x)
    peft_model = get_peft_model(model, lora_config(model, "routers+lora", r=R, lora_dropout=0.1))
    lora = {n for n in trainable(peft_model) if "lora_" in n}
    assert len(lora) == 2 * (E + 1) * 2 * 2  # layers x (routed + shared copies) x (inp, out) x (A, B)
    assert "base_model.model.layers.0.mlp.experts.experts.3.inp.lora_A.default.weight" in lora
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(x), before)
    clones = adapted_expert_weights(peft_model.get_submodule("base_model.model.layers.0.mlp.experts"))
    assert all(torch.equal(group[0], t) for group in clones for t in group)  # different lora_A, B = 0
    peft_model.train()
    (peft_model(x).pow(2).mean() + moeify.aux_loss(peft_model)).backward()
    experts = peft_model.get_submodule("base_model.model.layers.0.mlp.experts.experts")
    grads = [experts[e].out.lora_B["default"].weight.grad for e in range(E)]
    assert all(not torch.allclose(grads[i], grads[j]) for i in range(E) for j in range(i + 1, E))

    other = moeify.moeify(Stack(Mixer(), Mixer()), num_experts=E, top_k=2, target_modules=["mlp"], **ZERO_OUT)
    targets = moe_targets(other)
    loha_config = peft.LoHaConfig(r=2, target_modules=targets.routed_modules, modules_to_save=targets.routers)
    loha = get_peft_model(other, loha_config)
    assert trainable_summary(loha)["routed_experts"]["trainable"] > 0
    assert loha(x).shape == x.shape


def test_monitors_see_the_adapted_experts() -> None:
    model = converted()
    peft_model = get_peft_model(model, lora_config(model, "routers+lora", r=R))
    runner = attach_monitors(peft_model, ["expert_load", ExpertHomogenization(every_n_steps=1)])
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    spreads = []
    for step in range(3):
        ids = tokens(seed=step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        record = runner.step()  # before the update: the first read sees the clones
        optimizer.step()
        optimizer.zero_grad()
        spreads.append(record["monitors"]["expert_homogenization"]["base_model.model.model.layers.0.mlp"]["spread_max"])
    assert spreads[0] == 0 and 0 < spreads[1] < spreads[2]  # the experts diverge through their adapters only


def test_lora_config_errors() -> None:
    model = converted()
    with pytest.raises(ValueError, match=r"unknown recipe 'lora'; the recipes are 'routers\+shared': routers and"):
        lora_config(model, "lora")
    with pytest.raises(ValueError, match="the recipe sets target_modules, modules_to_save; .*moe_targets"):
        lora_config(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"lora_dropout=0.1 cannot apply to packed experts: .* lora_dropout=0.0"):
        lora_config(model, "full", lora_dropout=0.1)
    lora_config(model, "routers+shared", lora_dropout=0.1)  # no LoRA layer there: nothing to refuse
    gpt2 = moeify.moeify(BY_NAME["gpt2"].build(), **RECIPE)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn \(a transformers Conv1D, 4 in all\)"):
        lora_config(gpt2, "full")
    get_peft_model(gpt2, lora_config(gpt2, "routers+lora"))  # its experts are packed too
    noisy = converted(shared_expert_init="noise")
    with pytest.warns(UserWarning, match="shared_expert_init='noise' barely trains"):
        lora_config(noisy, "routers+lora")
    with pytest.raises(ValueError, match="has no moeify MoE layers: call moeify"):
        lora_config(tiny_llama())
    peft_model = get_peft_model(model, lora_config(model))
    with pytest.raises(ValueError, match="already holds peft modules .* before get_peft_model"):
        lora_config(peft_model)


def test_moeify_refuses_a_peft_model_even_with_no_adapter_on_the_ffns() -> None:
    model = get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model, **RECIPE)
    message = str(error.value)
    assert "PeftModel is a peft model (PeftModel at the root)" in message
    assert "missing from peft's checkpoints" in message and "merge_and_unload()" in message
    assert "get_peft_model(moeify(model), moeify.lora_config(model, recipe=...))" in message
    assert_untouched(model, before)
    merged = model.merge_and_unload()  # the supported order: merge, convert, then new adapters
    ids = tokens()
    dense = logits(merged, ids)
    assert (logits(moeify.moeify(merged, **RECIPE), ids) - dense).abs().max() < 1e-5


def test_cross_attention_router_copy_reads_the_current_conditioning() -> None:
    from tiny_diffusers import pixart, text

    model, kwargs = pixart()
    moeify.moeify(model, num_experts=E, top_k=2, router="cross_attention", **ZERO_OUT)
    with torch.no_grad():
        model(**kwargs)  # the context now holds this text; a deep copy of it would keep it
        new_text = dict(kwargs, encoder_hidden_states=text(seed=7))
        expected = model(**new_text).sample
    twin = copy.deepcopy(model)  # copied whole: its own context, fed by its own hook
    peft_model = get_peft_model(model, lora_config(model, "routers+lora", r=R))
    with torch.no_grad():
        assert torch.equal(peft_model(**new_text).sample, expected)
        twin(**kwargs)
    copies = [m for n, m in peft_model.named_modules() if n.endswith("router.modules_to_save.default")]
    assert len(copies) == 2 and all(c.context.value is new_text["encoder_hidden_states"] for c in copies)
    twin_contexts = {id(m.context) for m in twin.modules() if hasattr(m, "context")}
    assert len(twin_contexts) == 1 and twin_contexts != {id(copies[0].context)}


def test_import_moeify_does_not_import_peft() -> None:
    code = "import sys, moeify; assert 'peft' not in sys.modules and 'lora_config' in moeify.__all__"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
