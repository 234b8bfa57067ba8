"""The model card's routing-health section comes from what the monitors declare (`card_columns`,
`card_figures`, `card_plots`, `resolved_events`): pinned on a fixed run, and every declared key
checked against the summaries of a real short run."""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import llama_config, monitored_llama
from transformers import AutoModelForCausalLM

import moeify
from moeify.hub.card import expected_plots, routing_health
from moeify.monitors import attach_monitors
from moeify.monitors.base import CardColumn, CardFigure, CardPlot, Monitor, monitor_class, monitor_names

L0, L1 = "model.layers.0.mlp", "model.layers.1.mlp"


def fixed_run() -> dict:
    """A hand-made run of two layers and three observations: every built-in column, figure and
    plot has a value, one column only in the last history record, infinities as JsonlSink writes
    them, and more events than the card lists (the resolved ones are left out first)."""

    def record(step: int) -> dict:
        load = {
            name: {"cv": 0.1 * step, "max_mean": 1.5, "top_k": 2.0, **{f"share_{e}": 0.25 for e in range(4)}}
            for name in (L0, L1)
        }
        return {
            "step": step,
            "monitors": {
                "expert_load": load,
                "router_entropy": {L0: {"entropy": 0.9}, L1: {"entropy": 0.2}},
                "shared_maturity": {L0: {"ratio": 0.5}, L1: {"ratio": 2.0}},
            },
        }

    events = [
        {"step": s, "monitor": "dead_experts", "layer": L0, "kind": "revived", "detail": f"e{s} | back"}
        for s in range(1, 13)
    ]
    events += [
        {"step": s, "monitor": "deadlock", "layer": L1, "kind": "deadlocked", "detail": "expert 0 <- all"}
        for s in range(2, 12)
    ]
    events += [{"step": 3, "monitor": "router_entropy", "layer": L1, "kind": "soft_saturation_ended", "detail": "x"}]
    summary = {
        "steps": 12,
        "layers": [L0, L1],
        "monitors": {
            "expert_load": {L0: {"cv": 0.31234, "max_mean": 1.75, "worst_cv": 0.5}, L1: {"cv": 1.0, "max_mean": 3.0}},
            "router_entropy": {
                "model": {"soft_saturated_layers": 1, "saturated_layers": 0},
                "layers": {L0: {"entropy": 0.91234}, L1: {"entropy": 0.12}},
            },
            "dead_experts": {
                "dead_now": 1,
                "layers": {L0: {"dead_now": 0, "ever_dead": [1, 3]}, L1: {"dead_now": 1, "ever_dead": []}},
            },
            "deadlock": {
                "model": {
                    "depth_profile": {
                        "ever_deadlocked_fraction": 0.5,
                        "u_thirds": 0.25,
                        "u_thirds_interval": [0.123456, 0.75],
                    },
                    "assignment_only_share": None,
                },
                "layers": {L0: {"deadlocked": False}, L1: {"deadlocked": True}},
            },
            "shared_maturity": {"layers": {L0: {"matured_step": None}, L1: {"matured_step": 7}}},
            "ecology": {"layers": {L0: {"E": "inf"}, L1: {"E": 0.4321}}},
            "expert_homogenization": {"model": {"homogeneous_layers": 2}, "layers": {L0: {"spread_max": 1e-9}}},
            "imbalance_early_warning": {
                "model": {"layers_warned": 1, "kappa_max": 0.987654},
                "layers": {L0: {"kappa": 0.5, "warnings": []}, L1: {"kappa": math.inf, "warnings": [4, 9]}},
            },
            "lost_updates": {"model": {"lost_fraction": 0.0}},
        },
    }
    return {"history": [record(s) for s in (1, 2, 3)], "events": events, "summary": summary}


# The routing-health section of `fixed_run`'s card, as the card printed it when its columns,
# figures and plots were still tables in moeify/hub/card.py and moeify/hub/plots.py.
HEALTH_TEXT = r"""## Routing health

Diagnostics of 12 optimizer steps (3 observations) of moeify's routing monitors:

- dead experts now: 1
- deadlocked layers now: 1 (model.layers.1.mlp)
- smallest ecology number E = T·H/(O+B): 0.4321 (the ecology paper reports E ≥ 0.5 as sufficient for no dead experts; below it, it predicts nothing)
- soft-saturated layers: 1, saturated (one-hot) layers: 0
- layers whose experts stayed clones: 2
- layers whose shared experts matured: 1

| layer | load cv | max/mean load | entropy | dead experts | ever dead | deadlocked | shared/routed | ecology E | expert spread | feedback kappa | imbalance warnings |
|---|---|---|---|---|---|---|---|---|---|---|---|
| `model.layers.0.mlp` | 0.312 | 1.75 | 0.912 | 0 | 2 (1, 3) | no | 0.5 | ∞ | 1e-09 | 0.5 | 0 |
| `model.layers.1.mlp` | 1 | 3 | 0.12 | 1 | 0 | **yes** | 2 | 0.432 | – | ∞ | 2 (4, 9) |

### Events

- step 1, `model.layers.0.mlp`, **revived**: e1 \| back
- step 2, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 2, `model.layers.0.mlp`, **revived**: e2 \| back
- step 3, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 3, `model.layers.0.mlp`, **revived**: e3 \| back
- step 3, `model.layers.1.mlp`, **soft_saturation_ended**: x
- step 4, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 4, `model.layers.0.mlp`, **revived**: e4 \| back
- step 5, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 5, `model.layers.0.mlp`, **revived**: e5 \| back
- step 6, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 6, `model.layers.0.mlp`, **revived**: e6 \| back
- step 7, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 7, `model.layers.0.mlp`, **revived**: e7 \| back
- step 8, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 8, `model.layers.0.mlp`, **revived**: e8 \| back
- step 9, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 9, `model.layers.0.mlp`, **revived**: e9 \| back
- step 10, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all
- step 11, `model.layers.1.mlp`, **deadlocked**: expert 0 &lt;- all

- … and 3 more in [diagnostics/events.jsonl](diagnostics/events.jsonl)

### Plots

![Expert load share per layer and expert over training](diagnostics/load_heatmap.png)

![Router entropy per layer over training](diagnostics/entropy.png)

![Deadlock map: the top expert's share of its maximum over depth and time](diagnostics/deadlock_map.png)

The raw records are in [diagnostics/history.jsonl](diagnostics/history.jsonl),
[diagnostics/events.jsonl](diagnostics/events.jsonl) and
[diagnostics/summary.json](diagnostics/summary.json).
"""
HEALTH_YAML = """  routing_health:
    steps: 12
    observations: 3
    moe_layers: 2
    dead_experts: 1
    deadlocked_layers:
    - model.layers.1.mlp
    ecology_E_min: 0.4321
    shared_matured_layers: 1
    ever_deadlocked_fraction: 0.5
    deadlock_u_thirds: 0.25
    deadlock_u_thirds_interval:
    - 0.1235
    - 0.75
    soft_saturated_layers: 1
    saturated_layers: 0
    homogeneous_layers: 2
    imbalance_warned_layers: 1
    feedback_kappa_max: 0.9877
    lost_update_fraction: 0.0
    events:
      revived: 12
      deadlocked: 10
      soft_saturation_ended: 1"""


def card_of_fixed_run() -> str:
    torch.manual_seed(0)
    model = moeify.moeify(AutoModelForCausalLM.from_config(llama_config(head_dim=8)), num_experts=4, top_k=2, seed=1)
    return str(moeify.model_card(model, run=fixed_run()))


def test_card_health_section_is_pinned() -> None:
    text = card_of_fixed_run()
    yaml = text[text.index("  routing_health:") : text.index("\n---", 4)]
    assert text[text.index("## Routing health") :] == HEALTH_TEXT
    assert yaml == HEALTH_YAML


def test_card_of_a_real_run_has_every_built_in_column(trained_run) -> None:
    health = routing_health(trained_run)
    assert health["headers"] == [
        "layer",
        "load cv",
        "max/mean load",
        "entropy",
        "dead experts",
        "ever dead",
        "deadlocked",
        "shared/routed",
        "ecology E",
        "expert spread",
        "feedback kappa",
        "imbalance warnings",
    ]
    assert "–" not in {cell for row in health["rows"] for cell in row}
    assert list(health["yaml"])[:4] == ["steps", "observations", "moe_layers", "dead_experts"]
    assert health["yaml"]["steps"] == 30 and health["yaml"]["lost_update_fraction"] == 0.0
    assert expected_plots(trained_run) == ["load_heatmap.png", "entropy.png", "deadlock_map.png"]


# ---------------------------------------------------------------------------------------------
# Every declared key exists in what the monitor produces


def missing_keys(monitor: type[Monitor], name: str, run: dict) -> list[str]:
    """The declarations of `monitor` (registered as `name`) that the run's summary or per-step
    metrics do not produce, as readable strings."""
    summary = run["summary"]["monitors"][name]
    per_layer = summary.get("layers", summary)
    layers = [layer for layer in run["summary"]["layers"] if layer in per_layer]
    observed = [
        metrics for record in run["history"] for layer, metrics in record["monitors"][name].items() if layer != "model"
    ]
    missing = []

    def check_layer_key(what: str, key: str, last_key: str | None) -> None:
        if not layers or any(key not in per_layer[layer] for layer in layers):
            missing.append(f"{what}: key {key!r} not in every layer's summary")
        if last_key is not None and not any(last_key in metrics for metrics in observed):
            missing.append(f"{what}: last_key {last_key!r} in no observe() metrics")

    for column in monitor.card_columns:
        check_layer_key(f"column {column.title!r}", column.key, column.last_key)
    for figure in monitor.card_figures:
        if figure.key:
            check_layer_key(f"figure {figure.name!r}", figure.key, figure.last_key)
            continue
        value = summary
        for key in figure.path:
            if not isinstance(value, dict) or key not in value:
                missing.append(f"figure {figure.name!r}: path {figure.path} not in the summary")
                break
            value = value[key]
    for plot in monitor.card_plots:
        key = plot.metric if plot.style == "lines" else f"{plot.metric}0"
        if not any(key in metrics for metrics in observed):
            missing.append(f"plot {plot.file!r}: metric {key!r} in no observe() metrics")
    return missing


def declaring() -> list[str]:
    import moeify.control  # noqa: F401 - registers the remedies too

    return [
        name
        for name in monitor_names()
        if any(getattr(monitor_class(name), a) for a in ("card_columns", "card_figures", "card_plots"))
    ]


@pytest.fixture(scope="module")
def trained_run() -> dict:
    """Every registered monitor that declares anything for the card, 30 steps of a 4-layer Llama
    with a shared expert (the imbalance monitor's kappa needs 16 observations)."""
    from moeify.monitors import LostUpdates

    model = monitored_llama(num_shared_experts=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    special = {"lost_updates": lambda: LostUpdates(optimizer, model=model)}  # needs the optimizer
    names = sorted(declaring(), key=lambda n: (n == "shared_maturity", n))  # maturity after deadlock
    runner = attach_monitors(model, [special[n]() if n in special else n for n in names])
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = torch.randint(3, 100, (2, 8), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
    runner.close()
    return {"history": list(runner.history), "events": list(runner.events), "summary": runner.summary()}


def test_the_built_in_monitors_declare_the_card() -> None:
    assert set(declaring()) >= {
        "expert_load",
        "router_entropy",
        "dead_experts",
        "deadlock",
        "shared_maturity",
        "ecology",
        "expert_homogenization",
        "imbalance_early_warning",
        "lost_updates",
    }


@pytest.mark.parametrize("name", declaring())
def test_declared_card_keys_exist_in_the_summary(trained_run, name: str) -> None:
    assert missing_keys(monitor_class(name), name, trained_run) == []


def test_a_renamed_summary_key_is_caught(trained_run) -> None:
    from moeify.monitors import ExpertLoad

    class Renamed(ExpertLoad):
        card_columns = (CardColumn("load cv", "load_cv", last_key="load_cv"),)
        card_figures = (CardFigure("cv_max", path=("model", "cv_max")), CardFigure("n", key="cv", reduce="count"))
        card_plots = (CardPlot("load.png", "load", style="lines", metric="load"),)

    assert missing_keys(Renamed, "expert_load", trained_run) == [
        "column 'load cv': key 'load_cv' not in every layer's summary",
        "column 'load cv': last_key 'load_cv' in no observe() metrics",
        "figure 'cv_max': path ('model', 'cv_max') not in the summary",
        "plot 'load.png': metric 'load' in no observe() metrics",
    ]


# ---------------------------------------------------------------------------------------------
# A new monitor reaches the card by its declarations alone


class Spread(Monitor):
    name = "test_spread"
    card_columns = (CardColumn("spread", "spread", last_key="spread"), CardColumn("flagged", "flag", format="flag"))
    card_figures = (
        CardFigure("spread_max", path=("model", "spread_max")),
        CardFigure("flagged_layers", key="flag", reduce="layers"),
    )
    card_plots = (CardPlot("spread.png", "Spread per layer", style="lines", metric="spread"),)
    resolved_events = ("spread_ended",)


def test_a_new_monitor_appears_on_the_card(tmp_path) -> None:
    from moeify.monitors import base

    run = fixed_run()
    for record in run["history"]:
        record["monitors"]["test_spread"] = {L0: {"spread": 0.25 * record["step"]}}
    run["summary"]["monitors"]["test_spread"] = {
        "model": {"spread_max": 0.75},
        "layers": {L0: {"spread": 0.75, "flag": True}},
    }
    run["events"] = [{"step": 1, "layer": L0, "kind": "spread_ended", "detail": "a"}] + [
        {"step": s, "layer": L1, "kind": "spread_started", "detail": "b"} for s in range(2, 22)
    ]
    base.register_monitor("test_spread", Spread)
    try:
        health = routing_health(run)
        plots = expected_plots(run)
        pytest.importorskip("matplotlib")
        from moeify.hub.plots import routing_plots

        written = [p.name for p in routing_plots(run, tmp_path)]
    finally:
        base._MONITORS.unregister("test_spread")
    assert health["headers"][-2:] == ["spread", "flagged"]
    assert [row[-2:] for row in health["rows"]] == [["0.75", "**yes**"], ["–", "–"]]
    yaml = health["yaml"]
    assert list(yaml)[-3:] == ["spread_max", "flagged_layers", "events"]
    assert yaml["spread_max"] == 0.75 and yaml["flagged_layers"] == [L0]
    # 21 events, 20 shown: the resolved one is left out.
    assert [e["kind"] for e in health["events"]] == ["spread_started"] * 20 and health["more_events"] == 1
    assert plots == ["load_heatmap.png", "entropy.png", "deadlock_map.png", "spread.png"]
    assert written == plots


def test_declarations_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        CardColumn("a", "a", format="percent")
    with pytest.raises(ValueError, match="either a summary path or a per-layer key"):
        CardFigure("a", path=("model", "a"), key="a", reduce="sum")
    with pytest.raises(ValueError, match="reduce must be one of"):
        CardFigure("a", key="a", reduce="mean")
    with pytest.raises(ValueError, match="needs a per-layer key"):
        CardFigure("a", path=("model", "a"), reduce="sum")
    with pytest.raises(ValueError, match="style must be one of"):
        CardPlot("a.png", "a", style="bars", metric="a")
    with pytest.raises(ValueError, match="plain name ending in .png"):
        CardPlot("diagnostics/a.png", "a", style="lines", metric="a")
