"""The monitor protocol and registry.

A monitor turns one step's routing statistics (already on the host, already all-reduced) into
per-layer numbers and discrete events. It never touches the device on its own schedule: the
runner reads every layer once per step and hands the same `StepStats` to every monitor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from moeify.layers.stats import INDEX
from moeify.registry import Registry


@dataclass(frozen=True)
class LayerStats:
    """One MoE layer's routing over one observation window (means are per routed token)."""

    name: str  # module name, e.g. "model.layers.3.mlp"
    depth: int  # position among the model's MoE layers, 0 = shallowest
    num_experts: int
    top_k: int
    tokens: float  # tokens routed in the window
    tokens_per_expert: tuple[int, ...]  # top-k assignments per expert (exact: int64 on the device)
    prob_mean: tuple[float, ...]  # mean router probability per expert
    entropy: float  # mean per-token routing entropy / log E, in [0, 1]
    max_prob: float  # mean of the largest routing probability
    margin: float  # mean gap between the k-th and (k+1)-th probability
    routed_norm: float  # mean ||routed output||
    shared_norm: float  # mean ||shared output|| (0 without shared experts)
    # Runs of the layer per model forward: > 1 for one layer serving several depths (ALBERT), whose
    # counts and means then cover all of them.
    calls_per_forward: int = 1

    @property
    def load_share(self) -> tuple[float, ...]:
        """Share of the top-k assignments per expert (sums to 1; zeros when no tokens)."""
        total = sum(self.tokens_per_expert)
        return tuple(c / total for c in self.tokens_per_expert) if total else tuple(0.0 for _ in self.tokens_per_expert)

    @classmethod
    def from_sums(
        cls,
        name: str,
        depth: int,
        top_k: int,
        counts: list[int],
        prob_sum: list[float],
        sums: list[float],
        calls_per_forward: int = 1,
    ) -> LayerStats:
        tokens = sums[INDEX["tokens"]]
        per = 1.0 / tokens if tokens else 0.0
        num_experts = len(counts)
        log_e = math.log(num_experts) if num_experts > 1 else 1.0
        return cls(
            name=name,
            depth=depth,
            num_experts=num_experts,
            top_k=top_k,
            tokens=tokens,
            tokens_per_expert=tuple(counts),
            prob_mean=tuple(p * per for p in prob_sum),
            entropy=sums[INDEX["entropy"]] * per / log_e,
            max_prob=sums[INDEX["max_prob"]] * per,
            margin=sums[INDEX["margin"]] * per,
            routed_norm=sums[INDEX["routed_norm"]] * per,
            shared_norm=sums[INDEX["shared_norm"]] * per,
            calls_per_forward=calls_per_forward,
        )


@dataclass
class StepStats:
    """Everything a monitor sees at one observation."""

    step: int  # optimizer step number (1-based)
    steps_in_window: int  # optimizer steps covered by this observation
    layers: list[LayerStats]
    model: nn.Module = field(repr=False)
    # The events raised so far this step: complete when a monitor that `acts` observes (the
    # runner observes those last), empty for the others.
    events: list[dict[str, Any]] = field(default_factory=list)


Event = dict[str, Any]  # at least: step, monitor, layer, kind, detail


def event(step: int, monitor: str, layer: str | None, kind: str, detail: str, **extra: Any) -> Event:
    return {"step": step, "monitor": monitor, "layer": layer, "kind": kind, "detail": detail, **extra}


# ---------------------------------------------------------------------------------------------
# How a monitor appears on the model card (moeify.hub.card, moeify.hub.plots). `order` places a
# declaration among every registered monitor's declarations of its sort (lower first, equal ones in
# registration order): the built-in monitors use 10, 20, ...; a new monitor's default goes last.

FORMATS = ("num", "count", "flag")
REDUCTIONS = ("sum", "min", "layers", "count")
PLOT_STYLES = ("lines", "expert_heatmap", "deadlock_map")


@dataclass(frozen=True)
class CardColumn:
    """A column of the card's per-layer routing-health table.

    The cell of a layer is `summary()["layers"][layer][key]` (or `summary()[layer][key]` for a
    summary without "layers"), else the layer's `last_key` in the monitor's last `observe`
    metrics, else "–". `format`: "num" (3 significant digits, "∞"), "count" (a number, or a list
    shown as its length and items), "flag" ("**yes**" / "no"). A column no layer has a value in
    is left out."""

    title: str
    key: str
    last_key: str | None = None
    format: str = "num"
    order: int = 1000

    def __post_init__(self) -> None:
        if not self.title or not self.key:
            raise ValueError(f"a card column needs a title and a summary key, got {self!r}")
        if self.format not in FORMATS:
            raise ValueError(f"card column {self.title!r}: format must be one of {FORMATS}, got {self.format!r}")


@dataclass(frozen=True)
class CardFigure:
    """A model-wide number in the card's `routing_health` YAML block (and template variable
    `health.figures.<name>`): either the value at `path` in `summary()` (e.g. ("model",
    "kappa_max"); left out when absent or None), or a reduction of the per-layer values of `key`
    (read as `CardColumn` reads a cell, `last_key` its fallback): "sum" of counts (lists count
    their items), "min", "layers" (names of the layers whose value is true), "count" (layers with
    a value)."""

    name: str
    path: tuple[str, ...] = ()
    key: str = ""
    last_key: str | None = None
    reduce: str = ""
    order: int = 1000

    def __post_init__(self) -> None:
        if not self.name or bool(self.path) == bool(self.key):
            raise ValueError(f"card figure {self.name!r}: give either a summary path or a per-layer key, got {self!r}")
        if self.key and self.reduce not in REDUCTIONS:
            raise ValueError(f"card figure {self.name!r}: reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if self.path and self.reduce:
            raise ValueError(f"card figure {self.name!r}: reduce={self.reduce!r} needs a per-layer key, not a path")


@dataclass(frozen=True)
class CardPlot:
    """A PNG under diagnostics/ drawn from the monitor's per-step `observe` metrics (the run's
    history) and embedded in the card with `caption`. `style`: "lines" (one line per layer of
    `metric` over steps, `ylabel`, `ylim`), "expert_heatmap" (the `metric`<e> share of every
    expert of every layer over steps), "deadlock_map" (k x the largest `metric`<e> share per layer
    over steps, events of kind `marks` drawn on it). Written when the run holds the monitor."""

    file: str
    caption: str
    style: str
    metric: str
    title: str = ""
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    marks: str = ""
    order: int = 1000

    def __post_init__(self) -> None:
        if not self.file.endswith(".png") or "/" in self.file:
            raise ValueError(f"card plot {self.file!r}: the file must be a plain name ending in .png")
        if self.style not in PLOT_STYLES:
            raise ValueError(f"card plot {self.file!r}: style must be one of {PLOT_STYLES}, got {self.style!r}")


class Monitor:
    """Base class of monitors. Subclasses set `name` and implement `observe`.

    `observe` returns this step's per-layer metrics ({layer name: {metric: float}}; a model-wide
    metric goes under the key "model") and the events it raises. `summary` returns a
    JSON-serialisable dict. Thresholds are constructor arguments.

    A monitor that keeps state across steps (streaks, windows, references) returns it from
    `state_dict` and takes it back in `load_state_dict`, so that a resumed run continues exactly
    as an uninterrupted one would.

    How a monitor gets onto the model card (`moeify.model_card`, `moeify.push_to_hub`): register
    it (`register_monitor`) and declare, as class attributes, what the card shows of it; the card
    and its plots read these declarations of every registered monitor and keep no list of their
    own. `card_columns`: per-layer table columns (`CardColumn`: title, key in the per-layer
    summary, format). `card_figures`: model-wide numbers for the card's YAML block (`CardFigure`:
    a path into `summary()` or a reduction over layers). `card_plots`: PNGs drawn from the
    per-step metrics of `observe` (`CardPlot`). `resolved_events`: the event kinds that end a
    problem (a revival, a recovery): the card lists them after the ones that start one when it
    has to leave events out. tests/test_card.py runs every registered monitor for a few steps
    and fails on a declared key its summary does not produce.
    """

    name: ClassVar[str] = ""
    # A monitor that acts on other monitors' events (a remedy, moeify.control.remedies): observed
    # after every other monitor of the step, with their events in `stats.events`.
    acts: ClassVar[bool] = False
    # Monitors whose events it needs: the runner refuses to start without them.
    requires: ClassVar[tuple[str, ...]] = ()
    # On the model card (see the class docstring): nothing unless declared.
    card_columns: ClassVar[tuple[CardColumn, ...]] = ()
    card_figures: ClassVar[tuple[CardFigure, ...]] = ()
    card_plots: ClassVar[tuple[CardPlot, ...]] = ()
    resolved_events: ClassVar[tuple[str, ...]] = ()

    def attach(self, model: nn.Module, layer_names: list[str]) -> None:
        """Called once when the runner starts, before any training step (e.g. to snapshot weights)."""

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Whatever future `observe` and `summary` results depend on, as JSON-serialisable
        primitives only (dicts, lists, str, int, float, bool, None; lists of floats for tensors):
        accelerate unpickles custom checkpoint state, and moeify stores it as a JSON string.
        Returns new containers (a caller may keep it while the run goes on). Not the constructor
        arguments: the resumed run builds its monitors with its own."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (possibly through JSON: tuples come back as
        lists). Called after `attach`, before the first `observe` of the resumed run."""


MonitorFactory = Callable[[], Monitor]
_MONITORS: Registry[str, type[Monitor] | MonitorFactory] = Registry("monitor", listing="registered monitors")
DEFAULT_MONITORS: list[str] = []


def register_monitor(name: str, factory: type[Monitor] | MonitorFactory, *, default: bool = False) -> None:
    """Make `attach_monitors(model, monitors=[name])` build `factory()`. Duplicates are refused."""
    _MONITORS.register(name, factory)
    if default:
        DEFAULT_MONITORS.append(name)


def build_monitor(name: str) -> Monitor:
    return _MONITORS[name]()


def monitor_names() -> tuple[str, ...]:
    return tuple(_MONITORS.names())


def monitor_class(name: str) -> type[Monitor]:
    """The class a registered monitor is built from (a factory that is no class is called once)."""
    factory = _MONITORS[name]
    return factory if isinstance(factory, type) else type(factory())


def card_declarations(attribute: str) -> list[tuple[str, Any]]:
    """(monitor name, declaration) for every registered monitor's `attribute` ("card_columns",
    "card_figures" or "card_plots"), by their `order` (equal orders in registration order)."""
    if attribute not in ("card_columns", "card_figures", "card_plots"):
        raise ValueError(f"attribute must be card_columns, card_figures or card_plots, got {attribute!r}")
    found = [(name, d) for name in _MONITORS for d in getattr(monitor_class(name), attribute)]
    return sorted(found, key=lambda item: item[1].order)
