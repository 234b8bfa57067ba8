"""`moeify.set_routing(model, ...)`: change a converted model's routing settings live, or put them on
a schedule per optimizer step, and move the expert bias after every step.

The settings are those of `MoeifyConfig` that training may change (`SETTINGS`). Each MoE layer
holds its own values; a call sets them on every layer or on the `layers` named. What a model's
routing is doing over training lives in one `RoutingControl` (`model.moeify_state.routing`): the
optimizer steps counted, the schedules, and the bias updates. `moeify.save_pretrained` and the
accelerate checkpoint (`moeify.integrations.accelerate.register_state`) carry its state.

    control = moeify.set_routing(model, optimizer=optimizer, balance_bias_rate=1e-3,
                                 balance_loss_weight=moeify.Schedule.linear(0.01, 0.0, steps=2000))
    ...
    moeify.set_routing(model, balance_loss_weight=0.1)   # from now on, on every layer
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from moeify.control.bias import update_expert_bias
from moeify.control.schedule import Schedule
from moeify.layers.inventory import moe_layers, unwrap
from moeify.layers.moe import MoeLayer

STATE_FORMAT = 1


def _loss_weight(key: str) -> tuple[Callable[[MoeLayer], float], Callable[[MoeLayer, float], None]]:
    def get(layer: MoeLayer) -> float:
        return layer.loss_weights[key]

    def put(layer: MoeLayer, value: float) -> None:
        layer.loss_weights[key] = value

    return get, put


def _set_temperature(layer: MoeLayer, value: float) -> None:
    layer.temperature = value


def _set_bias_rate(layer: MoeLayer, value: float) -> None:
    if value > 0:
        layer.enable_bias()
    layer.balance_bias_rate = value


# setting -> (read, write, smallest allowed value, whether the bound is strict)
SETTINGS: dict[str, tuple[Callable[[MoeLayer], float], Callable[[MoeLayer, float], None], float, bool]] = {
    "balance_loss_weight": (*_loss_weight("balance"), 0.0, False),
    "z_loss_weight": (*_loss_weight("z_loss"), 0.0, False),
    "entropy_loss_weight": (*_loss_weight("entropy"), 0.0, False),
    "router_temperature": (lambda layer: layer.temperature, _set_temperature, 0.0, True),
    "balance_bias_rate": (lambda layer: layer.balance_bias_rate, _set_bias_rate, 0.0, False),
}


def _check_value(name: str, value: Any) -> float | Schedule:
    if name not in SETTINGS:
        raise ValueError(f"set_routing: unknown setting {name!r}; the settings are {sorted(SETTINGS)}")
    values = value.values() if isinstance(value, Schedule) else (value,)
    low, strict = SETTINGS[name][2:]
    for v in values:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not number or v < low or (strict and v == low):
            bound = f"> {low}" if strict else f">= {low}"
            raise ValueError(
                f"set_routing: {name} must be a finite number {bound} or a moeify.Schedule of them, got {value!r}"
            )
    return value if isinstance(value, Schedule) else float(value)


class RoutingControl:
    """The routing settings of one converted model over training. Made by `set_routing`; `step()`
    runs after each optimizer step (hooked by `set_routing(..., optimizer=...)`): it moves the
    expert biases (moeify.control.bias), counts the step and applies the schedules' values."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self.steps = 0
        self.schedules: dict[str, dict[str, Schedule]] = {}  # layer name -> setting -> schedule
        self._hooked: dict[int, Any] = {}  # id(optimizer) -> hook handle

    def set(self, settings: dict[str, float | Schedule], names: Iterable[str] | None = None) -> None:
        """Give the named layers (all by default) these values or schedules; checked first."""
        checked = {name: _check_value(name, value) for name, value in settings.items()}
        targets = self._targets(names)
        for name, layer in targets:
            for setting, value in checked.items():
                scheduled = self.schedules.setdefault(name, {})
                if isinstance(value, Schedule):
                    scheduled[setting] = value
                    value = value(self.steps)
                else:
                    scheduled.pop(setting, None)  # a value replaces a schedule
                SETTINGS[setting][1](layer, value)
            if not self.schedules.get(name):
                self.schedules.pop(name, None)
            layer.expects_steps = layer.balance_bias_rate > 0 or name in self.schedules

    def _targets(self, names: Iterable[str] | None) -> list[tuple[str, MoeLayer]]:
        if names is None:
            return self.layers
        if isinstance(names, str):
            names = [names]
        wanted, known = list(names), dict(self.layers)
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted:
            raise ValueError(
                f"set_routing: layers {unknown or wanted} are not MoE layers of this model; they are {sorted(known)}"
            )
        return [(name, known[name]) for name in wanted]

    def hook(self, optimizer: torch.optim.Optimizer) -> None:
        """Run `step()` after every `optimizer.step()` (once per optimizer, however often asked)."""
        _check_optimizer(optimizer)
        if id(optimizer) not in self._hooked:
            self._hooked[id(optimizer)] = optimizer.register_step_post_hook(_StepHook(self))

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle) is hooked to nothing: torch's optimizers do not copy their
        # hooks either. Hook the copied optimizer again with set_routing(copy, optimizer=...).
        return {**self.__dict__, "_hooked": {}}

    @property
    def hooked(self) -> bool:
        """Whether an optimizer steps this control (`hook`)."""
        return bool(self._hooked)

    def step(self) -> None:
        """One optimizer step is done: move the biases, then apply the schedules' next values."""
        layers = [layer for _, layer in self.layers]
        update_expert_bias(layers)
        self.steps += 1
        for name, layer in self.layers:
            for setting, schedule in self.schedules.get(name, {}).items():
                SETTINGS[setting][1](layer, schedule(self.steps))
            layer.forwards_since_step = 0

    def settings(self) -> dict[str, dict[str, float]]:
        """Every layer's current values: {layer name: {setting: value}}."""
        return {name: {s: SETTINGS[s][0](layer) for s in SETTINGS} for name, layer in self.layers}

    def changes(self, recipe: Any) -> dict[str, Any] | None:
        """What training changed against `recipe` (a MoeifyConfig): per layer the values that
        differ from it, the schedules, the steps counted; None when nothing differs (model card)."""
        data, base = self.state_dict(), recipe.to_dict()
        changed = {name: {s: v for s, v in per.items() if v != base[s]} for name, per in data["settings"].items()}
        changed = {name: per for name, per in changed.items() if per}
        if not changed and not data["schedules"]:
            return None
        return {"steps": data["steps"], "changed": changed, "schedules": data["schedules"]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: steps, every layer's values, the schedules, the layers that have a
        bias. (The biases themselves are buffers: they travel with the weights.)"""
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "settings": self.settings(),
            "biased": [name for name, layer in self.layers if layer.expert_bias is not None],
            "schedules": {n: {s: sch.to_dict() for s, sch in per.items()} for n, per in self.schedules.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back `state_dict()`, checked whole before anything changes."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a moeify routing state (format {STATE_FORMAT}): {state!r:.200}")
        names = [name for name, _ in self.layers]
        if (
            sorted(state["settings"]) != sorted(names)
            or set(state["schedules"]) - set(names)
            or set(state["biased"]) - set(names)
        ):
            raise ValueError(
                f"the saved routing state is for the MoE layers {sorted(state['settings'])}, this model has "
                f"{sorted(names)}: load it into the model it was saved from"
            )
        values = {n: {s: _check_value(s, v) for s, v in per.items()} for n, per in state["settings"].items()}
        schedules = {
            n: {s: _check_value(s, Schedule.from_dict(d)) for s, d in per.items()}
            for n, per in state["schedules"].items()
        }
        self.steps, self.schedules = int(state["steps"]), {}
        for name, layer in self.layers:
            if name in state["biased"]:  # a bias stays once made, even at rate 0 (it still routes)
                layer.enable_bias()
        for name, per in values.items():
            self.set(per, [name])
        for name, per in schedules.items():
            self.set(per, [name])


def _check_optimizer(optimizer: Any) -> None:
    if not callable(getattr(optimizer, "register_step_post_hook", None)):
        raise TypeError(f"set_routing: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


class _StepHook:
    """The optimizer's post-step hook (an object: picklable, unlike a lambda)."""

    def __init__(self, control: RoutingControl) -> None:
        self.control = control

    def __call__(self, *_: Any) -> None:
        self.control.step()


def routing_control(model: nn.Module) -> RoutingControl:
    """The model's `RoutingControl`, made on first use (for the model itself, not a wrapper of it:
    DDP, torch.compile and peft wrappers are looked through, so layer names match a saved model)."""
    if isinstance(model, nn.Module):
        model = unwrap(model)
        if callable(getattr(model, "get_base_model", None)):  # a peft model
            model = model.get_base_model()
    state = getattr(model, "moeify_state", None)
    if not isinstance(model, nn.Module) or state is None or not moe_layers(model):
        raise ValueError(
            f"set_routing needs a model converted by moeify, got {type(model).__name__}: call moeify(model) first"
        )
    if getattr(state, "routing", None) is None:
        state.routing = RoutingControl(model)
    return state.routing


def set_routing(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    layers: Iterable[str] | None = None,
    **settings: float | Schedule,
) -> RoutingControl:
    """Change routing settings of a converted model now, or put them on a schedule.

    Args:
        model: a model converted by moeify.
        optimizer: hook it, so that after each of its steps the expert biases move and the
            schedules advance (once per optimizer; `prepare` of moeify's accelerate integration
            and `MoeifyCallback` do it for you).
        layers: module names of the MoE layers to change (`moeify.moe_layers(model)`); all by default.
        **settings: any of `balance_loss_weight`, `z_loss_weight`, `entropy_loss_weight`,
            `router_temperature`, `balance_bias_rate` (meanings as in `MoeifyConfig`), each a
            number (from now on) or a `moeify.Schedule` (a value per optimizer step).

    Every value is checked before any layer changes. Returns the model's `RoutingControl`
    (`.settings()` reads the values, `.step()` steps it by hand)."""
    control = routing_control(model)
    if optimizer is not None:
        _check_optimizer(optimizer)  # before `set` changes anything
    control.set(settings, layers)  # checks every value and layer first
    if optimizer is not None:
        control.hook(optimizer)
    return control
