"""What the layer benchmarks run: the dense FFNs, the moeify layer converted from them, the dense
limits, and transformers' own MoE block loaded with the same weights and routing.

Shape legend: T tokens, D model dim, I intermediate dim, E experts, K top-k.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeify import moeify
from moeify.layers.moe import MoeLayer


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    gated: bool  # SwiGLU (LLM) or a plain GELU MLP (DiT)
    bias: bool
    tokens: int
    num_experts: int = 8
    top_k: int = 2


def llm_shape(tokens: int) -> Shape:
    """Llama-style SwiGLU FFN, no biases."""
    return Shape("llm", hidden=1024, intermediate=2816, gated=True, bias=False, tokens=tokens)


def dit_shape(tokens: int, *, bias: bool = True) -> Shape:
    """DiT-XL-style MLP: fc1 -> GELU(tanh) -> fc2, 4x wide, with biases (timm's Mlp)."""
    return Shape("dit", hidden=1152, intermediate=4608, gated=False, bias=bias, tokens=tokens)


class SwiGLU(nn.Module):
    """LlamaMLP's layout (the structural probe recognises gate_proj/up_proj/down_proj + act)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """timm's Mlp as DiT uses it (fc1/fc2 + act, recognised by the probe)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def dense_ffn(shape: Shape, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = SwiGLU if shape.gated else GeluMLP
        return cls(shape.hidden, shape.intermediate, bias=shape.bias).to(device=device, dtype=dtype)


def convert(dense: nn.Module, shape: Shape) -> MoeLayer:
    """The moeify layer of a copy of `dense` (routed experts only: the shared ones are a plain
    dense FFN and would only dilute the ratio)."""
    holder = nn.Module()
    holder.ffn = copy.deepcopy(dense)
    moeify(holder, num_experts=shape.num_experts, top_k=shape.top_k, num_shared_experts=0, verify=True)
    layer = holder.ffn
    if not isinstance(layer, MoeLayer):
        raise RuntimeError(f"moeify did not convert the {type(dense).__name__}: got {type(layer).__name__}")
    return layer


class DenseTopK(nn.Module):
    """The limit of a top-k layer: the dense FFN run k times on the same tokens."""

    def __init__(self, dense: nn.Module, top_k: int) -> None:
        super().__init__()
        self.dense, self.top_k = dense, top_k

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense(x)
        for _ in range(self.top_k - 1):
            y = y + self.dense(x)
        return y


def _on_expert_weights(dense: nn.Module, layer: MoeLayer, e: int) -> nn.Module:
    """A copy of `dense` whose weights are views of the layer's expert e (bit-identical values,
    the same memory the MoE reads)."""
    ffn, experts = copy.deepcopy(dense), layer.experts
    w_in, w_out = experts.w_in.detach()[e], experts.w_out.detach()[e]
    b_in = experts.b_in.detach()[e] if experts.b_in is not None else None
    b_out = experts.b_out.detach()[e] if experts.b_out is not None else None
    if isinstance(ffn, SwiGLU):
        half = w_in.shape[0] // 2
        gate_bias, up_bias = (None, None) if b_in is None else (b_in[:half], b_in[half:])
        pieces = {"gate_proj": (w_in[:half], gate_bias), "up_proj": (w_in[half:], up_bias), "down_proj": (w_out, b_out)}
    else:
        pieces = {"fc1": (w_in, b_in), "fc2": (w_out, b_out)}
    for name, (weight, bias) in pieces.items():
        linear = getattr(ffn, name)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
    return ffn


class DensePerExpert(nn.Module):
    """The decode limit: for each expert the routing hit, the dense FFN on that expert's weights
    (the MoE layer's own memory: as many weight bytes are read as the MoE must read, from the same
    pages) run once on that expert's tokens, gathered beforehand."""

    def __init__(self, dense: nn.Module, layer: MoeLayer, x: Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            _, _, _, expert_idx_TK, _ = layer.route(x.reshape(-1, x.shape[-1]), x.shape[:-1])
        x_TD = x.reshape(-1, x.shape[-1])
        self.chunks = [x_TD[(expert_idx_TK == e).any(-1)] for e in range(layer.num_experts)]
        hit = [e for e, chunk in enumerate(self.chunks) if chunk.shape[0]]
        self.copies = nn.ModuleList(_on_expert_weights(dense, layer, e) for e in hit)
        self.hit = hit

    def forward(self, x: Tensor) -> Tensor:  # x is ignored: the chunks were gathered at init
        return [ffn(self.chunks[e]) for ffn, e in zip(self.copies, self.hit)]


# --- transformers' own MoE block, loaded with the same weights ---------------------------------


def transformers_twin(layer: MoeLayer, shape: Shape) -> nn.Module:
    """`MixtralSparseMoeBlock` with the moeify layer's router weights (copied) and expert weights
    (shared).

    Mixtral's experts are gated (SwiGLU); for the non-gated DiT MLP its experts are swapped for
    NemotronH's, the one v5 experts class with `has_gate=False` (no biases: compare bias-free).
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = layer.experts
    if experts.b_in is not None or experts.b_out is not None:
        raise ValueError("transformers' experts have no biases: build the twin from a bias-free layer")
    w_in, w_out = experts.w_in, experts.w_out
    config = MixtralConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    if not shape.gated:
        from transformers import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        nemotron = NemotronHConfig(
            hidden_size=shape.hidden,
            moe_intermediate_size=shape.intermediate,
            n_routed_experts=shape.num_experts,
            mlp_hidden_act="gelu_pytorch_tanh",
            moe_latent_size=None,
        )
        with torch.device("meta"):
            block.experts = NemotronHExperts(nemotron)
    block = block.to_empty(device=w_in.device).to(w_in.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
    # The experts share moeify's Parameters (same shapes, same [gate; up] order): both read the
    # very same memory, so page placement (TLB, first touch) cannot favour either side, which
    # matters most in the memory-bound decode rows.
    setattr(block.experts, "gate_up_proj" if shape.gated else "up_proj", w_in)
    block.experts.down_proj = w_out
    return block


def set_experts_implementation(block: nn.Module, name: str) -> None:
    """Select the `@use_experts_implementation` forward ("eager", "grouped_mm", "batched_mm"): the
    decorated forward reads `config._experts_implementation` on every call."""
    block.experts.config._experts_implementation = name


class WithImplementation(nn.Module):
    """Calls `block` with one experts implementation (one block, several contenders)."""

    def __init__(self, block: nn.Module, name: str) -> None:
        super().__init__()
        self.block, self.name = block, name

    def forward(self, x: Tensor) -> Tensor:
        set_experts_implementation(self.block, self.name)
        return self.block(x)


# --- skewed routing ------------------------------------------------------------------------------


@torch.no_grad()
def skew(layer: MoeLayer, twin: nn.Module | None, x: Tensor, strength: float = 4.0) -> Tensor:
    """Make expert 0 take every token as one of its k (half the assignments at k=2).

    Adds a direction u to router row 0 and to every token (x + strength*u): expert 0's logit
    grows by ~2*strength^2 while the others move by O(router_std * strength). Edits the router
    weights in place (moeify's and the twin's alike); returns the skewed tokens.
    """
    generator = torch.Generator().manual_seed(1234)
    u = torch.randn(x.shape[-1], generator=generator)
    u = (u / u.norm()).to(device=x.device, dtype=x.dtype)
    layer.router.gate.weight[0] += 2 * strength * u.float()
    if twin is not None:
        twin.gate.weight.copy_(layer.router.gate.weight)
    return x + strength * u


@torch.no_grad()
def expert_shares(layer: MoeLayer, x: Tensor) -> list[float]:
    """Share of the T*K assignments each expert receives on `x`."""
    _, _, _, expert_idx_TK, _ = layer.route(x.reshape(-1, x.shape[-1]), x.shape[:-1])
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=layer.num_experts)
    return [round(float(c) / expert_idx_TK.numel(), 4) for c in counts_E]


@torch.no_grad()
def perturb_experts(model: nn.Module, scale: float = 0.01, seed: int = 1) -> None:
    """Independent noise on every routed expert's matrices: exact clones would make a model's
    output independent of its routing, and a benchmark could not tell routings apart."""
    from moeify import moe_layers

    generator = torch.Generator().manual_seed(seed)
    for _, layer in moe_layers(model):
        for weight in (layer.experts.w_in, layer.experts.w_out):
            weight.add_(scale * torch.randn(weight.shape, generator=generator))
