"""moeify on tiny diffusers models, one per architecture family (built in tests/tiny_diffusers.py).

What is checked, with real numbers: which FFNs are found and which are skipped (and why), that the
converted model reproduces the dense one (every router kind), that experts are the dense weights
bit for bit, that a denoising loop is unchanged, and that the cross-attention router reads the
text conditioning of the forward — also under gradient checkpointing.
"""

from __future__ import annotations

import copy
import math

import diffusers
import pytest
import torch
from tiny_diffusers import BATCH, BUILDERS, latent_key, text
from torch import Tensor, nn

from moeify import ConversionError, MoeLayer, aux_loss, find_ffns, moe_layers, moeify

TIMESTEP = "timestep embedder, not a token FFN"
CAPTION = "caption projection, not a token FFN"
PARALLEL = "parallel attention + MLP block"
CONV = "convolutional FFN"

# Mochi's rotary embedding opens an fp32 CPU autocast region, which torch refuses with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")


def _blocks(prefix: str, indices: range, size: tuple[int, int, bool]) -> dict[str, tuple[int, int, bool]]:
    return {f"{prefix}.{i}.ff": size for i in indices}


GELU_16 = (16, 64, False)  # (in_features, intermediate_size, gated)
# Every site find_ffns must report, in module order, with its sizes; then every skip: name -> (class, reason).
EXPECTED_SITES: dict[str, dict[str, tuple[int, int, bool]]] = {
    "dit": _blocks("transformer_blocks", range(2), GELU_16),
    "pixart": _blocks("transformer_blocks", range(2), GELU_16),
    # The last SD3 block is context_pre_only: its text stream has no FFN.
    "sd3": {
        "transformer_blocks.0.ff": GELU_16,
        "transformer_blocks.0.ff_context": GELU_16,
        "transformer_blocks.1.ff": GELU_16,
    },
    "flux": {"transformer_blocks.0.ff": GELU_16, "transformer_blocks.0.ff_context": GELU_16},
    "cogvideox": _blocks("transformer_blocks", range(2), GELU_16),
    "wan": {"blocks.0.ffn": (24, 32, False), "blocks.1.ffn": (24, 32, False)},
    "ltx": _blocks("transformer_blocks", range(2), GELU_16),
    "hunyuan_video": {
        "context_embedder.token_refiner.refiner_blocks.0.ff": (20, 80, False),
        "transformer_blocks.0.ff": (20, 80, False),
        "transformer_blocks.0.ff_context": (20, 80, False),
    },
    # GEGLU FFNs of the UNet's transformer blocks (attention_head_dim=2 keeps the widths small).
    "unet": {
        "down_blocks.0.attentions.0.transformer_blocks.0.ff": (8, 32, True),
        "up_blocks.1.attentions.0.transformer_blocks.0.ff": (8, 32, True),
        "up_blocks.1.attentions.1.transformer_blocks.0.ff": (8, 32, True),
        "mid_block.attentions.0.transformer_blocks.0.ff": (16, 64, True),
    },
    "sana": {},
    # SwiGLU, no bias; inner dim int(2 * 4 * 16 / 3) = 42.
    "mochi": {
        "transformer_blocks.0.ff": (16, 42, True),
        "transformer_blocks.0.ff_context": (16, 42, True),
        "transformer_blocks.1.ff": (16, 42, True),
    },
}
EXPECTED_SKIPS: dict[str, dict[str, tuple[str, str]]] = {
    "dit": {f"transformer_blocks.{i}.norm1.emb.timestep_embedder": ("TimestepEmbedding", TIMESTEP) for i in range(2)},
    "pixart": {
        "adaln_single.emb.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "caption_projection": ("PixArtAlphaTextProjection", CAPTION),
    },
    "sd3": {
        "time_text_embed.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "time_text_embed.text_embedder": ("PixArtAlphaTextProjection", CAPTION),
    },
    "flux": {
        "time_text_embed.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "time_text_embed.text_embedder": ("PixArtAlphaTextProjection", CAPTION),
        "single_transformer_blocks.0": ("FluxSingleTransformerBlock", PARALLEL),
    },
    "cogvideox": {"time_embedding": ("TimestepEmbedding", TIMESTEP)},
    "wan": {
        "condition_embedder.time_embedder": ("TimestepEmbedding", TIMESTEP),
        "condition_embedder.text_embedder": ("PixArtAlphaTextProjection", CAPTION),
    },
    "ltx": {
        "time_embed.emb.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "caption_projection": ("PixArtAlphaTextProjection", CAPTION),
    },
    "hunyuan_video": {
        "context_embedder.time_text_embed.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "context_embedder.time_text_embed.text_embedder": ("PixArtAlphaTextProjection", CAPTION),
        "time_text_embed.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "time_text_embed.text_embedder": ("PixArtAlphaTextProjection", CAPTION),
        "time_text_embed.guidance_embedder": ("TimestepEmbedding", TIMESTEP),
        "single_transformer_blocks.0": ("HunyuanVideoSingleTransformerBlock", PARALLEL),
    },
    "unet": {"time_embedding": ("TimestepEmbedding", TIMESTEP)},
    "sana": {
        "time_embed.emb.timestep_embedder": ("TimestepEmbedding", TIMESTEP),
        "caption_projection": ("PixArtAlphaTextProjection", CAPTION),
        "transformer_blocks.0.ff": ("GLUMBConv", CONV),
    },
    "mochi": {"time_embed.timestep_embedder": ("TimestepEmbedding", TIMESTEP)},
}
CONVERTIBLE = [name for name in BUILDERS if EXPECTED_SITES[name]]
TEXT_CONDITIONED = [name for name in CONVERTIBLE if name != "dit"]
# MochiTransformer3DModel is not in moeify's conditioning registry: the size of its text is given.
CROSS_ATTENTION_EXTRA: dict[str, dict] = {}
# Epsilon-prediction models take DDIM; flow-matching models the flow-match Euler scheduler.
DDIM_MODELS = ("dit", "pixart", "unet", "cogvideox")
# Flux's pipeline passes timestep / 1000.
TIMESTEP_SCALE = {"flux": 1e-3}


def _router_config(name: str, router: str) -> dict:
    extra = CROSS_ATTENTION_EXTRA.get(name, {}) if router == "cross_attention" else {}
    return dict(router=router, **extra)


def _sample(model: nn.Module, kwargs: dict) -> Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def _record_routers(model: nn.Module) -> dict[str, list]:
    """Each router's (x_TD, batch_shape, logits_TE) of every forward, by layer name."""
    records: dict[str, list] = {}
    for name, layer in moe_layers(model):
        records[name] = []
        layer.router.register_forward_hook(lambda m, args, out, name=name: records[name].append((*args, out)))
    return records


def _relative(out: Tensor, ref: Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m).__name__) for n, m in model.named_modules()]


def _assert_untouched(model: nn.Module, before: tuple[dict[str, Tensor], list[tuple[str, str]]]) -> None:
    state, types = _snapshot(model)
    assert types == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert not model._forward_pre_hooks
    assert not hasattr(model, "moeify_state") and not hasattr(model, "_moeify_conditioning")


# ---------------------------------------------------------------------------------------------
# 1. What is found and what is skipped


@pytest.mark.parametrize("name", list(BUILDERS))
def test_find_ffns_sites_and_skips(name: str) -> None:
    model, _ = BUILDERS[name]()
    report = find_ffns(model)
    found = {s.name: (s.in_features, s.intermediate_size, s.gated) for s in report.sites}
    assert list(found) == list(EXPECTED_SITES[name])
    assert found == EXPECTED_SITES[name]
    assert all(s.class_name == "FeedForward" and s.source == "registry" for s in report.sites)
    assert all(s.install_path == s.name and s.out_features == s.in_features for s in report.sites)
    skipped = {s.name: (s.class_name, s.reason) for s in report.skipped}
    assert {n: c for n, (c, _) in skipped.items()} == {n: c for n, (c, _) in EXPECTED_SKIPS[name].items()}
    for skip_name, (_, reason) in EXPECTED_SKIPS[name].items():
        assert skipped[skip_name][1].startswith(reason), skipped[skip_name]


def test_sana_has_nothing_convertible_and_says_why() -> None:
    model, kwargs = BUILDERS["sana"]()
    before = _snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify(model)
    message = str(error.value)
    assert "found no FFN to convert in SanaTransformer2DModel" in message
    assert "transformer_blocks.0.ff [GLUMBConv]: convolutional FFN" in message
    assert "time_embed.emb.timestep_embedder [TimestepEmbedding]: timestep embedder" in message
    assert "target_modules" in message  # and what to do
    _assert_untouched(model, before)
    assert _sample(model, kwargs).isfinite().all()


# ---------------------------------------------------------------------------------------------
# 2. The converted model reproduces the dense one


CASES = [(name, "linear") for name in CONVERTIBLE] + [
    (name, router) for router in ("mlp", "cross_attention") for name in TEXT_CONDITIONED
]


@pytest.mark.parametrize(("name", "router"), CASES)
def test_conversion_preserves_output(name: str, router: str) -> None:
    model, kwargs = BUILDERS[name]()
    dense = _sample(model, kwargs)
    # Default recipe (noise-initialised shared expert), with the whole-model check on the inputs.
    moeify(model, example_inputs=kwargs, **_router_config(name, router))
    records = _record_routers(model)
    converted = _sample(model, kwargs)
    assert converted.shape == dense.shape
    assert _relative(converted, dense) <= 1e-5
    layers = moe_layers(model)
    assert [n for n, _ in layers] == list(EXPECTED_SITES[name])
    assert {type(layer.router).__name__ for _, layer in layers} == {
        {"linear": "LinearRouter", "mlp": "MlpRouter", "cross_attention": "CrossAttentionRouter"}[router]
    }
    # Only this forward was counted (not the conversion's checks): each token went to top_k experts.
    for layer_name, layer in layers:
        ((x_TD, _, _),) = records[layer_name]
        assert int(layer.tokens_per_expert.sum()) == x_TD.shape[0] * layer.top_k


def test_dit_cross_attention_router_is_refused_and_model_untouched() -> None:
    model, kwargs = BUILDERS["dit"]()
    dense = _sample(model, kwargs)
    before = _snapshot(model)
    with pytest.raises(ConversionError, match=r"DiTTransformer2DModel.*no conditioning to attend to.*router='linear'"):
        moeify(model, router="cross_attention")
    _assert_untouched(model, before)
    assert torch.equal(_sample(model, kwargs), dense)


# ---------------------------------------------------------------------------------------------
# 3. Experts are the dense FFN, bit for bit


def _dense_in_out(ff: nn.Module, gated: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The dense FFN as moeify packs it: w_in [gate; up]. diffusers' GEGLU/SwiGLU projection is
    [hidden; gate] (`hidden, gate = proj(x).chunk(2)`), so the halves swap."""
    proj, out = ff.net[0].proj, ff.net[2]
    w_in, b_in = proj.weight.detach().clone(), None if proj.bias is None else proj.bias.detach().clone()
    if gated:
        w_in = torch.cat(w_in.chunk(2)[::-1])
        b_in = None if b_in is None else torch.cat(b_in.chunk(2)[::-1])
    b_out = None if out.bias is None else out.bias.detach().clone()
    return w_in, b_in, out.weight.detach().clone(), b_out


def _assert_each_expert_equals(stacked: Tensor | None, dense: Tensor | None) -> None:
    assert (stacked is None) == (dense is None)
    if dense is not None:
        assert all(torch.equal(expert, dense) for expert in stacked.unbind(0))


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_experts_equal_dense_weights_bit_for_bit(name: str) -> None:
    model, _ = BUILDERS[name]()
    gated = {site: size[2] for site, size in EXPECTED_SITES[name].items()}
    dense = {site: _dense_in_out(model.get_submodule(site), gated[site]) for site in gated}
    for site in (s for s, is_gated in gated.items() if is_gated):  # GEGLU/SwiGLU: the swap is real
        assert not torch.equal(*model.get_submodule(site).net[0].proj.weight.chunk(2))
    moeify(model, num_experts=4, top_k=2, shared_expert_init="zero_out")
    for site, (w_in, b_in, w_out, b_out) in dense.items():
        layer = model.get_submodule(site)
        assert isinstance(layer, MoeLayer) and layer.experts.gated == gated[site]
        experts, shared = layer.experts, layer.shared_experts
        assert experts.w_in.shape == (4, *w_in.shape)
        pairs = ((experts.w_in, w_in), (experts.b_in, b_in), (experts.w_out, w_out), (experts.b_out, b_out))
        for stacked, value in pairs:
            _assert_each_expert_equals(stacked, value)
        # zero_out: the shared expert's input side is the dense FFN's, its output side exactly zero.
        _assert_each_expert_equals(shared.w_in, w_in)
        _assert_each_expert_equals(shared.b_in, b_in)
        assert not shared.w_out.any() and (shared.b_out is None or not shared.b_out.any())


# ---------------------------------------------------------------------------------------------
# 4. A denoising loop runs unchanged


def _denoise(model: nn.Module, name: str, kwargs: dict, steps: int = 2) -> Tensor:
    """`steps` scheduler steps from the builder's latents; returns the final latents."""
    scheduler = diffusers.DDIMScheduler() if name in DDIM_MODELS else diffusers.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    key = latent_key(kwargs)
    latents = kwargs[key]
    for t in scheduler.timesteps:
        timestep = (t * TIMESTEP_SCALE.get(name, 1)).expand(BATCH)
        with torch.no_grad():
            pred = model(**{**kwargs, key: latents, "timestep": timestep}).sample
        if pred.shape != latents.shape:  # learned sigma (DiT, PixArt): [epsilon; variance] on channels
            pred = pred.chunk(2, dim=1)[0]
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_denoising_steps_unchanged_by_conversion(name: str) -> None:
    model, kwargs = BUILDERS[name]()
    dense = _denoise(model, name, kwargs)
    router = "linear" if name == "dit" else "cross_attention"
    moeify(model, shared_expert_init="zero_out", **_router_config(name, router))
    converted = _denoise(model, name, kwargs)
    assert dense.isfinite().all() and not torch.equal(dense, kwargs[latent_key(kwargs)])
    # Same function, different kernels (grouped dispatch, renormalised top-k weights): equal to rounding.
    assert _relative(converted, dense) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 5. The cross-attention router reads the forward's text conditioning


def _manual_logits(router: nn.Module, x_TD: Tensor, c_BLC: Tensor) -> Tensor:
    """logits = W_x x + W_o MHA(W_q x, W_k c, W_v c), written out (no SDPA) as an independent reference."""
    heads, batch = router.num_heads, c_BLC.shape[0]
    q = router.to_q(x_TD).view(batch, -1, heads, router.to_q.out_features // heads).transpose(1, 2)
    k = router.to_k(c_BLC).view(batch, -1, heads, router.to_k.out_features // heads).transpose(1, 2)
    v = router.to_v(c_BLC).view(batch, -1, heads, router.to_v.out_features // heads).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    r_TA = (attn @ v).transpose(1, 2).reshape(x_TD.shape[0], -1)
    return router.from_tokens(x_TD) + router.from_context(r_TA)


def test_cross_attention_router_follows_the_text() -> None:
    model, kwargs = BUILDERS["pixart"]()
    # A larger router init than the default 0.02, so that a different prompt visibly moves routes.
    moeify(model, router="cross_attention", router_init_std=0.5)
    records = _record_routers(model)
    prompts = [kwargs["encoder_hidden_states"], text(seed=7)]
    for prompt in prompts:
        _sample(model, {**kwargs, "encoder_hidden_states": prompt})
        assert model._moeify_conditioning.value is prompt  # the tensor of this forward, not a copy
    changed_routes = 0
    for name, layer in moe_layers(model):
        (x_a, shape_a, logits_a), (x_b, _, logits_b) = records[name]
        # The logits are exactly the router's function of its tokens and the prompt passed.
        for x, logits, prompt in ((x_a, logits_a, prompts[0]), (x_b, logits_b, prompts[1])):
            torch.testing.assert_close(logits, _manual_logits(layer.router, x, prompt), rtol=1e-5, atol=1e-6)
        # Same tokens, other prompt: only the conditioning changes, and the logits move with it.
        with torch.no_grad():
            model._moeify_conditioning.value = prompts[1]
            moved = layer.router(x_a, shape_a)
        assert (moved - logits_a).abs().max() > 1e-2
        top_a, top_b = logits_a.topk(layer.top_k).indices, logits_b.topk(layer.top_k).indices
        changed_routes += int((top_a.sort().values != top_b.sort().values).any(-1).sum())
    assert changed_routes > 0


def test_cross_attention_router_reads_positional_conditioning() -> None:
    model, kwargs = BUILDERS["unet"]()
    dense = _sample(model, kwargs)
    moeify(model, router="cross_attention")
    records = _record_routers(model)
    prompt = kwargs["encoder_hidden_states"]
    with torch.no_grad():
        out = model(kwargs["sample"], kwargs["timestep"], prompt).sample  # UNet's 3rd positional argument
    assert model._moeify_conditioning.value is prompt
    assert _relative(out, dense) <= 1e-5
    for name, layer in moe_layers(model):
        x, _, logits = records[name][0]
        torch.testing.assert_close(logits, _manual_logits(layer.router, x, prompt), rtol=1e-5, atol=1e-6)


def test_cross_attention_router_ignores_masked_text_tokens() -> None:
    model, kwargs = BUILDERS["hunyuan_video"]()
    kwargs["encoder_attention_mask"] = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]] * BATCH)
    prompt = kwargs["encoder_hidden_states"]
    repadded = torch.cat([prompt[:, :3], text(seed=7)[:, 3:]], dim=1)  # other values at the padded positions
    dense = [_sample(model, {**kwargs, "encoder_hidden_states": p}) for p in (prompt, repadded)]
    assert torch.equal(*dense)  # the dense model never reads the padded tokens
    moeify(model, router="cross_attention", router_init_std=0.5)
    records = _record_routers(model)
    for p in (prompt, repadded):
        _sample(model, {**kwargs, "encoder_hidden_states": p})
    (x_a, _, logits_a), (x_b, _, logits_b) = records["transformer_blocks.0.ff"]  # the image tokens' FFN
    assert torch.equal(x_a, x_b)
    torch.testing.assert_close(logits_b, logits_a)


ROUTER_PARTS = ("to_q", "to_k", "to_v", "from_tokens", "from_context")


def _router_grads(model: nn.Module, kwargs: dict, with_aux: bool) -> dict[str, Tensor]:
    model.zero_grad()
    loss = model(**kwargs).sample.pow(2).mean()
    (loss + aux_loss(model) if with_aux else loss).backward()
    return {
        f"{name}.{part}": getattr(layer.router, part).weight.grad.clone()
        for name, layer in moe_layers(model)
        for part in ROUTER_PARTS
    }


def test_one_optimizer_step_trains_the_cross_attention_router() -> None:
    model, kwargs = BUILDERS["pixart"]()
    moeify(model, router="cross_attention")
    model.train()
    # Routed experts are exact clones: the task loss alone gives the routers (almost) no gradient.
    task_only = _router_grads(model, kwargs, with_aux=False)
    grads = _router_grads(model, kwargs, with_aux=True)
    for key, grad in grads.items():
        assert grad.isfinite().all() and grad.norm() > 1e-9, key
        assert task_only[key].norm() < 1e-3 * grad.norm(), key
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    assert len(before) == len(grads)
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    for n, p in model.named_parameters():
        if n in before:
            assert (p.detach() - before[n]).abs().max() > 1e-4, n


# ---------------------------------------------------------------------------------------------
# 6. Gradient checkpointing


def test_gradient_checkpointing_with_cross_attention_router() -> None:
    plain, kwargs = BUILDERS["pixart"]()
    moeify(plain, router="cross_attention", shared_expert_init="zero_out")
    checkpointed = copy.deepcopy(plain)  # as EMA copies are made: the copy has its own conditioning
    context = checkpointed._moeify_conditioning
    assert context is not plain._moeify_conditioning
    assert all(layer.router.context is context for _, layer in moe_layers(checkpointed))
    checkpointed.enable_gradient_checkpointing()
    calls = {}
    results = {}
    for label, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.train()
        layer = moe_layers(model)[0][1]
        calls[label] = 0
        layer.register_forward_hook(lambda *_, label=label: calls.__setitem__(label, calls[label] + 1))
        loss = model(**kwargs).sample.pow(2).mean() + aux_loss(model)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        counts = [layer.tokens_per_expert.clone() for _, layer in moe_layers(model)]
        results[label] = (loss.detach(), grads, counts)
    assert calls == {"plain": 1, "checkpointed": 2}  # the block really was recomputed in backward
    (loss_p, grads_p, counts_p), (loss_c, grads_c, counts_c) = results["plain"], results["checkpointed"]
    torch.testing.assert_close(loss_c, loss_p, rtol=0, atol=0)
    assert grads_c.keys() == grads_p.keys()
    assert any(".router.to_k." in n for n in grads_c)
    for n in grads_p:
        torch.testing.assert_close(grads_c[n], grads_p[n], rtol=1e-5, atol=1e-8, msg=n)
    # The recompute neither counted its tokens again nor lost the routing statistics.
    assert all(torch.equal(c, p) for c, p in zip(counts_c, counts_p))
