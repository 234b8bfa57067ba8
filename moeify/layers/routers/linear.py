"""The linear router: logits = W x (the Switch/Mixtral gate)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeify.layers.routers.base import Router, register_router


class LinearRouter(Router):
    output_layers = ("gate",)

    def __init__(self, hidden_size: int, num_experts: int, init_std: float, device=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(self.gate.weight, std=init_std)

    def logits(self, x_TD: Tensor, batch_shape: torch.Size) -> Tensor:
        return self.gate(x_TD)


register_router("linear", lambda s: LinearRouter(s.hidden_size, s.num_experts, s.init_std, s.device))
