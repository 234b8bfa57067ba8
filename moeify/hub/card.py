"""`moeify.model_card(model, run=...)`: a Hub model card for a converted model.

Built with `huggingface_hub.ModelCardData` + `ModelCard.from_template` from the Jinja template
shipped in the package (templates/model_card.md.j2). The YAML header holds `library_name:
moeify`, `base_model` (only when it names a Hub repo: the Hub rejects local paths), the tags, and
a `moeify:` block with the conversion recipes, the parameter counts and, when a monitor run is
given, the routing-health summary. The body holds the conversion summary, how to load the model
and, with a run, a per-layer routing-health table, the events that matter and the plots
(relative links to `diagnostics/*.png`, committed with the card: `moeify.push_to_hub`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from moeify._version import __version__
from moeify.layers.inventory import human, moe_layers, parameter_counts, unwrap
from moeify.monitors.base import card_declarations, monitor_class, monitor_names
from moeify.recipes.router_init import describe as describe_router_init

TEMPLATE = "model_card.md.j2"
DIAGNOSTICS = "diagnostics"
TAGS = ["moe", "mixture-of-experts", "moeify", "upcycled"]
# Hub pipeline tags by the suffix of a transformers class name.
PIPELINE_TAGS = {
    "ForCausalLM": "text-generation",
    "ForMaskedLM": "fill-mask",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForImageClassification": "image-classification",
}
# The per-layer columns, model-wide figures, plots and resolved event kinds come from what the
# registered monitors declare (Monitor.card_columns, card_figures, card_plots, resolved_events).
MAX_EVENTS = 20


# ---------------------------------------------------------------------------------------------
# Plain values


def plain(value: Any) -> Any:
    """JSON- and YAML-safe: tuples become lists, inf / nan become strings ("inf"), floats keep
    their value (the Hub stores metadata as JSON, and PyYAML would tag tuples)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _round(value: Any) -> Any:
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return [_round(v) for v in value]  # an interval
    return float(f"{value:.4g}") if isinstance(value, float) and math.isfinite(value) else value


def _cell(value: Any) -> str:
    """Text for a markdown table cell (pipes escaped, no line breaks)."""
    return " ".join(str(value).split()).replace("|", "\\|").replace("<", "&lt;")


# ---------------------------------------------------------------------------------------------
# The model


def _config_value(model: nn.Module, key: str) -> Any:
    config = getattr(model, "config", None)
    value = getattr(config, key, None)
    if value is None and isinstance(config, dict):  # diffusers' FrozenDict
        value = config.get(key)
    return value


def hub_base_model(model: nn.Module, base_model: str | None) -> str | None:
    """The base model's Hub repo id: `base_model` if given (checked), else the model's
    `_name_or_path` when it is a repo id rather than a local path (the Hub refuses others)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError as error:
            raise ValueError(f"base_model={base_model!r} is not a Hub repo id (like 'org/name'): {error}") from None
        return base_model
    name = _config_value(model, "_name_or_path") or getattr(model, "name_or_path", None)
    if not isinstance(name, str) or not name or Path(name).expanduser().exists() or os.path.isabs(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    report = model.moeify_state.report
    sites = {s.layer_path: s for s in (report.sites if report is not None else [])}
    rows = []
    for name, layer in moe_layers(model):
        site = sites.get(name)
        shared = layer.shared_experts.num_experts if layer.shared_experts is not None else 0
        sizes = f"{site.in_features}→{site.intermediate_size}→{site.out_features}" if site and site.in_features else ""
        rows.append(
            {
                "name": name,
                "ffn": _cell(f"{site.class_name} {sizes}".strip() if site else ""),
                "experts": layer.num_experts,
                "top_k": layer.top_k,
                "shared": shared,
                "router": type(layer.router).__name__,
            }
        )
    return rows


def _deviation(deviation: dict[str, Any] | None) -> dict[str, Any] | None:
    """max |moe - dense| / dense scale, to 4 significant digits (model.moeify_state.deviation)."""
    if not deviation:
        return None
    return {
        key: {k: _round(float(v)) for k, v in value.items()} if isinstance(value, dict) else _round(value)
        for key, value in plain(deviation).items()
    }


def conversion(model: nn.Module) -> dict[str, Any]:
    """What the card says about the conversion (template variables)."""
    from moeify.hub.save import library_of

    state = model.moeify_state
    layers = _layer_rows(model)
    counts = parameter_counts(model)
    report = state.report
    skipped = (
        [{"name": s.name, "class_name": s.class_name, "reason": _cell(s.reason)} for s in report.skipped]
        if report
        else []
    )
    base = {"library": library_of(model), "class_name": type(model).__name__}
    if base["library"] == "transformers":
        base["model_type"] = model.config.model_type
    return {
        "moeify_version": __version__,
        "base": base,
        "recipes": [plain(config.to_dict()) for config in state.conversions],
        "routing": state.routing.changes(state.config) if getattr(state, "routing", None) is not None else None,
        # Recipes that depart from the dense model by design (experts_from, reinit_fraction): measured.
        "deviation": _deviation(getattr(state, "deviation", None)),
        "layers": layers,
        "skipped": skipped,
        "parameters": counts,
        "parameters_text": {k: human(v) for k, v in counts.items()},
        "active_percent": f"{100 * counts['active_per_token'] / counts['total']:.1f}" if counts["total"] else "0",
        "distinct": {key: sorted({row[key] for row in layers}) for key in ("experts", "top_k", "shared", "router")},
        "router_init": list(dict.fromkeys(describe_router_init(c.router_init) for c in state.conversions)),
    }


# ---------------------------------------------------------------------------------------------
# The run


def as_run(run: Any) -> dict[str, Any] | None:
    """A monitor run as {"history", "events", "summary"}: from a run directory (`JsonlSink`),
    a `read_run` dict or a `MonitorRunner`."""
    from moeify.monitors.runner import MonitorRunner
    from moeify.sinks.jsonl import read_run

    if run is None:
        return None
    if isinstance(run, MonitorRunner):
        return {"history": list(run.history), "events": list(run.events), "summary": run.summary()}
    if isinstance(run, (str, os.PathLike)):
        return read_run(run)
    if isinstance(run, dict) and isinstance(run.get("history"), list):
        return {"history": run["history"], "events": run.get("events") or [], "summary": run.get("summary") or {}}
    raise TypeError(
        f"run must be a run directory (JsonlSink), a moeify.sinks.read_run dict or a MonitorRunner, "
        f"got {type(run).__name__}"
    )


class _RunView:
    """Reads a metric of a layer from the run summary, or else from the last history record."""

    def __init__(self, run: dict[str, Any]) -> None:
        summary = run.get("summary") or {}
        self.monitors = summary.get("monitors") or {}
        self.last = run["history"][-1].get("monitors", {}) if run["history"] else {}
        names = summary.get("layers") or [n for m in self.last.values() for n in m if n != "model"]
        self.layers = list(dict.fromkeys(names))
        self.steps = summary.get("steps") or (run["history"][-1].get("step") if run["history"] else 0)

    def metric(self, monitor: str, layer: str, key: str, last_key: str | None) -> Any:
        summary = self.monitors.get(monitor) or {}
        per_layer = (summary.get("layers", summary) or {}).get(layer) or {}
        if key in per_layer:
            return per_layer[key]
        return (self.last.get(monitor) or {}).get(layer, {}).get(last_key) if last_key else None

    def figure(self, path: tuple[str, ...]) -> Any:
        value: Any = self.monitors
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value


def _count(value: Any) -> int | None:
    if value is None:
        return None
    return len(value) if isinstance(value, (list, tuple)) else int(value)


def _display(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "flag":
        return "**yes**" if value else "no"
    if kind == "count":
        count = _count(value)
        return f"{count} ({', '.join(map(str, value))})" if isinstance(value, list) and value else str(count)
    if isinstance(value, str):  # "inf" as written by JsonlSink
        return "∞" if value == "inf" else value
    return "∞" if value == math.inf else f"{value:.3g}"


def _events(run: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    events = [e for e in run.get("events") or [] if isinstance(e, dict)]
    # Events that end a problem are listed after the ones that start one (left out first).
    resolved = {kind for name in _registered() for kind in monitor_class(name).resolved_events}
    chosen = sorted(events, key=lambda e: (e.get("kind") in resolved, e.get("step", 0)))[:MAX_EVENTS]
    chosen.sort(key=lambda e: e.get("step", 0))
    shown = [
        {"step": e.get("step"), "kind": e.get("kind"), "layer": e.get("layer"), "detail": _cell(e.get("detail", ""))}
        for e in chosen
    ]
    return shown, len(events) - len(shown)


def _registered() -> list[str]:
    """Every registered monitor's name, the built-in ones imported (and so registered) first."""
    import moeify.monitors  # noqa: F401 - registers the built-in monitors

    return list(monitor_names())


def _reduce(values: list[Any], names: list[str], how: str) -> Any:
    """A card figure over layers (`CardFigure.reduce`)."""
    if how == "sum":
        return sum(_count(v) or 0 for v in values)
    if how == "min":
        return min((float(v) for v in values if v is not None), default=None)  # float("inf") reads JsonlSink's "inf"
    if how == "layers":
        return [name for name, v in zip(names, values) if v]
    return sum(1 for v in values if v is not None)  # "count"


def routing_health(run: dict[str, Any]) -> dict[str, Any]:
    """Template variables of the routing-health section, and the YAML summary ("yaml")."""
    _registered()
    view = _RunView(run)
    declared = card_declarations("card_columns")
    raw = [[view.metric(monitor, name, c.key, c.last_key) for monitor, c in declared] for name in view.layers]
    shown = [i for i in range(len(declared)) if any(values[i] is not None for values in raw)]
    rows = [
        [name] + [_display(values[i], declared[i][1].format) for i in shown] for name, values in zip(view.layers, raw)
    ]
    figures: dict[str, Any] = {"steps": view.steps, "observations": len(run["history"]), "moe_layers": len(view.layers)}
    for monitor, figure in card_declarations("card_figures"):
        if figure.path:
            figures[figure.name] = view.figure((monitor, *figure.path))
        else:
            values = [view.metric(monitor, name, figure.key, figure.last_key) for name in view.layers]
            figures[figure.name] = _reduce(values, view.layers, figure.reduce)
    figures["events"] = dict(Counter(str(e.get("kind")) for e in run.get("events") or [] if isinstance(e, dict)))
    yaml = {k: _round(v) for k, v in plain(figures).items() if v is not None}
    events, more = _events(run)
    return {
        "yaml": yaml,
        "figures": yaml,
        "headers": ["layer"] + [declared[i][1].title for i in shown],
        "rows": [[_cell(v) for v in row] for row in rows],
        "events": events,
        "more_events": more,
    }


def _plots() -> dict[str, tuple[str, Any]]:
    """file name: (monitor, CardPlot), in card order."""
    _registered()
    return {plot.file: (monitor, plot) for monitor, plot in card_declarations("card_plots")}


def expected_plots(run: dict[str, Any]) -> list[str]:
    """The plots `routing_plots` writes for this run (which monitors it holds)."""
    monitors = {name for record in run.get("history") or [] for name in record.get("monitors", {})}
    return [file for file, (monitor, _) in _plots().items() if monitor in monitors]


# ---------------------------------------------------------------------------------------------
# The card


def _template() -> str:
    return resources.files("moeify.hub").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")


def _pipeline_tag(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((tag for suffix, tag in PIPELINE_TAGS.items() if name.endswith(suffix)), None)


def model_card(
    model: nn.Module,
    *,
    run: Any = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    plots: list[str] | None = None,
):  # -> huggingface_hub.ModelCard
    """The Hub model card of a moeify-converted model.

    `run`: routing diagnostics to summarise: a run directory written by `JsonlSink`, a
    `moeify.sinks.read_run` dict or a `MonitorRunner`. `base_model`: the base model's Hub repo id
    (default: the model's `_name_or_path` when it is one). `repo_id`: where the card goes (used
    in the loading snippet). `plots`: names of the PNGs under `diagnostics/` to embed (default:
    those `moeify.hub.plots.routing_plots` writes for the run). Needs jinja2.
    """
    from huggingface_hub import ModelCard, ModelCardData

    model = unwrap(model)  # torch.compile / DDP wrappers
    state = getattr(model, "moeify_state", None)
    if state is None or not state.conversions:
        raise ValueError(
            f"moeify.model_card describes moeify-converted models, and this {type(model).__name__} was not "
            "converted (no model.moeify_state): call moeify(model, ...) first"
        )
    info = conversion(model)
    run = as_run(run)
    health = routing_health(run) if run is not None and run["history"] else None
    if health is not None:
        plot_names = expected_plots(run) if plots is None else list(plots)
        captions = {file: plot.caption for file, (_, plot) in _plots().items()}
        health["plots"] = [
            {"path": f"{DIAGNOSTICS}/{name}", "caption": captions.get(name, name)} for name in plot_names
        ]
    base = hub_base_model(model, base_model)
    block = {
        "version": info["moeify_version"],
        "base": info["base"],
        "recipes": info["recipes"],
        **({"routing": info["routing"]} if info["routing"] else {}),
        **({"deviation": info["deviation"]} if info["deviation"] else {}),
        "moe_layers": len(info["layers"]),
        "skipped_sites": len(info["skipped"]),
        "parameters": info["parameters"],
    }
    if health is not None:
        block["routing_health"] = health["yaml"]
    tags = TAGS + ([info["base"]["model_type"]] if info["base"].get("model_type") else [])
    data = ModelCardData(
        library_name="moeify", base_model=base, tags=tags, pipeline_tag=_pipeline_tag(model), moeify=plain(block)
    )
    title = repo_id.split("/")[-1] if repo_id else f"{info['base']['class_name']} (moeify MoE)"
    try:
        return ModelCard.from_template(
            data,
            template_str=_template(),
            title=title,
            repo_id=repo_id,
            base_model_id=base,
            conversion=info,
            recipes_json=[json.dumps(r, indent=2) for r in info["recipes"]],
            routing_json=json.dumps(info["routing"], indent=2) if info["routing"] else None,
            health=health,
            diagnostics=DIAGNOSTICS,
        )
    except ImportError as error:
        raise ImportError("moeify.model_card needs jinja2: pip install jinja2") from error


__all__ = ["as_run", "model_card", "parameter_counts"]
