"""What every router is: fp32 parameters and math, `forward(x_TD, batch_shape) -> logits_TE`.

Routers are registered by kind (`register_router`), so a new kind is one file and one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeify.registry import Registry


class Fp32Module(nn.Module):
    """Keeps its floating-point parameters and buffers in fp32 across `.to(dtype)`, `.half()`,
    `.bfloat16()`: router logits decide discrete routes, and a bf16 router loses its tiny updates
    and flips routes on rounding (ST-MoE's "selective precision")."""

    def _apply(self, fn, recurse=True):  # torch's own signature
        def keep_fp32(t: Tensor) -> Tensor:
            out = fn(t)
            if not out.is_floating_point() or out.dtype == torch.float32:
                return out
            # `fn` cast to a lower precision: take only its move, from the exact original values
            # (`out.float()` would keep bf16-rounded router weights; test_routers_stay_fp32_when_the_model_is_cast).
            return t.to(device=out.device, dtype=torch.float32)

        return super()._apply(keep_fp32, recurse)


class Router(Fp32Module):
    """Base class: subclasses implement `logits(x_TD, batch_shape)` on fp32 inputs."""

    num_experts: int
    # The attributes naming the nn.Linear layers whose output rows are the experts' logits (summed
    # when several): what fine-grained experts tie in groups (moeify.recipes.granularity).
    output_layers: tuple[str, ...] = ()

    def forward(self, x_TD: Tensor, batch_shape: torch.Size) -> Tensor:
        # Routing math in fp32 whatever the autocast state: autocast would run the projections in
        # bf16. (Entering the context only when autocast is on: it costs ~30 us per call, 10% of a
        # decode step's routing.)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                return self.logits(x_TD.float(), batch_shape)
        return self.logits(x_TD.float(), batch_shape)

    def logits(self, x_TD: Tensor, batch_shape: torch.Size) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RouterSpec:
    """What a router builder is told about the site it routes."""

    hidden_size: int
    num_experts: int
    router_hidden_size: int
    num_heads: int
    init_std: float
    conditioning_dim: int | None
    device: torch.device | None = None


RouterBuilder = Callable[[RouterSpec], Router]
_ROUTERS: Registry[str, RouterBuilder] = Registry("router kind", listing="registered kinds")


def register_router(kind: str, builder: RouterBuilder) -> None:
    """Make `MoeifyConfig(router=kind)` build routers with `builder(spec)`. Duplicates are refused."""
    _ROUTERS.register(kind, builder)


def build_router(kind: str, spec: RouterSpec) -> Router:
    return _ROUTERS[kind](spec)


def router_kinds() -> tuple[str, ...]:
    return tuple(_ROUTERS.names())
