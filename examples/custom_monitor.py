"""Write your own routing monitor and sink, register the monitor, and run both on a tiny MoE model.

    python examples/custom_monitor.py               # 30 steps on a tiny model of MLP blocks (seconds)
    python examples/custom_monitor.py --steps 2     # the smoke test's quick run

A monitor subclasses `moeify.monitors.Monitor`: `observe(StepStats)` gets every MoE layer's routing
statistics of the window (already on the host, one read per step for all monitors) and returns
per-layer metrics and events. A sink is any object with `write(record)` and `close(summary)`.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import moeify
from moeify.monitors import Monitor, StepStats, attach_monitors, event, register_monitor


class HottestExpert(Monitor):
    """The busiest expert of each layer, and an `overloaded` event when it takes more than
    `ratio` times its fair share of the top-k assignments for `patience` windows in a row."""

    name = "hottest_expert"

    def __init__(self, ratio: float = 1.5, patience: int = 2) -> None:
        self.ratio, self.patience = ratio, patience
        self._streak: dict[str, int] = {}
        self._worst: dict[str, float] = {}

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
        metrics, events = {}, []
        for layer in stats.layers:
            share = layer.load_share
            hottest = max(range(layer.num_experts), key=share.__getitem__)
            ratio = share[hottest] * layer.num_experts  # 1.0 = fair share
            metrics[layer.name] = {"expert": float(hottest), "ratio": ratio}
            self._worst[layer.name] = max(ratio, self._worst.get(layer.name, 0.0))
            self._streak[layer.name] = self._streak.get(layer.name, 0) + 1 if ratio > self.ratio else 0
            if self._streak[layer.name] == self.patience:
                detail = f"expert {hottest} took {ratio:.2f}x its fair share for {self.patience} windows"
                events.append(event(stats.step, self.name, layer.name, "overloaded", detail, ratio=ratio))
        return metrics, events

    def summary(self) -> dict[str, Any]:
        return {"worst_ratio": self._worst}


register_monitor("hottest_expert", HottestExpert)  # now attach_monitors(model, ["hottest_expert"]) works


class CsvSink:
    """One CSV row per (step, monitor, layer, metric); events are printed as they come."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self._file = path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(["step", "monitor", "layer", "metric", "value"])

    def write(self, record: dict[str, Any]) -> None:
        for monitor, layers in record["monitors"].items():
            for layer, values in layers.items():
                for metric, value in values.items():
                    self._csv.writerow([record["step"], monitor, layer, metric, value])
                    self.rows += 1
        for ev in record["events"]:
            print(f"  event at step {ev['step']}: {ev['layer']} {ev['kind']} - {ev['detail']}")

    def close(self, summary: dict[str, Any]) -> None:
        self._file.close()
        print(f"csv: {self.rows} rows in {self.path}; summary of {summary['steps']} steps")


def tiny_model(width: int = 32, blocks: int = 2) -> nn.Module:
    """Residual MLP blocks: any token-wise module can be converted with `target_modules`."""
    torch.manual_seed(0)
    mlp = lambda: nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))  # noqa: E731
    return nn.ModuleDict({"embed": nn.Linear(8, width), "blocks": nn.ModuleList(mlp() for _ in range(blocks))})


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model["embed"](x)
    for block in model["blocks"]:
        h = h + block(h)
    return h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.add_argument("--out", type=Path, help="directory for routing.csv (default: a temporary directory)")
    args = p.parse_args(argv)

    model = tiny_model()
    moeify.moeify(model, target_modules=r"blocks\.\d+", num_experts=4, top_k=1, router_init_std=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        sink = CsvSink(out / "routing.csv")
        runner = attach_monitors(model, ["expert_load", "hottest_expert"], sinks=[sink]).attach_optimizer(optimizer)
        for _ in range(args.steps):
            x = torch.randn(16, 10, 8)
            loss = (forward(model, x) - x.sum(-1, keepdim=True)).square().mean() + moeify.aux_loss(model)
            loss.backward()
            optimizer.step()  # the runner reads the routing statistics right after it
            optimizer.zero_grad()
        summary = runner.close()
    worst = summary["monitors"]["hottest_expert"]["worst_ratio"]
    print(
        f"monitored {summary['steps']} steps, {summary['events']} events; worst hot-expert ratio per layer: "
        + ", ".join(f"{name} {ratio:.2f}" for name, ratio in worst.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
