"""Routing plots from a monitor run (the records of `JsonlSink` / `runner.history`), as PNGs that
the model card embeds. Needs matplotlib: `pip install "moeify[plots]"`.

Which plots are drawn is what the registered monitors declare (`Monitor.card_plots`, a
`moeify.monitors.base.CardPlot` each); a plot is drawn from its monitor's per-step metrics, in one
of three styles:

- "lines": one line per layer of a per-layer metric over time (router_entropy: entropy.png).
- "expert_heatmap": the share of every (layer, expert) over time, one row per expert of each layer
  (expert_load: load_heatmap.png).
- "deadlock_map": over depth and time, the top expert's share of the most it could take
  (k x max share: 1 = one expert takes every token it can), events of one kind marked
  (expert_load: deadlock_map.png, deadlock events).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeify.monitors.base import CardPlot, card_declarations


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('routing plots need matplotlib: pip install "moeify[plots]"') from error
    return plt


def _layers(history: list[dict[str, Any]], monitor: str) -> list[str]:
    names: list[str] = []
    for record in history:
        for name in record.get("monitors", {}).get(monitor, {}):
            if name != "model" and name not in names:
                names.append(name)
    return names


def _shares(record: dict[str, Any], monitor: str, layer: str, prefix: str) -> list[float]:
    """The `prefix`<e> metrics of a layer, by expert e."""
    metrics = record.get("monitors", {}).get(monitor, {}).get(layer, {})
    keys = [k for k in metrics if k.startswith(prefix) and k[len(prefix) :].isdigit()]
    return [metrics[k] for k in sorted(keys, key=lambda k: int(k[len(prefix) :]))]


def expert_heatmap(
    history: list[dict[str, Any]], events: list[dict[str, Any]], path: Path, monitor: str, plot: CardPlot
) -> Path | None:
    layers = _layers(history, monitor)
    if not layers:
        return None
    plt = _pyplot()
    rows, labels = [], []
    for layer in layers:
        per_step = [_shares(r, monitor, layer, plot.metric) for r in history]
        experts = max((len(s) for s in per_step), default=0)
        for e in range(experts):
            rows.append([s[e] if e < len(s) else float("nan") for s in per_step])
            labels.append(f"{layer} e{e}" if e == 0 else f"e{e}")
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.12 * len(rows))))
    image = ax.imshow(
        rows,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(rows) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(rows)), labels, fontsize=5)
    ax.set(xlabel="step", title=plot.title)
    fig.colorbar(image, ax=ax, label="share of assignments")
    return _save(fig, plt, path)


def lines(
    history: list[dict[str, Any]], events: list[dict[str, Any]], path: Path, monitor: str, plot: CardPlot
) -> Path | None:
    layers = _layers(history, monitor)
    series = {
        layer: [
            (r["step"], r["monitors"][monitor][layer].get(plot.metric))
            for r in history
            if layer in r.get("monitors", {}).get(monitor, {})
        ]
        for layer in layers
    }
    series = {k: [(s, v) for s, v in pts if isinstance(v, (int, float))] for k, pts in series.items()}
    if not any(series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for layer, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1, label=layer)
    ax.set(xlabel="step", ylabel=plot.ylabel, title=plot.title)
    if plot.ylim is not None:
        ax.set_ylim(*plot.ylim)
    if len(series) <= 12:
        ax.legend(fontsize=6)
    return _save(fig, plt, path)


def deadlock_map(
    history: list[dict[str, Any]], events: list[dict[str, Any]], path: Path, monitor: str, plot: CardPlot
) -> Path | None:
    layers = _layers(history, monitor)
    if not layers:
        return None
    plt = _pyplot()
    top_k = {layer: _top_k(history, monitor, layer) for layer in layers}
    grid = [
        [min(1.0, top_k[layer] * max(_shares(r, monitor, layer, plot.metric) or [0.0])) for r in history]
        for layer in layers
    ]
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(layers))))
    image = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        vmin=0,
        vmax=1,
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5),
    )
    depth = {layer: i for i, layer in enumerate(layers)}
    marks = [
        (e["step"], depth[e["layer"]])
        for e in events
        if plot.marks and e.get("kind") == plot.marks and e.get("layer") in depth
    ]
    if marks:
        ax.scatter([s for s, _ in marks], [d for _, d in marks], marker="x", color="cyan", s=20, label=plot.marks)
        ax.legend(fontsize=6, loc="upper right")
    ax.set_yticks(range(len(layers)), [f"{i}: {name}" for i, name in enumerate(layers)], fontsize=5)
    ax.set(xlabel="step", ylabel="depth", title=plot.title)
    fig.colorbar(image, ax=ax)
    return _save(fig, plt, path)


def _top_k(history: list[dict[str, Any]], monitor: str, layer: str) -> int:
    for record in reversed(history):
        metrics = record.get("monitors", {}).get(monitor, {}).get(layer, {})
        if "top_k" in metrics:
            return int(metrics["top_k"])
    return 1


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STYLES = {"lines": lines, "expert_heatmap": expert_heatmap, "deadlock_map": deadlock_map}


def routing_plots(run: dict[str, Any], directory: str | Path) -> list[Path]:
    """Write every plot the registered monitors declare and the run supports into `directory`;
    returns the files written."""
    import moeify.monitors  # noqa: F401 - registers the built-in monitors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    history, events = run.get("history", []), run.get("events", [])
    if not history:
        return []
    written = [
        STYLES[plot.style](history, events, directory / plot.file, monitor, plot)
        for monitor, plot in card_declarations("card_plots")
    ]
    return [p for p in written if p is not None]
