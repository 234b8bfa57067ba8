"""`check_bf16`: predict, before training, the share of updates that weights stored in bf16 lose.

An optimizer step writes round(w + Δ) back into a bf16 (or fp16) weight, round-to-nearest-even.
The weight keeps its old value when |Δ| is below half the gap to its neighbour in the direction of
Δ; at exactly half the gap the tie goes to the even neighbour, so it stays iff its last mantissa
bit is 0 (`moeify.precision.rounding` has the grid). Adam-like optimizers move every element by
|Δ| ≈ lr (the normalised step m̂/√v̂ is ≈ ±1); the sign is unknown beforehand, so an element
counts half for each direction (the two differ only on powers of two, whose gap toward zero is
half as large). Zero and subnormals have the tiny subnormal spacing: they are not lost.
Assumptions: an Adam-like step of size lr (SGD moves by lr·|g|, usually less: its real loss is
higher), weight decay ignored (its step lr·wd·|w| is far smaller still).

The prediction is exact for |Δ| = lr: tests compare it with every finite bf16 and fp16 value, and
with a bf16 tensor trained by AdamW (test_check_bf16_predicts_what_adamw_loses: predicted 0.844 vs
observed 0.846 for N(0, 0.02) weights at lr 1e-5). Parameters stored in fp32, and parameters a guard
protects (`guard_bf16`, torch-optimi's Kahan summation), lose nothing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moeify.precision.guards import Bf16Guard
from moeify.precision.rounding import FORMATS, LOW_PRECISION, FloatFormat


def _lost(update: float, half_gap: float, even: bool) -> bool:
    return update < half_gap or (update == half_gap and even)


def lost_table(fmt: FloatFormat, update: float) -> Tensor:
    """P(lost) for |Δ| = update per element class: index = field << 2 | power_of_two << 1 | even."""
    probs = []
    for field in range(1 << fmt.exponent_bits):
        half_up = 2.0 ** (fmt.exponent(field) - fmt.mantissa_bits - 1)  # exact in Python floats
        for pow2 in (False, True):
            half_down = half_up / 2 if pow2 else half_up
            for even in (False, True):
                lost = _lost(update, half_up, even) + _lost(update, half_down, even)
                # inf / NaN (the all-ones field) are not "lost": they are broken.
                probs.append(0.0 if field == (1 << fmt.exponent_bits) - 1 else lost / 2)
    return torch.tensor(probs, dtype=torch.float64)


def _classes(x: Tensor, fmt: FloatFormat) -> Tensor:
    field, mantissa = fmt.fields(x)
    pow2 = (mantissa == 0) & (field > 1)  # at field 1 (e_min) the gap below is the subnormal one
    even = (mantissa & 1) == 0
    return (field << 2) | (pow2.to(torch.int32) << 1) | even.to(torch.int32)


def lost_probability(x: Tensor, update: float) -> Tensor:
    """Per element of a bf16/fp16 tensor: the probability (0, 0.5 or 1) that a step of size
    `update` in a random direction leaves it unchanged. fp64, same shape as `x`."""
    if x.dtype not in FORMATS:
        raise TypeError(f"lost_probability reads bf16 or fp16 tensors, got {x.dtype}")
    table = lost_table(FORMATS[x.dtype], abs(float(update))).to(x.device)
    return table[_classes(x, FORMATS[x.dtype]).long()]


def _predicted_lost(x: Tensor, update: float) -> float:
    """Expected number of lost elements: a histogram of the element classes times the table."""
    fmt = FORMATS[x.dtype]
    counts = torch.bincount(_classes(x, fmt).reshape(-1), minlength=4 << fmt.exponent_bits)
    return float((counts.double() * lost_table(fmt, abs(float(update))).to(counts.device)).sum())


@dataclass(frozen=True)
class TensorPrediction:
    name: str
    group: int  # optimizer param group (0 when a model is checked)
    dtype: str
    numel: int
    lr: float
    lost: float  # predicted fraction of its elements whose update rounds away
    protected: bool = False  # a guard keeps its updates (fp32 master, Kahan, stochastic rounding)


@dataclass(frozen=True)
class GroupPrediction:
    index: int
    lr: float
    numel: int
    low_precision_numel: int  # elements stored in bf16/fp16 and not protected by a guard
    lost: float  # element-weighted over the whole group (fp32 elements count as kept)


@dataclass(frozen=True)
class Bf16Report:
    """What `check_bf16` predicts. `lost` is element-weighted over every trainable parameter."""

    lost: float
    numel: int
    threshold: float
    groups: tuple[GroupPrediction, ...]
    tensors: tuple[TensorPrediction, ...]
    notes: tuple[str, ...] = ()  # what the prediction could not judge, or judged at another lr

    @property
    def lossy(self) -> bool:
        return self.lost > self.threshold

    def worst(self, n: int = 5) -> list[TensorPrediction]:
        """The n tensors with the most predicted lost elements."""
        return sorted(self.tensors, key=lambda t: t.lost * t.numel, reverse=True)[:n]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"bf16 preflight: {self.lost:.1%} of {self.numel:,} trainable elements would lose their updates"]
        lines += [f"  group {g.index} (lr {g.lr:g}): {g.lost:.1%} of {g.numel:,}" for g in self.groups]
        lines += [f"  {t.name} [{t.dtype}, {t.numel:,}, lr {t.lr:g}]: {t.lost:.1%}" for t in self.worst() if t.lost]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _predict(name: str, group: int, param: Tensor, lr: float, protected: bool) -> TensorPrediction:
    lossy = param.dtype in LOW_PRECISION and not protected and param.numel() > 0
    lost = _predicted_lost(param, lr) / param.numel() if lossy else 0.0
    dtype = str(param.dtype).removeprefix("torch.")
    return TensorPrediction(name, group, dtype, param.numel(), lr, lost, protected)


def _kahan_group(group: dict[str, Any]) -> bool:
    # torch-optimi groups compensate bf16/fp16 parameters unless kahan_sum is False (None = auto).
    return "kahan_sum" in group and group["kahan_sum"] is not False


def _group_lr(g: int, group: dict[str, Any], notes: list[str]) -> float | None:
    """The lr a group is judged at: its own; during warm-up (lr 0) the scheduler's peak
    (`initial_lr`), said in a note; None (with a note) when there is nothing to judge at."""
    group_lr = float(group["lr"])
    if group_lr > 0:
        return group_lr
    peak = group.get("initial_lr")
    if isinstance(peak, (int, float)) and peak > 0 and math.isfinite(peak):
        notes.append(f"group {g} is at lr 0 (warm-up?): judged at its scheduler's peak lr {peak:g} (initial_lr)")
        return float(peak)
    notes.append(f"group {g} is at lr 0 and has no scheduler peak (initial_lr): not judged; pass lr=<its peak>")
    return None


def _from_optimizer(
    optimizer: torch.optim.Optimizer, lr: float | None, model: nn.Module | None, notes: list[str]
) -> list[TensorPrediction]:
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    guard = optimizer if isinstance(optimizer, Bf16Guard) else None
    out = []
    for g, group in enumerate(optimizer.param_groups):
        group_lr = _group_lr(g, group, notes) if lr is None else lr
        if group_lr is None:
            continue
        group_names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            name = names.get(id(p)) or (group_names[i] if group_names else f"group{g}.param{i}")
            protected = (guard is not None and guard.protects(p)) or _kahan_group(group)
            out.append(_predict(name, g, p, group_lr, protected))
    return out


def check_bf16(
    model_or_optimizer: nn.Module | torch.optim.Optimizer,
    lr: float | None = None,
    *,
    threshold: float = 0.5,
    model: nn.Module | None = None,
    warn: bool = True,
    strict: bool = False,
) -> Bf16Report:
    """Predict the fraction of updates that weights stored in bf16/fp16 will lose (module docstring).

    Args:
        model_or_optimizer: a model (its trainable parameters, one group at `lr`) or an optimizer
            (its param groups, each at its own `lr` unless `lr` is given).
        lr: the learning rate; required for a model.
        threshold: the `lost` fraction above which the report is `lossy` (see `warn_if_lossy`).
        model: names the optimizer's parameters in the report.
        warn: warn when the predicted lost fraction is above `threshold`.
        strict: raise ValueError (with the numbers and the remedy) instead of warning.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < math.inf):
        raise ValueError(
            f"lr must be a positive finite number, got {lr!r}: at lr 0 no update is made, so none can be lost (pass "
            "the peak lr of your schedule)"
        )
    notes: list[str] = []
    if isinstance(model_or_optimizer, torch.optim.Optimizer):
        tensors = _from_optimizer(model_or_optimizer, lr, model, notes)
    elif isinstance(model_or_optimizer, nn.Module):
        if lr is None:
            raise ValueError(
                "check_bf16(model) needs the learning rate: check_bf16(model, lr=...), or pass the optimizer"
            )
        params = [(n, p) for n, p in model_or_optimizer.named_parameters() if p.requires_grad]
        tensors = [_predict(n, 0, p, float(lr), False) for n, p in params]
    else:
        raise TypeError(
            f"check_bf16 reads an nn.Module or a torch.optim.Optimizer, got {type(model_or_optimizer).__name__}"
        )
    groups = []
    for g in sorted({t.group for t in tensors}):
        members = [t for t in tensors if t.group == g]
        numel = sum(t.numel for t in members)
        low = sum(t.numel for t in members if t.dtype in ("bfloat16", "float16") and not t.protected)
        lost = sum(t.lost * t.numel for t in members) / numel if numel else 0.0
        groups.append(GroupPrediction(g, members[0].lr, numel, low, lost))
    numel = sum(t.numel for t in tensors)
    lost = sum(t.lost * t.numel for t in tensors) / numel if numel else 0.0
    report = Bf16Report(lost, numel, threshold, tuple(groups), tuple(tensors), tuple(notes))
    if warn or strict:
        warn_if_lossy(report, strict=strict)
    return report


def warn_if_lossy(report: Bf16Report, threshold: float | None = None, strict: bool = False) -> bool:
    """Warn (or, `strict`, raise ValueError) when the predicted lost fraction exceeds `threshold`
    (default: the report's). Returns whether it does."""
    threshold = report.threshold if threshold is None else threshold
    if report.lost <= threshold:
        return False
    worst = "; ".join(f"{t.name} {t.lost:.0%} (lr {t.lr:g})" for t in report.worst(3) if t.lost)
    message = (
        f"{report.lost:.1%} of the {report.numel:,} trainable elements would lose every update (threshold "
        f"{threshold:.0%}): weights stored in bf16 keep 8 significant bits, so an update below half their "
        f"spacing rounds away (worst: {worst}). Remedy: optimizer = moeify.guard_bf16(model, optimizer) "
        "(fp32 master weights; or method='kahan' / 'stochastic_rounding'), or keep the weights in fp32 "
        "and use autocast."
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=2)
    return True
