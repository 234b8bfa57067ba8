"""Models, data and steps shared by the multi-process scripts (run under torchrun) and by the
single-process references computed in tests/test_distributed.py.

Kinds: "llama" (tiny Llama, packed experts, grouped product), "loop" (a toy net with a packed FFN
whose sizes are not 16-byte aligned: the per-expert loop dispatch), "generic" (a toy net whose FFN
is not a recognised layout: `ModuleExperts`). Rank r's batch at step s is seeded by (s, r); the
single-process reference trains on the two ranks' batches concatenated along the batch dim.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import moeify

KINDS = ("llama", "loop", "generic")
STARVED = 3  # the expert that gets no tokens on rank 1
VOCAB, BATCH, SEQ, TOY_IN = 100, 2, 8, 8


class OddFFN(nn.Module):
    """Not a packable FFN (a learnable gain between the projections, which no packed activation
    can hold): converted through the generic path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gain = nn.Parameter(torch.ones(2 * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) * self.gain)


def tiny_llama() -> nn.Module:
    """The dense tiny Llama every distributed scenario converts (seed it before calling)."""
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return AutoModelForCausalLM.from_config(config)


class PlainFFN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ToyNet(nn.Module):
    def __init__(self, d: int, generic: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(TOY_IN, d)
        self.layers = nn.ModuleList(Block(d, OddFFN(d) if generic else PlainFFN(d)) for _ in range(2))
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.out(h)


def build(kind: str, **overrides) -> nn.Module:
    """The converted model of a kind, identical on every rank. balance_loss_weight=0: the balance
    loss is computed per rank (on the local batch), so only without it does DDP equal one process
    on the concatenated batch; the z-loss is a per-token mean and does."""
    torch.manual_seed(0)
    cfg = {"num_experts": 4, "balance_loss_weight": 0.0, "z_loss_weight": 1e-3, **overrides}
    if kind == "llama":
        return moeify.moeify(tiny_llama(), top_k=2, **cfg)
    model = ToyNet(d=10 if kind == "loop" else 16, generic=kind == "generic")
    return moeify.moeify(model, top_k=1, target_modules=r"layers\.\d+\.mlp", **cfg)


def batch(kind: str, step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    if kind == "llama":
        return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return torch.randn(BATCH, 6, TOY_IN, generator=gen)


def concatenated(kind: str, step: int, world: int = 2) -> torch.Tensor:
    return torch.cat([batch(kind, step, rank) for rank in range(world)])


def loss_of(kind: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Task loss (a per-token mean) + moeify's router losses."""
    if kind == "llama":  # a transformers model with labels: its loss includes the router losses
        return model(x, labels=x).loss
    return model(x).pow(2).mean() + moeify.aux_loss(model)


def starve(model: nn.Module, rows: slice) -> None:
    """Bias every router so that the tokens in `rows` never pick expert STARVED."""

    def hook(module: nn.Module, args, logits_TE: torch.Tensor) -> torch.Tensor:
        bias_TE = torch.zeros_like(logits_TE)
        bias_TE[rows, STARVED] = -1e4
        return logits_TE + bias_TE

    for _, layer in moeify.moe_layers(model):
        layer.router.register_forward_hook(hook)


def second_half(kind: str, world: int = 2) -> slice:
    """The router rows (tokens) that came from rank 1 in a concatenated batch."""
    tokens = BATCH * (SEQ if kind == "llama" else 6)
    return slice(tokens * (world - 1), None)


def flat_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
