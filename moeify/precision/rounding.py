"""The grids of the low-precision float formats, and unbiased stochastic rounding to bf16.

A normal number x of a format with p mantissa bits has the spacing (gap to the next number away
from zero) 2^(floor(log2|x|) - p): bf16 keeps p = 7 explicit bits (8 significant), fp16 p = 10.
Below the smallest normal exponent the spacing stays 2^(e_min - p) (subnormals, zero). Directly
below a power of two the gap toward zero is half as large.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-style binary format stored in 16 bits: sign | exponent | mantissa."""

    name: str
    mantissa_bits: int
    exponent_bits: int

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def min_exp(self) -> int:
        """floor(log2) of the smallest normal number (the subnormals share its spacing)."""
        return 1 - self.bias

    def exponent(self, field: int) -> int:
        """floor(log2|x|) for an exponent field (subnormals and zero count as min_exp)."""
        return max(field - self.bias, self.min_exp)

    def fields(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The exponent and mantissa fields of every element, as int32."""
        bits = x.detach().view(torch.int16).to(torch.int32) & 0xFFFF
        field = (bits >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
        return field, bits & ((1 << self.mantissa_bits) - 1)


FORMATS = {torch.bfloat16: FloatFormat("bf16", 7, 8), torch.float16: FloatFormat("fp16", 10, 5)}
LOW_PRECISION = tuple(FORMATS)


def spacing(x: Tensor) -> Tensor:
    """The gap from each element of a bf16/fp16 tensor to the next number away from zero (fp64)."""
    if x.dtype not in FORMATS:
        raise TypeError(f"spacing() reads bf16 or fp16 tensors, got {x.dtype}")
    fmt = FORMATS[x.dtype]
    field, _ = fmt.fields(x)
    exponent = (field - fmt.bias).clamp_min(fmt.min_exp) - fmt.mantissa_bits
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent)


def stochastic_round_to_bf16(x_fp32: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round fp32 to bf16 up or down with the probabilities that make it unbiased: E[SR(x)] = x.

    bf16 is the top 16 bits of fp32. Adding a uniform 16-bit integer to the fp32 bit pattern
    carries into the bf16 part with probability (low bits) / 2^16 = (x - down) / spacing, and
    truncating the low bits keeps the result; the sign bit makes this symmetric for negative x.
    inf and NaN pass through round-to-nearest.
    """
    if x_fp32.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 reads fp32 tensors, got {x_fp32.dtype}")
    bits_int32 = x_fp32.view(torch.int32)
    noise_int32 = torch.randint(0, 1 << 16, x_fp32.shape, dtype=torch.int32, device=x_fp32.device, generator=generator)
    # -65536 is 0xFFFF0000: keep the bf16 half of the pattern. The result is exact in bf16.
    rounded = ((bits_int32 + noise_int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x_fp32), rounded, x_fp32.to(torch.bfloat16))
