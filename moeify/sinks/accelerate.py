"""accelerate sink: every record as scalars through `accelerator.log` (TensorBoard, W&B, trackio…,
whatever trackers the Accelerator was given). accelerate logs on the main process only."""

from __future__ import annotations

from typing import Any


def flatten(record: dict[str, Any], prefix: str = "moeify") -> dict[str, float]:
    """{"moeify/<monitor>/<layer>/<metric>": value} for every finite number of a record."""
    values: dict[str, float] = {}
    for monitor, layers in record.get("monitors", {}).items():
        for layer, metrics in layers.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                    values[f"{prefix}/{monitor}/{layer}/{metric}"] = float(value)
    values[f"{prefix}/events"] = float(len(record.get("events", [])))
    return values


class AccelerateSink:
    def __init__(self, accelerator: Any, prefix: str = "moeify") -> None:
        if not hasattr(accelerator, "log"):
            raise TypeError(f"AccelerateSink needs an accelerate.Accelerator, got {type(accelerator).__name__}")
        self.accelerator, self.prefix = accelerator, prefix

    def write(self, record: dict[str, Any]) -> None:
        self.accelerator.log(flatten(record, self.prefix), step=record["step"])

    def close(self, summary: dict[str, Any]) -> None:
        pass
