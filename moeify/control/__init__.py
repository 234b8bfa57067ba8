"""Steering a converted model's routing during training: live settings and schedules
(`set_routing`, `Schedule`) and auxiliary-loss-free bias balancing (moeify.control.bias)."""

from moeify.control.bias import update_expert_bias
from moeify.control.routing import SETTINGS, RoutingControl, routing_control, set_routing
from moeify.control.schedule import Schedule

__all__ = ["SETTINGS", "RoutingControl", "Schedule", "routing_control", "set_routing", "update_expert_bias"]
