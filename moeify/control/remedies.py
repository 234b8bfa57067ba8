"""Remedies: monitors that act. Each reacts to other monitors' events of the same step and changes
the model's routing through its `RoutingControl` (moeify.set_routing), recording what it did as
events ("remedy_applied", "remedy_ended"). None is attached by default:

    runner = attach_monitors(model, ["dead_experts", "deadlock", "revive_dead_experts", "break_deadlock"])

  revive_dead_experts  on "dead" (dead_experts): raise the layer's balance weight ("balance") or
                       bias rate ("bias") for `duration` steps, then put the old value back; or
                       re-draw the dead expert's router rows ("reinit_router").
  break_deadlock       on "deadlocked" (deadlock): the same boosts, per layer.
  shared_warmup        the Functional Redundancy Hypothesis test of "Upcycling a dense video
                       diffusion transformer into a mixture of experts" (see the deadlock monitor):
                       routers are frozen until the layer's shared expert has "matured"
                       (shared_maturity), or `max_steps` steps at most.

Measured (studies/routing, CPU): see its RESULTS.md for the effect of each remedy.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from moeify.control.routing import SETTINGS, RoutingControl, routing_control
from moeify.layers.moe import MoeLayer
from moeify.monitors.base import Event, Monitor, StepStats, event, register_monitor

BOOSTS = {"balance": "balance_loss_weight", "bias": "balance_bias_rate"}


class _Boosting(Monitor):
    """Raise one routing setting of a layer for a while when a trigger event names it."""

    acts: ClassVar[bool] = True
    trigger: ClassVar[str] = ""
    actions: ClassVar[tuple[str, ...]] = tuple(BOOSTS)

    def __init__(self, action: str = "balance", value: float | None = None, duration: int = 50) -> None:
        if action not in self.actions:
            raise ValueError(f"{self.name}: action must be one of {self.actions}, got {action!r}")
        if value is None:
            value = 1e-2 if action == "bias" else 0.1
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{self.name}: value must be a positive finite number, got {value!r}")
        if not (isinstance(duration, int) and duration >= 1):
            raise ValueError(f"{self.name}: duration must be an int >= 1 (optimizer steps), got {duration!r}")
        self.action, self.value, self.duration = action, float(value), duration
        self.active: dict[str, dict[str, Any]] = {}  # layer -> {"previous": value, "until": step}
        self.applied = 0

    def attach(self, model: nn.Module, layer_names: list[str]) -> None:
        self.control: RoutingControl = routing_control(model)
        # The runner's names may carry a wrapper's prefix; the control's are the model's own.
        own = {id(layer): name for name, layer in self.control.layers}
        self.layers = {name: (own[id(module)], module) for name, module in _layers(model, layer_names)}

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        out: list[Event] = []
        for name in [n for n, boost in self.active.items() if stats.step >= boost["until"]]:
            boost = self.active.pop(name)
            self._put(name, boost["previous"])
            detail = f"{self.setting} back to {boost['previous']:g} after {self.duration} steps"
            out.append(event(stats.step, self.name, name, "remedy_ended", detail, setting=self.setting))
        for trigger in stats.events:
            name = trigger.get("layer")
            if trigger.get("kind") != self.trigger or name not in self.layers:
                continue
            out += self.act(stats.step, name, trigger)
        metrics = {name: {"active": float(name in self.active)} for name in self.layers}
        return metrics, out

    @property
    def setting(self) -> str:
        return BOOSTS.get(self.action, self.action)

    def _put(self, name: str, value: float) -> None:
        self.control.set({self.setting: value}, [self.layers[name][0]])

    def act(self, step: int, name: str, trigger: Event) -> list[Event]:
        if name in self.active:  # already boosted: the boost runs its course
            return []
        previous = SETTINGS[self.setting][0](self.layers[name][1])
        boosted = max(previous, self.value)
        self._put(name, boosted)
        self.active[name] = {"previous": previous, "until": step + self.duration}
        self.applied += 1
        detail = f"{self.trigger} at step {step}: {self.setting} {previous:g} -> {boosted:g} for {self.duration} steps"
        return [event(step, self.name, name, "remedy_applied", detail, setting=self.setting, value=boosted)]

    def summary(self) -> dict[str, Any]:
        return {"action": self.action, "value": self.value, "duration": self.duration, "applied": self.applied}

    def state_dict(self) -> dict[str, Any]:
        return {"active": {n: dict(b) for n, b in self.active.items()}, "applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = {
            str(n): {"previous": float(b["previous"]), "until": int(b["until"])} for n, b in state["active"].items()
        }
        self.applied = int(state["applied"])


class ReviveDeadExperts(_Boosting):
    name: ClassVar[str] = "revive_dead_experts"
    trigger: ClassVar[str] = "dead"
    requires: ClassVar[tuple[str, ...]] = ("dead_experts",)
    actions: ClassVar[tuple[str, ...]] = (*BOOSTS, "reinit_router")

    def act(self, step: int, name: str, trigger: Event) -> list[Event]:
        if self.action != "reinit_router":
            return super().act(step, name, trigger)
        expert = int(trigger["expert"])
        rows = reinit_router_rows(self.layers[name][1], expert)
        self.applied += 1
        detail = f"expert {expert} dead at step {step}: its router rows re-drawn ({rows} weight rows)"
        return [event(step, self.name, name, "remedy_applied", detail, expert=expert, setting="router_rows")]


class BreakDeadlock(_Boosting):
    name: ClassVar[str] = "break_deadlock"
    trigger: ClassVar[str] = "deadlocked"
    requires: ClassVar[tuple[str, ...]] = ("deadlock",)


@torch.no_grad()
def reinit_router_rows(layer: MoeLayer, expert: int) -> int:
    """Re-draw what produces `expert`'s logit: its row of every router projection onto the experts
    (linear: the gate; mlp: the output layer; cross-attention: both logit projections), from a
    normal with the std of that projection's other rows, bias 0. Returns the rows re-drawn. The
    optimizer's moments for those rows are left as they are."""
    rows = 0
    for module in layer.router.modules():
        if isinstance(module, nn.Linear) and module.out_features == layer.num_experts:
            others = torch.cat([module.weight[:expert], module.weight[expert + 1 :]])
            std = others.std().item() if others.numel() > 1 else 0.02
            module.weight[expert].normal_(0.0, std)
            if module.bias is not None:
                module.bias[expert] = 0.0
            rows += 1
    if layer.expert_bias is not None:  # and its selection bias back to the layer's mean
        layer.expert_bias[expert] = layer.expert_bias.mean()
    return rows


class SharedWarmup(Monitor):
    name: ClassVar[str] = "shared_warmup"
    acts: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("shared_maturity",)

    def __init__(self, max_steps: int = 200) -> None:
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"shared_warmup: max_steps must be an int >= 1, got {max_steps!r}")
        self.max_steps = max_steps
        self.frozen: dict[str, int] = {}  # layer -> step it was frozen at
        self.released: dict[str, int] = {}  # layer -> step its router was released

    def attach(self, model: nn.Module, layer_names: list[str]) -> None:
        self.layers = dict(_layers(model, layer_names))
        for name, layer in self.layers.items():
            if name not in self.released:
                layer.router.requires_grad_(False)
                self.frozen.setdefault(name, 0)

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        matured = {e["layer"] for e in stats.events if e.get("kind") == "matured"}
        out: list[Event] = []
        for name in list(self.frozen):
            if name in matured or stats.step >= self.max_steps:
                self.frozen.pop(name)
                self.released[name] = stats.step
                self.layers[name].router.requires_grad_(True)
                why = "its shared expert matured" if name in matured else f"max_steps={self.max_steps} reached"
                detail = f"router released at step {stats.step}: {why}"
                out.append(event(stats.step, self.name, name, "remedy_ended", detail, setting="router_frozen"))
        return {name: {"router_frozen": float(name in self.frozen)} for name in self.layers}, out

    def summary(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "released_at": dict(self.released), "still_frozen": sorted(self.frozen)}

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": dict(self.frozen), "released": dict(self.released)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = {str(k): int(v) for k, v in state["frozen"].items()}
        self.released = {str(k): int(v) for k, v in state["released"].items()}
        for name, layer in self.layers.items():
            layer.router.requires_grad_(name not in self.frozen)


def _layers(model: nn.Module, names: list[str]) -> list[tuple[str, MoeLayer]]:
    modules = dict(model.named_modules())
    return [(name, modules[name]) for name in names]


register_monitor(ReviveDeadExperts.name, ReviveDeadExperts)
register_monitor(BreakDeadlock.name, BreakDeadlock)
register_monitor(SharedWarmup.name, SharedWarmup)
