"""Where monitor records go: console, a JSONL run directory, accelerate trackers, the Trainer.

`MoeifyCallback` imports transformers; it is loaded on first use."""

from moeify.sinks.accelerate import AccelerateSink
from moeify.sinks.console import ConsoleSink
from moeify.sinks.jsonl import JsonlSink, read_run

__all__ = ["AccelerateSink", "ConsoleSink", "JsonlSink", "MoeifyCallback", "read_run"]


def __getattr__(name: str):
    if name == "MoeifyCallback":
        from moeify.sinks.trainer import MoeifyCallback

        return MoeifyCallback
    raise AttributeError(name)
