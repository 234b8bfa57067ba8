"""`LostUpdateCounter`: how many of the updates an optimizer meant to make were actually kept.

Attached to an optimizer through step pre/post hooks, it samples up to `sample_size` elements of
every trainable parameter (fixed indices, drawn with replacement from a seeded generator).

Definitions, per sampled element and optimizer step:
  intended  the element's grad is present and nonzero, or the group has weight decay and the
            element is nonzero. (An element with a zero grad that still moves by Adam's momentum
            is not counted.)
  lost      intended, and its *effective value* is bit-identical before and after the step.
The effective value is what the optimizer keeps as the truth: the parameter itself for a plain
optimizer; for a `Bf16Guard` its `effective_value(param)` — the fp32 master ("fp32_master"), the
weight plus torch-optimi's `kahan_comp` ("kahan"), the fp32 work value before it is rounded
("stochastic_rounding", which rounds without bias, so nothing is lost on average).

Cost: per step, two gathers of `sample_size` elements per parameter and a few reductions on the
device; the counts accumulate in one [params, 2] int64 device tensor that `read()` copies to the
host once (the monitor does it once per step). No host sync in the hooks. With `step(closure)`
the grads are made inside the step, after the pre-hook: the counter then sees the previous ones.
Param groups added after the counter was built are not tracked. Counts are per process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from moeify.precision.guards import Bf16Guard


@dataclass(frozen=True)
class _Tracked:
    name: str
    group: int
    param: Tensor
    index: Tensor  # [m] flat element indices on the parameter's device


@dataclass(frozen=True)
class LostUpdateReading:
    """Counts since the last read: per tracked parameter (intended, lost), with its name and group."""

    steps: int
    names: tuple[str, ...]
    groups: tuple[int, ...]
    counts: tuple[tuple[int, int], ...]

    @property
    def intended(self) -> int:
        return sum(c[0] for c in self.counts)

    @property
    def lost(self) -> int:
        return sum(c[1] for c in self.counts)

    @property
    def fraction(self) -> float:
        """Lost / intended over every tracked parameter (0 when nothing was intended)."""
        return self.fraction_where(lambda name, group: True)

    def fraction_where(self, keep: Callable[[str, int], bool]) -> float:
        """Lost / intended over the parameters for which `keep(name, group)` holds."""
        chosen = [c for c, n, g in zip(self.counts, self.names, self.groups) if keep(n, g)]
        intended = sum(c[0] for c in chosen)
        return sum(c[1] for c in chosen) / intended if intended else 0.0

    def by_group(self) -> dict[int, tuple[int, int, float]]:
        """group -> (intended, lost, lost fraction)."""
        out = {}
        for group in sorted(set(self.groups)):
            chosen = [c for c, g in zip(self.counts, self.groups) if g == group]
            intended, lost = sum(c[0] for c in chosen), sum(c[1] for c in chosen)
            out[group] = (intended, lost, lost / intended if intended else 0.0)
        return out


def _flat(t: Tensor) -> Tensor:
    return t.detach().reshape(-1)


class LostUpdateCounter:
    """Counts intended and lost updates of `optimizer`'s parameters (module docstring).

    Build it after `guard_bf16` and before `attach_monitors(...).attach_optimizer(...)`: its hooks
    then run after the guard's own and before the monitors read it.
    """

    def __init__(
        self, optimizer: Optimizer, *, sample_size: int = 1024, seed: int = 0, model: nn.Module | None = None
    ) -> None:
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        self.optimizer = optimizer
        self._effective: Callable[[Tensor], Tensor] = (
            optimizer.effective_value if isinstance(optimizer, Bf16Guard) else (lambda p: p)
        )
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        generator = torch.Generator().manual_seed(seed)
        self._tracked: list[_Tracked] = []
        for g, group in enumerate(optimizer.param_groups):
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if not p.requires_grad or p.numel() == 0:
                    continue
                n = p.numel()
                index = torch.arange(n) if n <= sample_size else torch.randint(n, (sample_size,), generator=generator)
                name = names.get(id(p)) or (group_names[i] if group_names else f"group{g}.param{i}")
                self._tracked.append(_Tracked(name, g, p, index.to(p.device)))
        if not self._tracked:
            raise ValueError("the optimizer has no trainable parameters to count")
        device = self._tracked[0].param.device
        self._counts = torch.zeros(len(self._tracked), 2, dtype=torch.int64, device=device)
        self._pending: list[tuple[Tensor, Tensor] | None] = []
        self.steps = 0
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._tracked)

    @torch.no_grad()
    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._pending = []
        for t in self._tracked:
            grad = t.param.grad
            if grad is None:  # not stepped: torch optimizers skip it, weight decay included
                self._pending.append(None)
                continue
            before = _flat(self._effective(t.param))[t.index]
            intended = _flat(grad)[t.index] != 0
            if optimizer.param_groups[t.group].get("weight_decay"):
                intended |= _flat(t.param)[t.index] != 0
            self._pending.append((before, intended))

    @torch.no_grad()
    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        rows = []
        zero = self._counts.new_zeros(2)
        for t, pending in zip(self._tracked, self._pending):
            if pending is None:
                rows.append(zero)
                continue
            before, intended = pending
            lost = intended & (_flat(self._effective(t.param))[t.index] == before)
            rows.append(torch.stack([intended.sum(), lost.sum()]).to(zero.device))
        self._counts += torch.stack(rows)
        self._pending = []
        self.steps += 1

    def read(self, reset: bool = True) -> LostUpdateReading:
        """The counts since the last reset: one device-to-host copy."""
        counts = tuple(tuple(row) for row in self._counts.tolist())
        reading = LostUpdateReading(self.steps, self.names, tuple(t.group for t in self._tracked), counts)
        if reset:
            self._counts.zero_()
            self.steps = 0
        return reading

    def close(self) -> None:
        """Detach from the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
