"""nn.Modules only (no Hugging Face imports): the MoE layer, experts and routers."""

from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.moe import MoeLayer
from moeify.layers.routers import ConditioningContext, Router, RouterSpec, register_router

__all__ = [
    "ConditioningContext",
    "ModuleExperts",
    "MoeLayer",
    "PackedExperts",
    "Router",
    "RouterSpec",
    "register_router",
]
