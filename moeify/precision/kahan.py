"""guard_bf16(method="kahan"): the user's torch Adam/AdamW/SGD translated to torch-optimi's
Kahan-compensated optimizer (`kahan_sum=True`), every hyperparameter passed explicitly. The
rounding error of each update is kept in a bf16 compensation buffer and added back next step;
the parameter's effective value is the weight plus its compensation."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from moeify.precision.rounding import LOW_PRECISION

OPTIMI_INSTALL = "pip install torch-optimi"


class _KahanGuard:
    """Mixed into torch-optimi's classes: its effective value is the weight plus its compensation."""

    method = "kahan"

    def protects(self, param: Tensor) -> bool:
        return param.dtype in LOW_PRECISION and any(param is p for g in self.param_groups for p in g["params"])

    def effective_value(self, param: Tensor) -> Tensor:
        comp = self.state[param].get("kahan_comp") if param in self.state else None
        if comp is None or comp.shape != param.shape:
            return param
        return param.float() + comp.float()


@functools.cache
def _kahan_class(base: type) -> type:
    return type(f"Kahan{base.__name__}", (_KahanGuard, base), {"__module__": __name__})


def _import_optimi() -> Any:
    try:
        import optimi
    except ImportError as err:
        raise ImportError(f"guard_bf16(method='kahan') uses torch-optimi's Kahan summation: {OPTIMI_INSTALL}") from err
    return optimi


def _adam_group(group: dict[str, Any], decoupled: bool) -> dict[str, Any]:
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"torch-optimi's Adam has no {flag}=True; use method='fp32_master'")
    beta1, beta2 = group["betas"]
    return {
        "lr": float(group["lr"]), "beta1": float(beta1), "beta2": float(beta2), "eps": group["eps"],
        "weight_decay": group["weight_decay"], "decouple_wd": bool(group.get("decoupled_weight_decay", decoupled)),
    }  # fmt: skip


def _sgd_group(group: dict[str, Any]) -> dict[str, Any]:
    for flag in ("nesterov", "maximize"):
        if group.get(flag):
            raise ValueError(f"torch-optimi's SGD has no {flag}=True; use method='fp32_master'")
    momentum, dampening = group["momentum"], group["dampening"]
    if dampening not in (0, momentum):
        raise ValueError(
            f"torch-optimi's SGD supports dampening 0 or = momentum, got {dampening}; use method='fp32_master'"
        )
    # optimi's dampening=True is torch's dampening = momentum (with torch's first-step init).
    damp = dampening != 0
    return {"lr": float(group["lr"]), "momentum": momentum, "weight_decay": group["weight_decay"],
            "dampening": damp, "torch_init": damp, "decouple_wd": False}  # fmt: skip


# torch optimizer -> (optimi class name, group translation). optimi's defaults differ from torch's
# (betas (0.9, 0.99), eps 1e-6, AdamW weight_decay 1e-2): every hyperparameter is passed explicitly.
_KAHAN = {
    torch.optim.AdamW: ("AdamW", lambda g: _adam_group(g, True)),
    torch.optim.Adam: ("Adam", lambda g: _adam_group(g, False)),
    torch.optim.SGD: ("SGD", _sgd_group),
}


def kahan(optimizer: Optimizer) -> Optimizer:
    """A torch-optimi optimizer with Kahan summation, on the same parameters and hyperparameters."""
    if type(optimizer) not in _KAHAN:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in _KAHAN)
        raise TypeError(
            f"guard_bf16(method='kahan') translates {supported} to torch-optimi, not {type(optimizer).__name__}; "
            "use method='fp32_master' (any optimizer class) or build an optimi optimizer with kahan_sum=True"
        )
    if optimizer.state:
        raise ValueError(
            "guard_bf16(method='kahan') must come before the first step: torch-optimi cannot take over "
            "torch's optimizer state; use method='fp32_master' to guard an optimizer that has stepped"
        )
    optimi = _import_optimi()
    name, translate = _KAHAN[type(optimizer)]
    known = set(optimizer.defaults)
    groups = [
        {**{k: v for k, v in g.items() if k not in known}, **translate(g), "kahan_sum": True}
        for g in optimizer.param_groups
    ]
    return _kahan_class(getattr(optimi, name))(groups, lr=groups[0]["lr"], kahan_sum=True)


__all__ = ["kahan"]
