"""transformers `Trainer` glue: a callback that steps a monitor runner and the model's routing
control (expert biases, routing schedules: `moeify.set_routing`) once per optimizer step, and puts
a few routing scalars into the Trainer's logs (so every `report_to` backend gets them)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from moeify.control.routing import RoutingControl, routing_control
from moeify.monitors.runner import MonitorRunner


class MoeifyCallback(TrainerCallback):
    """Steps a monitor runner from a `Trainer`: `on_step_end` runs after each optimizer step
    (gradient accumulation included), so the runner reads once per step.

    Use `MoeifyCallback(runner).install(trainer)`: it puts the callback first, so the `report_to`
    callbacks (TensorBoard, W&B, ...) see the routing scalars it adds to each log. Passed as
    `Trainer(callbacks=[...])` it runs after them (Trainer's order) and only `log_history` and
    the console get the scalars.

    It also steps the routing control of the runner's model (or of `model`, without monitors:
    `MoeifyCallback(model=model)`), unless an optimizer was already hooked to it with
    `moeify.set_routing(model, optimizer=...)`: the Trainer builds its optimizer inside `train()`.
    """

    def __init__(self, runner: MonitorRunner | None = None, *, model: nn.Module | None = None) -> None:
        if runner is None and model is None:
            raise ValueError(
                "MoeifyCallback needs a monitor runner (attach_monitors(model)) or model=, a converted model"
            )
        self.runner = runner
        self.routing: RoutingControl = routing_control(model if model is not None else runner.model)
        self._last: dict[str, Any] | None = None

    def install(self, trainer: Any) -> MoeifyCallback:
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_step_end(self, args, state, control, **kwargs):
        if not self.routing.hooked:
            self.routing.step()
        record = self.runner.step() if self.runner is not None else None
        if record is not None:
            self._last = record
        return control

    def scalars(self) -> dict[str, float]:
        if self.runner is None:
            return {}
        values: dict[str, float] = {"moeify/events": float(len(self.runner.events))}
        if self._last is not None:
            cvs = [m["cv"] for m in self._last["monitors"].get("expert_load", {}).values() if "cv" in m]
            if cvs:
                values["moeify/load_cv_mean"] = sum(cvs) / len(cvs)
                values["moeify/load_cv_max"] = max(cvs)
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            values = self.scalars()
            logs.update(values)  # seen by the callbacks after this one
            if state.log_history:  # Trainer appended its copy of `logs` before calling callbacks
                state.log_history[-1].update(values)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.runner is not None:
            self.runner.close()
        return control
