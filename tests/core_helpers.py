"""Shared by the tests: the tiny Llama config every test file builds on, a converted Llama for the
monitor tests, a denoiser-like toy with a `timestep` argument, plain nn.Module stacks around
custom FFN classes, and the "untouched" snapshot a failed conversion must leave equal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moeify import moeify

VOCAB, HIDDEN, INTERMEDIATE = 100, 32, 64
TINY_LLAMA = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}
LLAMA = TINY_LLAMA | {
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_llama(seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA | extra)).eval()


def tokens(seed: int = 1, batch: int = 2, seq: int = 8) -> Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# Plain nn.Module models (no transformers) around custom FFN classes

D, INNER = 16, 32  # multiples of 4: fp32 rows stay 16-byte aligned, so torch._grouped_mm is usable


class GatedMLP(nn.Module):
    """A Llama-style gated FFN under a class name no registry knows (found by the probe)."""

    def __init__(self, d: int = D, i: int = INNER) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block around one FFN, stored as `mlp` (block index in the name)."""

    def __init__(self, mlp: nn.Module, d: int = D) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class Stack(nn.Module):
    """`layers.<i>.mlp` for each FFN given; forward(x [B, S, D]) -> [B, S, D]."""

    def __init__(self, *mlps: nn.Module, d: int = D) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(mlp, d) for mlp in mlps)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = block(x)
        return x


def stack_input(seed: int = 3, d: int = D) -> Tensor:
    return torch.randn(2, 5, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# "The model is untouched": module types by name, every state_dict tensor, no moeify_state


@dataclass
class Snapshot:
    types: list[tuple[str, str]]
    state: dict[str, Tensor]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        [(name, type(module).__name__) for name, module in model.named_modules()],
        {key: value.detach().clone() for key, value in model.state_dict().items()},
    )


def assert_untouched(model: nn.Module, before: Snapshot) -> None:
    assert [(name, type(module).__name__) for name, module in model.named_modules()] == before.types
    state = model.state_dict()
    assert list(state) == list(before.state)
    for key, value in state.items():
        if value.is_meta:
            assert (value.shape, value.dtype) == (before.state[key].shape, before.state[key].dtype), key
        else:
            assert torch.equal(value, before.state[key]), key
    assert not hasattr(model, "moeify_state")
    # No parameter is left a view into a packed [E, ...] expert tensor (the storage sharing of a
    # conversion in progress is undone on failure).
    for name, param in model.named_parameters():
        if not param.is_meta:
            assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), name


def llama_config(**extra) -> PretrainedConfig:
    """The tiny Llama config (2 layers, hidden 32, vocab 100) with `extra` fields on top."""
    return AutoConfig.for_model("llama", **TINY_LLAMA | extra)


def monitored_llama(layers: int = 4, **recipe) -> nn.Module:
    """The monitor tests' model: a converted 4-layer Llama, 4 experts, top-1, small balance and
    entropy weights (so E = 1 for the ecology monitor)."""
    config = llama_config(num_hidden_layers=layers, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    defaults = {"num_experts": 4, "top_k": 1, "entropy_loss_weight": 0.01, "balance_loss_weight": 0.01}
    return moeify(model, **defaults | recipe)


class TimestepToy(nn.Module):
    """A denoiser-like model: an FFN that sees whatever tokens it is given, next to a `timestep`."""

    def __init__(self) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        return self.ff(x)


class Blocks(nn.Module):
    """Blocks applied one after the other, as `blocks.<i>`: a model around blocks under test."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def resign_checkpoint(directory) -> None:  # a path
    """Recompute a saved checkpoint's checksums after a test edited it on purpose, so that loading
    reaches the check under test instead of stopping at the checksum (which any edit breaks)."""
    import json
    from pathlib import Path

    from moeify.hub.save import MOEIFY_CONFIG, file_checksum, record_checksum

    directory = Path(directory)
    record = json.loads((directory / MOEIFY_CONFIG).read_text())
    if "checksums" in record:
        record["checksums"] = {
            name: file_checksum(directory / name) for name in record["checksums"] if (directory / name).is_file()
        }
    record["record_checksum"] = record_checksum(record)
    (directory / MOEIFY_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
