"""Tiny models of whole model zoos, built offline from configs / constructor arguments, with
inputs that run them: what the coverage sweep (`benchmarks/coverage.py`) converts.

`transformers_zoo.build(model_type)` and `diffusers_zoo.build(class_name)` return a `Built`, or
raise `ZooSkip` with the reason a model cannot be built or run small (those leave the sweep's
denominator, with the reason in its table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

MAX_PARAMETERS = 20_000_000  # a "tiny" model that still has more was not shrunk: refuse it


class ZooSkip(Exception):
    """This model cannot be built or run at tiny size offline; the message says why."""


@dataclass
class Built:
    """A tiny model in eval mode (fp32, seeded weights) and keyword inputs such that
    `model(**inputs)` runs."""

    name: str
    model: nn.Module
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
