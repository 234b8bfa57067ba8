"""A tiny text-conditioned DiT-like denoiser and a synthetic captioned-latent task.

The task has structure for experts to specialise on: each sample is one of 8 objects, drawn in one
of 4 colours at one of 4 places; its caption is three text tokens (object, colour, place) and its
latent is the object's pattern, tinted by the colour, bright at the place. The denoiser predicts
the noise of a cosine-schedule forward process from the noisy latent, the timestep and the caption
(cross-attention), as a text-to-image DiT does.

Shape legend: B batch, S latent tokens (a 4x4 grid), C latent channels, L caption tokens,
Q caption width, D model width, F frequencies of the timestep embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRID = 4  # latent side: S = 16 tokens
CHANNELS = 8
CAPTION_DIM = 16
OBJECTS, COLOURS, PLACES = 8, 4, 4


@dataclass(frozen=True)
class Shape:
    """The denoiser's size. Defaults: 6 blocks (enough depth for a shallow / middle / deep split),
    width 32, FFN 128; ~100k parameters, a training step of batch 32 in a few ms dense."""

    depth: int = 6
    dim: int = 32
    ffn: int = 128
    heads: int = 2
    freqs: int = 16


class Task:
    """The synthetic captioned latents. The tables are fixed (seed 0) so every run sees the same
    world; `batch(generator)` draws samples, noise and timesteps from the caller's generator."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.pattern_OSC = torch.randn(OBJECTS, GRID * GRID, CHANNELS, generator=gen)
        self.tint_KC = 1.0 + 0.5 * torch.randn(COLOURS, CHANNELS, generator=gen)
        rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        quadrant_S = (rows // 2 * 2 + cols // 2).flatten()
        self.light_PS = torch.stack([0.3 + 0.7 * (quadrant_S == p).float() for p in range(PLACES)])
        words = torch.randn(OBJECTS + COLOURS + PLACES, CAPTION_DIM, generator=gen)
        self.words_obj, self.words_col = words[:OBJECTS], words[OBJECTS : OBJECTS + COLOURS]
        self.words_place = words[OBJECTS + COLOURS :]

    def clean(self, obj_B: Tensor, col_B: Tensor, place_B: Tensor) -> Tensor:
        x0_BSC = self.pattern_OSC[obj_B] * self.tint_KC[col_B][:, None, :] * self.light_PS[place_B][:, :, None]
        return x0_BSC / x0_BSC.std(dim=(1, 2), keepdim=True)

    def caption(self, obj_B: Tensor, col_B: Tensor, place_B: Tensor) -> Tensor:
        return torch.stack([self.words_obj[obj_B], self.words_col[col_B], self.words_place[place_B]], dim=1)

    def batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Model inputs (`hidden_states`, `timestep`, `encoder_hidden_states`) and the `target` noise."""
        obj_B = torch.randint(OBJECTS, (batch_size,), generator=generator)
        col_B = torch.randint(COLOURS, (batch_size,), generator=generator)
        place_B = torch.randint(PLACES, (batch_size,), generator=generator)
        x0_BSC = self.clean(obj_B, col_B, place_B)
        noise_BSC = torch.randn(x0_BSC.shape, generator=generator)
        t_B = torch.rand(batch_size, generator=generator)
        keep_B = torch.cos(t_B * math.pi / 2)[:, None, None]  # sqrt(alpha_bar), cosine schedule
        noisy_BSC = keep_B * x0_BSC + (1 - keep_B**2).sqrt() * noise_BSC
        return {
            "hidden_states": noisy_BSC,
            "timestep": t_B,
            "encoder_hidden_states": self.caption(obj_B, col_B, place_B),
            "target": noise_BSC,
        }


class FeedForward(nn.Module):
    """The block's FFN, a module of its own (as diffusers' FeedForward): what moeify converts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Attention(nn.Module):
    """Multi-head attention of the latent tokens to a context (themselves, or the caption)."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_kv = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x_BSD: Tensor, context_BLQ: Tensor) -> Tensor:
        b, s, d = x_BSD.shape
        q_BHSd = self.to_q(x_BSD).view(b, s, self.heads, -1).transpose(1, 2)
        k_BHLd, v_BHLd = self.to_kv(context_BLQ).view(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHLd, v_BHLd)
        return self.to_out(out_BHSd.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Self-attention, cross-attention to the caption, FFN; adaLN shift/scale from the timestep
    before self-attention and FFN, as in DiT."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        d = shape.dim
        self.norm_attn, self.norm_cross, self.norm_ff = (nn.LayerNorm(d, elementwise_affine=False) for _ in range(3))
        self.attn = Attention(d, d, shape.heads)
        self.cross = Attention(d, CAPTION_DIM, shape.heads)
        self.ada = nn.Linear(d, 4 * d)
        self.ff = FeedForward(d, shape.ffn)

    def forward(self, x_BSD: Tensor, temb_BD: Tensor, caption_BLQ: Tensor) -> Tensor:
        shift_a, scale_a, shift_f, scale_f = self.ada(F.silu(temb_BD))[:, None, :].chunk(4, dim=-1)
        h = self.norm_attn(x_BSD) * (1 + scale_a) + shift_a
        x_BSD = x_BSD + self.attn(h, h)
        x_BSD = x_BSD + self.cross(self.norm_cross(x_BSD), caption_BLQ)
        return x_BSD + self.ff(self.norm_ff(x_BSD) * (1 + scale_f) + shift_f)


class TinyDiT(nn.Module):
    """forward(hidden_states [B, S, C], timestep [B] in [0, 1], encoder_hidden_states [B, L, Q])
    -> predicted noise [B, S, C]."""

    def __init__(self, shape: Shape = Shape()) -> None:
        super().__init__()
        self.shape = shape
        d = shape.dim
        self.patch_in = nn.Linear(CHANNELS, d)
        self.pos_SD = nn.Parameter(0.02 * torch.randn(GRID * GRID, d))
        self.time_mlp = nn.Sequential(nn.Linear(2 * shape.freqs, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.depth))
        self.norm_out = nn.LayerNorm(d)
        self.patch_out = nn.Linear(d, CHANNELS)

    def time_embedding(self, t_B: Tensor) -> Tensor:
        freqs_F = torch.exp(-math.log(1000.0) * torch.arange(self.shape.freqs, device=t_B.device) / self.shape.freqs)
        angles_BF = 1000.0 * t_B[:, None] * freqs_F[None, :]
        features_BF = torch.cat([angles_BF.sin(), angles_BF.cos()], dim=-1)
        return self.time_mlp(features_BF.to(self.pos_SD.dtype))

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        dtype = self.pos_SD.dtype  # the storage dtype (bf16 in the precision experiment)
        temb_BD = self.time_embedding(timestep.float())
        x_BSD = self.patch_in(hidden_states.to(dtype)) + self.pos_SD
        caption_BLQ = encoder_hidden_states.to(dtype)
        for block in self.blocks:
            x_BSD = block(x_BSD, temb_BD, caption_BLQ)
        return self.patch_out(self.norm_out(x_BSD))


def denoising_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k != "target"}
    prediction = model(**inputs)
    return F.mse_loss(prediction.float(), batch["target"])
