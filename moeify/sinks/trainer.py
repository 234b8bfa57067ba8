"""transformers `Trainer` glue: a callback that steps a monitor runner once per optimizer step and
puts a few routing scalars into the Trainer's logs (so every `report_to` backend gets them)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from moeify.monitors.runner import MonitorRunner


class MoeifyCallback(TrainerCallback):
    """Steps a monitor runner from a `Trainer`: `on_step_end` runs after each optimizer step
    (gradient accumulation included), so the runner reads once per step.

    Use `MoeifyCallback(runner).install(trainer)`: it puts the callback first, so the `report_to`
    callbacks (TensorBoard, W&B, ...) see the routing scalars it adds to each log. Passed as
    `Trainer(callbacks=[...])` it runs after them (Trainer's order) and only `log_history` and
    the console get the scalars.
    """

    def __init__(self, runner: MonitorRunner) -> None:
        self.runner = runner
        self._last: dict[str, Any] | None = None

    def install(self, trainer: Any) -> MoeifyCallback:
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001,ANN201,ANN003
        record = self.runner.step()
        if record is not None:
            self._last = record
        return control

    def scalars(self) -> dict[str, float]:
        values: dict[str, float] = {"moeify/events": float(len(self.runner.events))}
        if self._last is not None:
            cvs = [m["cv"] for m in self._last["monitors"].get("expert_load", {}).values() if "cv" in m]
            if cvs:
                values["moeify/load_cv_mean"] = sum(cvs) / len(cvs)
                values["moeify/load_cv_max"] = max(cvs)
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001,ANN201,ANN003
        if logs is not None:
            values = self.scalars()
            logs.update(values)  # seen by the callbacks after this one
            if state.log_history:  # Trainer appended its copy of `logs` before calling callbacks
                state.log_history[-1].update(values)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001,ANN201,ANN003
        self.runner.close()
        return control
