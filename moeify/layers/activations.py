"""Activations of FFN layouts whose activation is fused into a projection module
(diffusers `GELU`, `GEGLU`, `SwiGLU`, `ApproximateGELU`); any other activation module is
deep-copied from the FFN as it is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GELU(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SigmoidGELU(nn.Module):
    """diffusers' ApproximateGELU: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)
