"""Per-architecture knowledge as data. Importing this package registers the built-in entries."""

from moeify.architectures import diffusers, transformers  # noqa: F401 - registration
from moeify.architectures.layouts import FFNLayout, FFNWeights, read_weights
from moeify.architectures.registry import (
    conditioning_for,
    register_conditioning,
    register_ffn,
    register_skip,
    registered_ffn_classes,
)

__all__ = [
    "FFNLayout",
    "FFNWeights",
    "conditioning_for",
    "read_weights",
    "register_conditioning",
    "register_ffn",
    "register_skip",
    "registered_ffn_classes",
]
