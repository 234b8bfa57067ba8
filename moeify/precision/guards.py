"""`guard_bf16(model, optimizer, method)`: train weights stored in bf16 without losing their updates.

A weight stored in bf16 keeps 8 significant bits, so an Adam step (≈ lr) smaller than half its
spacing rounds away: at lr 1e-5 every update of a weight with |w| ≈ 0.02 is lost and upcycled
experts never leave their clones (measured: 0% progress over 200 AdamW steps). Three remedies; each
returns a new optimizer that the user must step from now on (the original refuses to step again):

  "fp32_master"          fp32 master copies of the guarded parameters; forward/backward stay
                         bf16. The user's optimizer class is rebuilt on the masters with the same
                         param-group hyperparameters (and any state it already has, in fp32);
                         each step copies the bf16 grads into fp32, steps, and writes the masters
                         back rounded to nearest. Memory: +4 B per guarded element for the master,
                         the optimizer state in fp32, and a transient fp32 grad during `step`.
  "kahan"                torch-optimi's Kahan-compensated Adam/AdamW/SGD (`kahan_sum=True`): the
                         rounding error of every update is kept in a bf16 compensation buffer and
                         added back next step. +2 B per bf16/fp16 element. Needs `torch-optimi`.
  "stochastic_rounding"  the user's optimizer steps fp32 work copies; each result is written back
                         to bf16 with unbiased stochastic rounding (E[new w] = w + Δ), and the
                         next step starts again from the bf16 value: the stored truth stays bf16.
                         The work copies cost 4 B per guarded element (the inner optimizer keys
                         its state by them) but carry nothing across steps; grads are copied to
                         fp32 during `step` only.

`scope="all"` guards every trainable bf16/fp16 parameter of the optimizer; `scope="moe"` only those
inside moeify MoE layers (the experts; routers are fp32 anyway) — for "fp32_master" and
"stochastic_rounding". The returned optimizers' `param_groups` hold the model's own parameters,
so `zero_grad`, gradient clipping, step hooks and LR schedulers work unchanged; `state_dict()`
holds tensors and primitives only (masters and generator states included).

Every guard satisfies `Bf16Guard`: `protects(param)` and `effective_value(param)` — the value the
optimizer keeps as the parameter's truth, read by `check_bf16` and the lost-update counter.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from moeify.layers.inventory import moe_layers
from moeify.precision.kahan import kahan
from moeify.precision.rounding import LOW_PRECISION, stochastic_round_to_bf16

METHODS = ("fp32_master", "kahan", "stochastic_rounding")
SCOPES = ("all", "moe")


@runtime_checkable
class Bf16Guard(Protocol):
    """An optimizer that keeps the updates of (some of) its low-precision parameters."""

    def protects(self, param: Tensor) -> bool:
        """Whether updates to `param` are kept despite its storage dtype."""
        ...

    def effective_value(self, param: Tensor) -> Tensor:
        """The value the optimizer keeps as `param`'s truth (fp32 where it protects it)."""
        ...


class _ShadowState(Mapping):
    """`optimizer.state` keyed by the model's parameters, read from the inner optimizer."""

    def __init__(self, owner: ShadowOptimizer) -> None:
        self._owner = owner

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        shadow = self._owner.effective_value(param)
        if shadow not in self._owner._inner.state:
            raise KeyError(param)
        return self._owner._inner.state[shadow]

    def __iter__(self) -> Iterator[Tensor]:
        inner = self._owner._inner.state
        params = (p for group in self._owner.param_groups for p in group["params"])
        return (p for p in params if inner.get(self._owner.effective_value(p)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _rebuild(optimizer: Optimizer, groups: list[dict[str, Any]]) -> Optimizer:
    """`type(optimizer)(groups, **defaults)`, passing only the defaults its constructor takes."""
    cls = type(optimizer)
    signature = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    kwargs = {k: v for k, v in optimizer.defaults.items() if k != "params" and (takes_any or k in signature)}
    return cls(groups, **kwargs)


class ShadowOptimizer(Optimizer):
    """Steps a rebuilt copy of the user's optimizer on fp32 shadows of the guarded parameters;
    subclasses say how a shadow is written back (`_write_back`) and what it saves."""

    method: ClassVar[str] = ""
    extra_key: ClassVar[str] = ""  # what `state_dict()` adds beyond torch's "state" and "param_groups"

    def __init__(self, optimizer: Optimizer, guarded: Callable[[Tensor], bool]) -> None:
        self._guarded = guarded
        self._shadows: dict[Tensor, Tensor] = {}  # model parameter -> fp32 shadow
        self._inner: Optimizer | None = None
        groups = [{**group, "params": list(group["params"])} for group in optimizer.param_groups]
        super().__init__(groups, dict(optimizer.defaults))  # add_param_group makes the shadows
        self._inner = _rebuild(optimizer, [self._shadow_group(g) for g in self.param_groups])
        if optimizer.state:  # steps already taken: carry the state over (cast to the shadows' fp32)
            self._inner.load_state_dict(optimizer.state_dict())
        self.state = _ShadowState(self)

    def _shadow_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**group, "params": [self._shadows.get(p, p) for p in group["params"]]}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group["params"]:
            if param not in self._shadows and self._guarded(param):
                self._shadows[param] = param.detach().to(torch.float32, copy=True)
        if self._inner is not None:
            self._inner.add_param_group(self._shadow_group(group))

    def protects(self, param: Tensor) -> bool:
        return param in self._shadows

    def effective_value(self, param: Tensor) -> Tensor:
        return self._shadows.get(param, param)

    def _sync_hyperparameters(self) -> None:
        # LR schedulers and users edit self.param_groups; the inner optimizer reads its own.
        for group, inner in zip(self.param_groups, self._inner.param_groups):
            inner.update({k: v for k, v in group.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        stepped = []
        for param, shadow in self._shadows.items():
            if param.grad is not None:
                shadow.grad = param.grad.to(torch.float32)  # transient fp32 grad
                stepped.append((param, shadow))
        self._inner.step()
        for param, shadow in stepped:
            self._write_back(param, shadow)
            shadow.grad = None
        return loss

    def _write_back(self, param: Tensor, shadow: Tensor) -> None:
        raise NotImplementedError

    def _params(self) -> list[Tensor]:
        """The parameters in `state_dict()`'s index order (torch's packing order)."""
        seen: dict[int, Tensor] = {}
        for param in (p for group in self.param_groups for p in group["params"]):
            seen.setdefault(id(param), param)
        return list(seen.values())

    def state_dict(self) -> dict[str, Any]:
        self._sync_hyperparameters()
        return {**super().state_dict(), self.extra_key: self._extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(self.extra_key, None)  # absent in a plain optimizer's state dict
        self._inner.load_state_dict(state_dict)  # casts the state to the shadows' fp32
        for group, inner in zip(self.param_groups, self._inner.param_groups):
            group.update({k: v for k, v in inner.items() if k != "params"})
        if extra is not None:
            self._load_extra_state(extra)

    def _extra_state(self) -> dict[Any, Tensor]:
        raise NotImplementedError

    def _load_extra_state(self, extra: dict[Any, Tensor]) -> None:
        raise NotImplementedError


class MasterWeights(ShadowOptimizer):
    """fp32 master weights: the masters are the truth; the bf16 parameters are their rounding."""

    method = "fp32_master"
    extra_key = "fp32_masters"  # {parameter index: fp32 master}

    def _write_back(self, param: Tensor, shadow: Tensor) -> None:
        param.copy_(shadow)  # round to nearest

    def _extra_state(self) -> dict[Any, Tensor]:
        return {i: self._shadows[p] for i, p in enumerate(self._params()) if p in self._shadows}

    @torch.no_grad()
    def _load_extra_state(self, extra: dict[Any, Tensor]) -> None:
        params = self._params()
        for i, master in extra.items():
            param = params[int(i)]
            if param not in self._shadows:
                raise ValueError(
                    f"the state dict has an fp32 master for parameter {i}, which this optimizer does not guard"
                )
            self._shadows[param].copy_(master)
            param.copy_(self._shadows[param])


class StochasticRounding(ShadowOptimizer):
    """bf16 truth, fp32 work copies, unbiased stochastic rounding of each step's result."""

    method = "stochastic_rounding"
    extra_key = "sr_generators"  # {device: generator state}

    def __init__(self, optimizer: Optimizer, guarded: Callable[[Tensor], bool], seed: int | None = None) -> None:
        self._seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
        self._generators: dict[str, torch.Generator] = {}
        super().__init__(optimizer, guarded)
        # Registered first, so it runs before any user's pre-hook: every step starts from the
        # bf16 value. Until then the work copy holds the last step's unrounded result, which is
        # what `effective_value` reports to the lost-update counter's post-hook.
        self.register_step_pre_hook(lambda *_: self._restart_from_bf16())

    @torch.no_grad()
    def _restart_from_bf16(self) -> None:
        for param, work in self._shadows.items():
            work.copy_(param)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def _write_back(self, param: Tensor, shadow: Tensor) -> None:
        if isinstance(param, DTensor):  # a sharded expert (moeify.distributed): each rank rounds its own shard
            param, shadow = param.to_local(), shadow.to_local()
        param.copy_(stochastic_round_to_bf16(shadow, self._generator(shadow.device)))

    def _extra_state(self) -> dict[Any, Tensor]:
        return {device: g.get_state() for device, g in self._generators.items()}

    def _load_extra_state(self, extra: dict[Any, Tensor]) -> None:
        for device, state in extra.items():
            self._generator(torch.device(device)).set_state(state)


# ------------------------------------------------------------------ the verb


def _guarded_filter(model: nn.Module, optimizer: Optimizer, scope: str, method: str) -> Callable[[Tensor], bool]:
    model_ids = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in model_ids)
    if foreign:
        raise ValueError(f"the optimizer holds {foreign} tensors that are not parameters of the model")
    dtypes = (torch.bfloat16,) if method == "stochastic_rounding" else LOW_PRECISION
    if method == "stochastic_rounding" and any(
        p.dtype == torch.float16 for g in optimizer.param_groups for p in g["params"]
    ):
        raise ValueError("stochastic_rounding rounds to bf16; for fp16 parameters use method='fp32_master'")
    if scope == "all":
        return lambda p: p.requires_grad and p.dtype in dtypes
    moe_ids = {id(p) for _, layer in moe_layers(model) for p in layer.parameters()}
    if not moe_ids:
        raise ValueError(
            f"scope='moe' guards MoE layers and {type(model).__name__} has none: moeify it, or scope='all'"
        )
    return lambda p: p.requires_grad and p.dtype in dtypes and id(p) in moe_ids


def _retire(optimizer: Optimizer) -> None:
    def refuse(*_: Any) -> None:
        raise RuntimeError("this optimizer was replaced by moeify.guard_bf16(...): step the optimizer it returned")

    optimizer.register_step_pre_hook(refuse)


def guard_bf16(
    model: nn.Module,
    optimizer: Optimizer,
    method: str = "fp32_master",
    *,
    scope: str = "all",
    seed: int | None = None,
) -> Optimizer:
    """Return an optimizer that keeps the updates of the model's bf16/fp16 weights (module docstring).

    Use the returned optimizer (and create LR schedulers on it); the original refuses to step.
    `seed` seeds stochastic rounding (default: drawn from torch's global generator).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"guard_bf16 wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, Bf16Guard):
        raise ValueError(f"this optimizer is already guarded ({type(optimizer).__name__})")
    if method == "kahan" and scope != "all":
        raise ValueError("method='kahan' compensates every bf16/fp16 parameter of the optimizer: use scope='all'")
    guarded = _guarded_filter(model, optimizer, scope, method)
    covered = [p for g in optimizer.param_groups for p in g["params"] if guarded(p)]
    if method == "kahan":
        covered = [p for g in optimizer.param_groups for p in g["params"] if p.dtype in LOW_PRECISION]
    if not covered:
        warnings.warn(
            f"guard_bf16: nothing to guard, no trainable bf16/fp16 parameter in scope={scope!r} (an fp32 model "
            "loses no update to rounding); the optimizer is returned unchanged and stays usable",
            stacklevel=2,
        )
        return optimizer
    if method == "kahan":
        new = kahan(optimizer)
    elif method == "fp32_master":
        new = MasterWeights(optimizer, guarded)
    else:
        new = StochasticRounding(optimizer, guarded, seed)
    _retire(optimizer)
    return new
