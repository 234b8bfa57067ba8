"""Routers, registered by kind. Importing this package registers the built-in kinds."""

from moeify.layers.routers import cross_attention, linear, mlp  # noqa: F401 - registration
from moeify.layers.routers.base import Router, RouterSpec, build_router, register_router, router_kinds
from moeify.layers.routers.cross_attention import ConditioningContext, CrossAttentionRouter
from moeify.layers.routers.linear import LinearRouter
from moeify.layers.routers.mlp import MlpRouter

__all__ = [
    "ConditioningContext",
    "CrossAttentionRouter",
    "LinearRouter",
    "MlpRouter",
    "Router",
    "RouterSpec",
    "build_router",
    "register_router",
    "router_kinds",
]
