"""`MonitorRunner`: reads every MoE layer's statistics once per step and feeds monitors and sinks.

The read is one `torch.cat` of all layers' buffers, one all-reduce under torch.distributed (so
every rank judges the same global numbers), and one copy to the host — torchtitan's pattern of
accumulating during forward and reading from the optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from moeify.checks import in_range
from moeify.layers.inventory import require_moe_layers
from moeify.layers.moe import MoeLayer
from moeify.layers.stats import sum_over_ranks
from moeify.monitors.base import DEFAULT_MONITORS, Event, LayerStats, Monitor, StepStats, build_monitor

STATE_FORMAT = 1


class Sink(Protocol):
    """Where a runner's records go. `write` gets each step's record, `close` the summary."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any]) -> None: ...


def gather(layers: Sequence[tuple[str, MoeLayer]], *, reset: bool = True) -> list[LayerStats]:
    """All layers' statistics as host numbers: two concats, two all-reduces, two device→host
    copies. The counts travel as int64: fp32 holds integers exactly only below 2**24, which
    a long window on many ranks passes."""
    if not layers:
        return []
    counts_flat = torch.cat([m.tokens_per_expert for _, m in layers])
    sums_flat = torch.cat([torch.cat([m.stat_prob_sum, m.stat_sums]).to(counts_flat.device) for _, m in layers])
    sum_over_ranks(counts_flat, sums_flat)
    all_counts, values = counts_flat.cpu().tolist(), sums_flat.cpu().tolist()
    out, offset, count_offset = [], 0, 0
    for depth, (name, layer) in enumerate(layers):
        e = layer.num_experts
        counts = all_counts[count_offset : count_offset + e]
        count_offset += e
        size = e + layer.stat_sums.numel()
        prob_sum, sums = values[offset : offset + e], values[offset + e : offset + size]
        offset += size
        out.append(LayerStats.from_sums(name, depth, layer.top_k, counts, prob_sum, sums, layer.calls_per_forward))
        if reset:
            layer.reset_stats()
    return out


class MonitorRunner:
    """Drives monitors and sinks. Call `step()` once per optimizer step, or `attach_optimizer`."""

    def __init__(
        self, model: nn.Module, monitors: Iterable[Monitor], sinks: Iterable[Sink] = (), every_n_steps: int = 1
    ) -> None:
        in_range("every_n_steps", every_n_steps, ">= 1")
        self.model = model
        self.layers = require_moe_layers(model)
        self.monitors = list(monitors)
        self.sinks = list(sinks)
        self.every_n_steps = every_n_steps
        self.events: list[Event] = []
        self.history: list[dict[str, Any]] = []
        self.steps = 0
        self._hooks: list[Any] = []
        self._closed = False
        present = {monitor.name for monitor in self.monitors}
        for monitor in self.monitors:
            missing = [name for name in monitor.requires if name not in present]
            if missing:
                raise ValueError(
                    f"monitor {monitor.name!r} acts on the events of {missing}, which are not attached: add them, e.g. "
                    f"attach_monitors(model, monitors=[*{sorted(present)}, *{missing}])"
                )
        for _, layer in self.layers:
            layer.reset_stats()
            layer.collect_stats = True
        for monitor in self.monitors:
            monitor.attach(model, [name for name, _ in self.layers])

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> MonitorRunner:
        """Run `step()` after every `optimizer.step()`."""
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        return self

    def step(self) -> dict[str, Any] | None:
        """Count one optimizer step; every `every_n_steps` steps read, judge and write a record."""
        if self._closed:
            raise RuntimeError("this MonitorRunner is closed")
        self.steps += 1
        if self.steps % self.every_n_steps:
            return None
        stats = StepStats(self.steps, self.every_n_steps, gather(self.layers), self.model)
        record: dict[str, Any] = {"step": self.steps, "monitors": {}}
        new_events: list[Event] = []
        # Monitors that act (remedies) come last and see every event of the step.
        for monitor in sorted(self.monitors, key=lambda m: m.acts):
            stats.events = list(new_events) if monitor.acts else []
            metrics, events = monitor.observe(stats)
            record["monitors"][monitor.name] = metrics
            new_events += events
        record["events"] = new_events
        self.events += new_events
        self.history.append(record)
        for sink in self.sinks:
            sink.write(record)
        return record

    def summary(self) -> dict[str, Any]:
        """Per monitor, per layer: JSON-serialisable."""
        shared = {name: layer.calls_per_forward for name, layer in self.layers if layer.calls_per_forward > 1}
        return {
            "steps": self.steps,
            "layers": [name for name, _ in self.layers],
            # Layers that serve several depths: their statistics add all those runs.
            **({"calls_per_forward": shared} if shared else {}),
            "monitors": {m.name: m.summary() for m in self.monitors},
            "events": len(self.events),
        }

    def _monitor_keys(self) -> list[str]:
        """Each monitor's name; a repeated name gets "#2", "#3", ... in list order."""
        keys, seen = [], {}
        for monitor in self.monitors:
            seen[monitor.name] = seen.get(monitor.name, 0) + 1
            keys.append(monitor.name if seen[monitor.name] == 1 else f"{monitor.name}#{seen[monitor.name]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """The step counter, the events and every monitor's state, as JSON-serialisable data.

        Not `history`: every record has already gone to the sinks, it grows with the run, and no
        summary or future event reads it; after a resume it holds the resumed run's records."""
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "layers": [name for name, _ in self.layers],
            "events": [dict(e) for e in self.events],
            "monitors": {key: m.state_dict() for key, m in zip(self._monitor_keys(), self.monitors)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (of a runner attached to the same model with the same
        monitors): later records, events and the summary are those of an uninterrupted run.
        Refused before anything changes when the monitors or the MoE layers differ."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a MonitorRunner state (format {STATE_FORMAT}): {type(state).__name__}")
        saved, now = sorted(state["monitors"]), sorted(self._monitor_keys())
        if saved != now:
            raise ValueError(
                "this runner's monitors differ from the saved runner's:\n"
                f"  saved: {saved}\n  now:   {now}\n"
                f"missing now: {sorted(set(saved) - set(now))}, not saved: {sorted(set(now) - set(saved))}; "
                "attach the same monitors (attach_monitors(model, monitors=[...])) before loading"
            )
        layers = [name for name, _ in self.layers]
        if state["layers"] != layers:
            raise ValueError(
                f"the saved runner watched the MoE layers {state['layers']}, this one watches {layers}: "
                "load the state into a runner on the model it was saved from"
            )
        before = [m.state_dict() for m in self.monitors]
        try:
            for key, monitor in zip(self._monitor_keys(), self.monitors):
                monitor.load_state_dict(state["monitors"][key])
        except Exception:
            # A monitor refused its state (other settings, e.g. num_buckets): undo the ones loaded.
            for monitor, own in zip(self.monitors, before):
                monitor.load_state_dict(own)
            raise
        self.steps = int(state["steps"])
        self.events[:] = [dict(e) for e in state["events"]]

    def close(self) -> dict[str, Any]:
        """Detach from the model and optimizer, flush sinks; returns the summary."""
        if self._closed:
            return self.summary()
        for hook in self._hooks:
            hook.remove()
        for _, layer in self.layers:
            layer.collect_stats = False
        summary = self.summary()
        for sink in self.sinks:
            sink.close(summary)
        self._closed = True
        return summary


def attach_monitors(
    model: nn.Module,
    monitors: str | Iterable[str | Monitor] = "default",
    sinks: Iterable[Sink] = (),
    every_n_steps: int = 1,
) -> MonitorRunner:
    """Start watching a converted model's routing. `monitors`: "default", or names / instances."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_monitors watches an nn.Module converted by moeify, got {type(model).__name__}")
    if not isinstance(monitors, (str, Iterable)):
        raise TypeError(
            f"monitors must be 'default', a monitor name, or a list of names / Monitor instances, got {monitors!r}"
        )
    sinks = list(sinks) if isinstance(sinks, Iterable) else sinks
    if not isinstance(sinks, list) or any(not callable(getattr(s, "write", None)) for s in sinks):
        raise TypeError(
            f"sinks must be a list of sinks (objects with write(record) and close(summary)), got {sinks!r}; see moeify.sinks"
        )
    if monitors == "default":
        chosen: list[Monitor] = [build_monitor(name) for name in DEFAULT_MONITORS]
    elif isinstance(monitors, str):
        chosen = [build_monitor(monitors)]
    else:
        chosen = [m if isinstance(m, Monitor) else build_monitor(m) for m in monitors]
    return MonitorRunner(model, chosen, sinks, every_n_steps)
