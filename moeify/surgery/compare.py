"""How close two outputs are: the measure of every identity check (layer, model, discovery)."""

from __future__ import annotations

import torch
from torch import Tensor


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| relative to the output scale max |ref|, over the finite values. Where both
    hold the same NaN or infinity (a tiny random model normalising a zero vector) they agree; a
    non-finite value in one only is an infinite error."""
    out, ref = out.detach().float(), ref.detach().float()
    agree = (out.isnan() & ref.isnan()) | (out.isinf() & (out == ref))
    out, ref = out.masked_fill(agree, 0.0), ref.masked_fill(agree, 0.0)
    if not (out.isfinite().all() and ref.isfinite().all()):
        return float("inf")
    if out.numel() == 0:
        return 0.0
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def tolerance_for(dtype: torch.dtype, tolerance: float) -> float:
    """Reduced-precision weights cannot match to 1e-5: allow a few units of their rounding."""
    return max(tolerance, 8 * torch.finfo(dtype).eps) if dtype in (torch.float16, torch.bfloat16) else tolerance
