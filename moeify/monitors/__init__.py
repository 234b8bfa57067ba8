"""Routing monitors: `attach_monitors(model)` → a runner stepped once per optimizer step.
Importing this package registers the built-in monitors."""

from moeify.monitors import load  # noqa: F401 - registration
from moeify.monitors.base import LayerStats, Monitor, StepStats, event, monitor_names, register_monitor
from moeify.monitors.runner import MonitorRunner, Sink, attach_monitors, gather

__all__ = [
    "LayerStats",
    "Monitor",
    "MonitorRunner",
    "Sink",
    "StepStats",
    "attach_monitors",
    "event",
    "gather",
    "monitor_names",
    "register_monitor",
]
