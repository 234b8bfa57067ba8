"""Tiny diffusers models built straight from their classes (no Hub), each with valid forward inputs.

Every builder returns `(model, kwargs)`: the model in eval mode, fp32, its weights drawn from a
fixed seed (the caller's RNG state is left alone), and keyword inputs such that `model(**kwargs)`
runs. Batch 2 everywhere, 5 text tokens of width 16 wherever there is text conditioning.
"""

from __future__ import annotations

from collections.abc import Callable

import diffusers
import torch
from torch import Tensor, nn

BATCH = 2
TEXT_TOKENS = 5
TEXT_DIM = 16

Built = tuple[nn.Module, dict]


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text(seed: int = 1, tokens: int = TEXT_TOKENS) -> Tensor:
    """An `encoder_hidden_states` batch: [BATCH, tokens, TEXT_DIM]."""
    return randn(BATCH, tokens, TEXT_DIM, seed=seed)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def _steps() -> Tensor:
    return torch.tensor([300, 700])


def dit() -> Built:
    model = _seeded(
        lambda: diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
            norm_num_groups=1,
        )
    )
    labels = torch.tensor([1, 2])
    return model, dict(hidden_states=randn(BATCH, 4, 8, 8, seed=0), timestep=_steps(), class_labels=labels)


def pixart() -> Built:
    model = _seeded(
        lambda: diffusers.PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=16,
        )
    )
    return model, dict(
        hidden_states=randn(BATCH, 4, 8, 8, seed=0),
        encoder_hidden_states=text(),
        timestep=_steps(),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def sd3() -> Built:
    model = _seeded(
        lambda: diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            out_channels=4,
        )
    )
    return model, dict(
        hidden_states=randn(BATCH, 4, 8, 8, seed=0),
        encoder_hidden_states=text(),
        pooled_projections=randn(BATCH, 16, seed=2),
        timestep=_steps().float(),
    )


def flux() -> Built:
    model = _seeded(
        lambda: diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            axes_dims_rope=[2, 2, 4],
        )
    )
    # Packed latents [B, H*W, C] of a 4x4 image; position ids (t, h, w) per image and text token.
    h, w = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), h.flatten().float(), w.flatten().float()], dim=-1)
    return model, dict(
        hidden_states=randn(BATCH, 16, 4, seed=0),
        encoder_hidden_states=text(),
        pooled_projections=randn(BATCH, 16, seed=2),
        timestep=_steps().float() / 1000,
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
    )


def cogvideox() -> Built:
    model = _seeded(
        lambda: diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            text_embed_dim=16,
            time_embed_dim=4,
            max_text_seq_length=8,
        )
    )
    # Video latents [B, frames, C, H, W]; the text length must be max_text_seq_length.
    latents = randn(BATCH, 3, 4, 8, 8, seed=0)
    return model, dict(hidden_states=latents, encoder_hidden_states=text(tokens=8), timestep=_steps())


def wan() -> Built:
    model = _seeded(
        lambda: diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )
    )
    # Video latents [B, C, frames, H, W].
    return model, dict(hidden_states=randn(BATCH, 4, 2, 8, 8, seed=0), encoder_hidden_states=text(), timestep=_steps())


def ltx() -> Built:
    model = _seeded(
        lambda: diffusers.LTXVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=16,
        )
    )
    # Packed video latents [B, frames*H*W, C] of 2 frames of 4x4.
    return model, dict(
        hidden_states=randn(BATCH, 2 * 4 * 4, 4, seed=0),
        encoder_hidden_states=text(),
        timestep=_steps(),
        encoder_attention_mask=torch.ones(BATCH, TEXT_TOKENS),
        num_frames=2,
        height=4,
        width=4,
    )


def hunyuan_video() -> Built:
    model = _seeded(
        lambda: diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        )
    )
    # guidance_embeds defaults to True, so the guidance scale (x1000, as the pipeline passes it) is required.
    return model, dict(
        hidden_states=randn(BATCH, 4, 2, 4, 4, seed=0),
        encoder_hidden_states=text(),
        encoder_attention_mask=torch.ones(BATCH, TEXT_TOKENS),
        pooled_projections=randn(BATCH, 8, seed=2),
        timestep=_steps(),
        guidance=torch.full((BATCH,), 6000.0),
    )


def unet() -> Built:
    model = _seeded(
        lambda: diffusers.UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
        )
    )
    return model, dict(sample=randn(BATCH, 4, 8, 8, seed=0), encoder_hidden_states=text(), timestep=_steps())


def sana() -> Built:
    model = _seeded(
        lambda: diffusers.SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=1,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            patch_size=1,
        )
    )
    return model, dict(hidden_states=randn(BATCH, 4, 8, 8, seed=0), encoder_hidden_states=text(), timestep=_steps())


def mochi() -> Built:
    """Not in the lead's list: the one tiny model here whose FeedForward is SwiGLU."""
    model = _seeded(
        lambda: diffusers.MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=4,
            text_embed_dim=16,
            time_embed_dim=4,
            max_sequence_length=8,
        )
    )
    return model, dict(
        hidden_states=randn(BATCH, 4, 2, 8, 8, seed=0),
        encoder_hidden_states=text(),
        timestep=_steps(),
        encoder_attention_mask=torch.ones(BATCH, TEXT_TOKENS),
    )


BUILDERS: dict[str, Callable[[], Built]] = {
    "dit": dit,
    "pixart": pixart,
    "sd3": sd3,
    "flux": flux,
    "cogvideox": cogvideox,
    "wan": wan,
    "ltx": ltx,
    "hunyuan_video": hunyuan_video,
    "unet": unet,
    "sana": sana,
    "mochi": mochi,
}


def latent_key(kwargs: dict) -> str:
    """The forward argument holding the noisy latents."""
    return "sample" if "sample" in kwargs else "hidden_states"
