"""Steering a converted model's routing during training: live settings and schedules
(`set_routing`, `Schedule`), auxiliary-loss-free bias balancing (moeify.control.bias), and
remedies that act on monitor events (moeify.control.remedies; importing registers them)."""

from moeify.control.bias import update_expert_bias
from moeify.control.remedies import BreakDeadlock, ReviveDeadExperts, SharedWarmup, reinit_router_rows
from moeify.control.routing import SETTINGS, RoutingControl, routing_control, set_routing
from moeify.control.schedule import Schedule

__all__ = [
    "SETTINGS",
    "BreakDeadlock",
    "ReviveDeadExperts",
    "RoutingControl",
    "Schedule",
    "SharedWarmup",
    "reinit_router_rows",
    "routing_control",
    "set_routing",
    "update_expert_bias",
]
