"""Routing monitors: `attach_monitors(model)` → a runner stepped once per optimizer step.
Importing this package registers the built-in monitors."""

from moeify.monitors import (  # noqa: F401 - registration
    dead,
    deadlock,
    early_warning,
    ecology,
    entropy,
    homogenization,
    load,
    lost_updates,
    maturity,
    timesteps,
)
from moeify.monitors.base import LayerStats, Monitor, StepStats, event, monitor_names, register_monitor
from moeify.monitors.dead import DeadExperts
from moeify.monitors.deadlock import Deadlock
from moeify.monitors.early_warning import ImbalanceEarlyWarning
from moeify.monitors.ecology import Ecology, ecology_number
from moeify.monitors.entropy import RouterEntropy
from moeify.monitors.homogenization import ExpertHomogenization, register_expert_weight_reader
from moeify.monitors.load import ExpertLoad
from moeify.monitors.lost_updates import LostUpdates
from moeify.monitors.maturity import SharedMaturity
from moeify.monitors.runner import MonitorRunner, Sink, attach_monitors, gather
from moeify.monitors.timesteps import TimestepRouting, TimestepStats

__all__ = [
    "DeadExperts",
    "Deadlock",
    "Ecology",
    "ExpertHomogenization",
    "ExpertLoad",
    "ImbalanceEarlyWarning",
    "LayerStats",
    "LostUpdates",
    "Monitor",
    "MonitorRunner",
    "RouterEntropy",
    "SharedMaturity",
    "Sink",
    "StepStats",
    "TimestepRouting",
    "TimestepStats",
    "attach_monitors",
    "ecology_number",
    "event",
    "gather",
    "monitor_names",
    "register_expert_weight_reader",
    "register_monitor",
]
