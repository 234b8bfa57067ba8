"""moeify inside real diffusers pipelines built from tiny parts (no Hub), and routing per timestep.

Pipelines: PixArt-alpha (T5 text encoder, padding mask), Stable Diffusion 3 (two CLIP encoders +
T5, joint attention) and Stable Diffusion (UNet, CLIP). Tokenizers are real transformers classes
built from a 30-letter vocabulary. Checked: a converted pipeline still runs end to end with the
same output as the dense one, the cross-attention router reads exactly the prompt embeddings the
pipeline passed (classifier-free guidance doubling included), and `TimestepRouting` yields one
entry per denoising step that agrees with the MoE layers' own counters.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import pytest
import tiny_diffusers as td
import torch
from core_helpers import TimestepToy
from host_reads import HostReads
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from moeify import ConversionError, moe_layers, moeify
from moeify.integrations.diffusers import denoisers, moeify_pipeline
from moeify.layers.routers.cross_attention import CrossAttentionRouter
from moeify.monitors import TimestepRouting, attach_monitors

PROMPT, OTHER_PROMPT = "a red cat", "blue sky over the sea"
TEXT_LEN = 16  # tokens of every tokenizer / text encoder
MOE = dict(num_experts=4, top_k=2, router="cross_attention", shared_expert_init="zero_out")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------- tiny parts


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def t5_tokenizer() -> T5Tokenizer:
    """A real T5 (Unigram) tokenizer over letters and word-initial letters."""
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + list(string.ascii_lowercase) + ["▁" + c for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], extra_ids=0)


def clip_tokenizer() -> CLIPTokenizer:
    """A real CLIP (BPE) tokenizer with no merges: letters, and word-final letters."""
    pieces = (
        ["<|startoftext|>", "<|endoftext|>"]
        + list(string.ascii_lowercase)
        + [c + "</w>" for c in string.ascii_lowercase]
    )
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=TEXT_LEN)


def t5_encoder(width: int = 16) -> T5EncoderModel:
    config = T5Config(
        vocab_size=56, d_model=width, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    return _seeded(lambda: T5EncoderModel(config))


def clip_encoder(width: int, projection: bool) -> nn.Module:
    config = CLIPTextConfig(
        vocab_size=54,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return _seeded(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def vae(**extra) -> diffusers.AutoencoderKL:
    """Latents of 4 channels at half the image side (vae_scale_factor 2)."""
    return _seeded(
        lambda: diffusers.AutoencoderKL(
            block_out_channels=(8, 8),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=16,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            **extra,
        )
    )


def pixart() -> diffusers.PixArtAlphaPipeline:
    return diffusers.PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(),
        vae=vae(),
        transformer=td.pixart()[0],
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )


def sd3() -> diffusers.StableDiffusion3Pipeline:
    # Two CLIP widths of 8 concatenate to the transformer's joint_attention_dim 16 (= T5's width).
    return diffusers.StableDiffusion3Pipeline(
        transformer=td.sd3()[0],
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae(shift_factor=0.0),
        text_encoder=clip_encoder(8, True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(8, True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(),
        tokenizer_3=t5_tokenizer(),
    )


def stable_diffusion() -> diffusers.StableDiffusionPipeline:
    return diffusers.StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip_encoder(16, False),
        tokenizer=clip_tokenizer(),
        unet=td.unet()[0],
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class Spec:
    build: Callable[[], diffusers.DiffusionPipeline]
    call: dict
    # (pipe, prompt) -> the conditioning the denoiser must get: [negative; positive] and its mask
    expected: Callable[[diffusers.DiffusionPipeline, str], tuple[Tensor, Tensor | None]]


def _pixart_expected(pipe, prompt):
    pos, pos_mask, neg, neg_mask = pipe.encode_prompt(prompt, max_sequence_length=TEXT_LEN, clean_caption=False)
    return torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask])


def _sd3_expected(pipe, prompt):
    pos, neg, _, _ = pipe.encode_prompt(prompt, None, None, max_sequence_length=TEXT_LEN)
    return torch.cat([neg, pos]), None


def _sd_expected(pipe, prompt):
    pos, neg = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True)
    return torch.cat([neg, pos]), None


SPECS = {
    "pixart": Spec(
        pixart, dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=TEXT_LEN), _pixart_expected
    ),
    "sd3": Spec(sd3, dict(max_sequence_length=TEXT_LEN), _sd3_expected),
    "stable_diffusion": Spec(stable_diffusion, {}, _sd_expected),
}


def build(name: str) -> diffusers.DiffusionPipeline:
    pipe = SPECS[name].build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(name: str, pipe, prompt: str = PROMPT, steps: int = 2, output_type: str = "pt") -> Tensor:
    out = pipe(
        prompt,
        num_inference_steps=steps,
        height=16,
        width=16,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        **SPECS[name].call,
    )
    return out.images


def denoiser(pipe) -> nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_converted_pipeline_reproduces_the_dense_one(name, output_type):
    pipe = build(name)
    dense = run(name, pipe, output_type=output_type)
    model = denoiser(pipe)
    assert moeify(model, **MOE) is model
    layers = moe_layers(model)
    assert layers and all(isinstance(layer.router, CrossAttentionRouter) for _, layer in layers)
    converted = run(name, pipe, output_type=output_type)
    assert converted.shape == dense.shape and torch.isfinite(converted).all()
    relative = ((converted - dense).abs().max() / dense.abs().max()).item()
    assert relative <= 1e-5, f"{name}: max |moe - dense| / max |dense| = {relative:.2e}"
    # The experts did route: every MoE layer counted the tokens of both CFG halves at each step.
    assert all(layer.tokens_per_expert.sum() > 0 for _, layer in layers)


@pytest.mark.parametrize("name", list(SPECS))
def test_router_reads_the_prompt_embeddings_the_pipeline_passed(name):
    pipe = build(name)
    moeify(denoiser(pipe), **MOE)
    router = moe_layers(denoiser(pipe))[0][1].router
    seen: list[tuple[Tensor, Tensor | None]] = []
    router.register_forward_pre_hook(lambda module, args: seen.append((module.context.value, module.context.mask)))
    run(name, pipe, steps=3)
    with torch.no_grad():
        expected, expected_mask = SPECS[name].expected(pipe, PROMPT)
    assert len(seen) == 3  # once per denoising step
    for value, mask in seen:
        assert value.shape[0] == 2  # one prompt, doubled by classifier-free guidance: [negative; positive]
        assert torch.equal(value, expected)
        assert (mask is None) if expected_mask is None else torch.equal(mask, expected_mask)


def test_pixart_conditioning_is_the_t5_output_for_the_prompt():
    """Independent of the pipeline's own encode_prompt: tokenize and encode by hand."""
    pipe = build("pixart")
    moeify(pipe.transformer, **MOE)
    router = moe_layers(pipe.transformer)[0][1].router
    run("pixart", pipe)
    with torch.no_grad():
        tokens = pipe.tokenizer([PROMPT], padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
        by_hand = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert torch.equal(router.context.value[1:], by_hand)
    assert torch.equal(router.context.mask[1:], tokens.attention_mask)
    assert router.context.mask[0].sum() == 1  # the empty negative prompt: only </s> is attended


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_routes_follow_the_prompt(name):
    pipe = build(name)
    moeify(denoiser(pipe), **MOE)
    router = moe_layers(denoiser(pipe))[0][1].router
    logits: list[Tensor] = []
    router.register_forward_hook(lambda module, args, out: logits.append(out))
    run(name, pipe, PROMPT)
    run(name, pipe, OTHER_PROMPT)
    # Same seed, same latents at the first step: only the text differs, and the logits follow it.
    # (2 steps: PixArt's pipeline breaks on num_inference_steps=1 with a multistep scheduler.)
    assert len(logits) == 4 and not torch.allclose(logits[0], logits[2])


# ---------------------------------------------------------------- moeify_pipeline


def test_moeify_pipeline_converts_the_unet_and_keeps_the_output():
    pipe = build("stable_diffusion")
    dense = run("stable_diffusion", pipe)
    assert moeify_pipeline(pipe, **MOE) is pipe
    assert list(denoisers(pipe)) == ["unet"] and moe_layers(pipe.unet)
    assert torch.allclose(run("stable_diffusion", pipe), dense, rtol=0, atol=1e-5 * dense.abs().max().item())


def test_moeify_pipeline_without_a_denoiser_says_so():
    pipe = build("pixart")
    pipe.transformer = None
    with pytest.raises(ValueError, match=r"no denoiser among .*transformer.*moeify.moeify\(pipe.<name>"):
        moeify_pipeline(pipe)


def test_moeify_pipeline_plans_every_denoiser_before_changing_one():
    pipe = build("pixart")
    pipe.transformer_2 = nn.Sequential(nn.Conv2d(4, 4, 3))  # nothing to convert: the plan fails
    with pytest.raises(ConversionError):
        moeify_pipeline(pipe, **MOE)
    assert not moe_layers(pipe.transformer)


# ---------------------------------------------------------------- routing per timestep


@pytest.mark.parametrize("name", list(SPECS))
def test_pipeline_run_gives_one_entry_per_timestep(name):
    pipe = build(name)
    moeify(denoiser(pipe), **{**MOE, "router": "linear"})
    layers = moe_layers(denoiser(pipe))
    for _, layer in layers:
        layer.reset_stats()
    diag = TimestepRouting(num_buckets=1000, max_timestep=1000).attach(denoiser(pipe))
    run(name, pipe, steps=4, output_type="latent")
    entries = diag.read()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert [e.timestep for e in entries] == pytest.approx(sorted(timesteps, reverse=True), abs=1e-3)
    for entry in entries:
        # One timestep per sample of the CFG-doubled batch (PixArt, SD3), or one 0-dim timestep (SD's UNet).
        assert entry.count == (1 if name == "stable_diffusion" else 2)
        assert [layer.name for layer in entry.layers] == [name for name, _ in layers]
        for layer, (_, moe) in zip(entry.layers, layers):
            # Every step routed the same number of tokens (both CFG halves), all in its own bucket.
            assert layer.tokens == moe.tokens_per_expert.sum().item() / moe.top_k / 4
            assert sum(layer.load_share) == pytest.approx(1.0, abs=1e-6)
            assert sum(layer.prob_mean) == pytest.approx(1.0, abs=1e-5)
    # The per-timestep counts add up to what each MoE layer counted itself, expert by expert.
    for depth, (_, layer) in enumerate(layers):
        per_timestep = torch.tensor([e.layers[depth].tokens_per_expert for e in entries]).sum(0)
        assert torch.equal(per_timestep.long(), layer.tokens_per_expert)
    assert diag.read() == []  # read() resets
    diag.detach()


def test_pixart_routing_differs_between_timesteps():
    """PixArt's FFN input is adaLN-modulated by the timestep embedding, so a router on it routes
    differently at different noise levels (even on identical latents)."""
    pipe = build("pixart")
    moeify(pipe.transformer, **{**MOE, "router": "linear", "router_init_std": 1.0})
    diag = TimestepRouting(num_buckets=1000).attach(pipe.transformer)
    run("pixart", pipe, steps=4, output_type="latent")
    loads = [tuple(layer.tokens_per_expert for layer in e.layers) for e in diag.read()]
    assert len(set(loads)) == 4

    _, kwargs = td.pixart()
    same_latents = kwargs["hidden_states"][:1].expand(2, -1, -1, -1)
    with torch.no_grad():
        pipe.transformer(**{**kwargs, "hidden_states": same_latents, "timestep": torch.tensor([50, 950])})
    low, high = diag.read()[::-1]
    assert (low.timestep, high.timestep) == (50.0, 950.0)
    assert [layer.tokens_per_expert for layer in low.layers] != [layer.tokens_per_expert for layer in high.layers]


def test_mixed_timesteps_in_a_batch_are_attributed_per_sample():
    model, kwargs = td.pixart()
    moeify(model, **{**MOE, "router": "linear", "router_init_std": 1.0})
    diag = TimestepRouting(num_buckets=10).attach(model)
    with torch.no_grad():
        model(**{**kwargs, "timestep": torch.tensor([120, 870])})
        mixed = diag.read()
        for i, t in enumerate((120, 870)):
            one = {k: (v[i : i + 1] if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
            model(**{**one, "timestep": torch.tensor([t])})
    alone = diag.read()
    assert [e.timestep for e in mixed] == [e.timestep for e in alone] == [870.0, 120.0]
    assert [(e.low, e.high) for e in mixed] == [(800.0, 900.0), (100.0, 200.0)]
    for a, b in zip(mixed, alone):
        for la, lb in zip(a.layers, b.layers):
            assert la.tokens_per_expert == lb.tokens_per_expert
            assert la.entropy == pytest.approx(lb.entropy, rel=1e-5)


def test_gradient_checkpointing_counts_each_forward_once():
    model, kwargs = td.pixart()
    moeify(model, **{**MOE, "router": "linear"})
    model.enable_gradient_checkpointing()
    model.train()
    diag = TimestepRouting(num_buckets=10).attach(model)
    for _, layer in moe_layers(model):
        layer.reset_stats()
    model(**kwargs).sample.square().mean().backward()  # the blocks (routers included) run again in backward
    entries = diag.read()
    assert [e.timestep for e in entries] == [700.0, 300.0]
    for depth, (_, layer) in enumerate(moe_layers(model)):
        counted = torch.tensor([e.layers[depth].tokens_per_expert for e in entries]).sum(0)
        assert torch.equal(counted.long(), layer.tokens_per_expert)


def test_counting_adds_no_host_read_to_the_forward():
    model, kwargs = td.pixart()
    moeify(model, **MOE)
    calls = {}
    for watched in (False, True):
        diag = TimestepRouting().attach(model) if watched else None
        with torch.no_grad(), HostReads() as reads:
            model(**kwargs)
        calls[watched] = reads.calls
        if diag is not None:
            diag.detach()
    assert calls[True] == calls[False]


def test_as_a_monitor_in_a_training_loop():
    model, kwargs = td.pixart()
    moeify(model, **{**MOE, "router": "linear"})
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    diag = TimestepRouting(num_buckets=4)
    runner = attach_monitors(model, ["expert_load", diag]).attach_optimizer(optimizer)
    for step in range(3):
        t = torch.tensor([100 + 250 * step, 900])
        out = model(**{**kwargs, "timestep": t}).sample
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    record = runner.history[-1]["monitors"]["timestep_routing"]
    layer = moe_layers(model)[0][0]
    assert record["model"]["timesteps"] == 2.0  # t=600 and t=900 in the last step
    assert set(record[layer]) >= {"t=600/cv", "t=900/share_0", "t=900/entropy"}
    summary = runner.close()["monitors"]["timestep_routing"]
    assert [e["timestep"] for e in summary["timesteps"]] == [900.0, 600.0, 350.0, 100.0]
    assert [e["count"] for e in summary["timesteps"]] == [3, 1, 1, 1]
    diag.detach()


def test_misuse_is_refused_or_warned():
    with pytest.raises(ValueError, match="num_buckets"):
        TimestepRouting(num_buckets=0)
    with pytest.raises(ValueError, match="max_timestep"):
        TimestepRouting(max_timestep=float("inf"))
    with pytest.raises(ValueError, match="no moeify MoE layers"):
        TimestepRouting().attach(nn.Linear(2, 2))
    model, kwargs = td.pixart()
    moeify(model, **MOE)
    with pytest.raises(RuntimeError, match="attach"):
        TimestepRouting().read()
    diag = TimestepRouting(num_buckets=10).attach(model)
    with pytest.raises(RuntimeError, match="another model"):
        diag.attach(td.pixart()[0])
    with torch.no_grad():
        model(**{**kwargs, "timestep": torch.tensor([0.3, 0.7])})  # Flux-style t / 1000
        with pytest.warns(UserWarning, match="max_timestep=1.0"):
            diag.read()
        model(**{**kwargs, "timestep": torch.tensor([10, 1500])})
        with pytest.warns(UserWarning, match="above max_timestep"):
            diag.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**kwargs)
            diag.read()


def test_positional_timesteps_and_tokens_that_do_not_split():
    toy = moeify(TimestepToy(), target_modules=["ff"], num_experts=4, top_k=1)
    diag = TimestepRouting(num_buckets=4).attach(toy)
    with torch.no_grad():
        toy(torch.randn(2, 5, 8), torch.tensor([100, 600]))  # positional timestep, per sample
        toy(torch.randn(2, 5, 8), torch.tensor(999))  # one timestep for every token
        entries = diag.read()
        assert [(e.timestep, e.count, e.layers[0].tokens) for e in entries] == [
            (999.0, 1, 10.0),
            (600.0, 1, 5.0),
            (100.0, 1, 5.0),
        ]
        toy(torch.randn(2, 5, 8), torch.rand(2, 5) * 1000)  # one timestep per token
        assert sum(e.layers[0].tokens for e in diag.read()) == 10.0
        toy.ff(torch.randn(2, 5, 8))  # the MoE layer run outside the model's forward: not counted
        assert diag.read() == []
        with pytest.raises(RuntimeError, match="10 tokens but the forward got 3 timesteps"):
            toy(torch.randn(2, 5, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no `step` argument"):
        TimestepRouting(arg="step").attach(moeify(TimestepToy(), target_modules=["ff"], num_experts=2, top_k=1))
