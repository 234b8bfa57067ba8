"""The MLP router: logits = W2 gelu(W1 x). More capacity than linear; the paper reports it is the
router most prone to selective deadlock (about a third of the layers collapse onto one expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.layers.routers.base import Router, RouterSpec, register_router


class MlpRouter(Router):
    output_layers = ("fc2",)

    def __init__(
        self, hidden_size: int, router_hidden_size: int, num_experts: int, init_std: float, device=None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.fc1 = nn.Linear(hidden_size, router_hidden_size, device=device, dtype=torch.float32)
        self.fc2 = nn.Linear(router_hidden_size, num_experts, bias=False, device=device, dtype=torch.float32)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=init_std)
        nn.init.zeros_(self.fc1.bias)

    def logits(self, x_TD: Tensor, batch_shape: torch.Size) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_TD)))


def _build(spec: RouterSpec) -> MlpRouter:
    return MlpRouter(spec.hidden_size, spec.router_hidden_size, spec.num_experts, spec.init_std, spec.device)


register_router("mlp", _build)
