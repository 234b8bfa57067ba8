"""Routing plots render from a run's records, with or without the optional monitors."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from moeify.hub.plots import routing_plots

PNG = b"\x89PNG\r\n\x1a\n"


def _record(step, share_layer1, with_entropy):
    monitors = {
        "expert_load": {
            "a.0.mlp": {"cv": 0.0, "top_k": 2.0, **{f"share_{e}": 0.25 for e in range(4)}},
            "a.1.mlp": {"cv": 1.0, "top_k": 2.0, **{f"share_{e}": s for e, s in enumerate(share_layer1)}},
        }
    }
    if with_entropy:
        monitors["router_entropy"] = {"a.0.mlp": {"entropy": 0.9}, "a.1.mlp": {"entropy": 0.1}}
    return {"step": step, "monitors": monitors, "events": []}


@pytest.mark.parametrize("with_entropy", [True, False])
def test_routing_plots_write_pngs(tmp_path, with_entropy):
    history = [_record(s, [0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3], with_entropy) for s in range(1, 6)]
    events = [{"step": 3, "monitor": "deadlock", "layer": "a.1.mlp", "kind": "deadlocked", "detail": "expert 0"}]
    written = routing_plots({"history": history, "events": events}, tmp_path)
    names = sorted(p.name for p in written)
    expected = ["deadlock_map.png", "load_heatmap.png"] + (["entropy.png"] if with_entropy else [])
    assert names == sorted(expected)
    for path in written:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_empty_run_writes_nothing(tmp_path):
    assert routing_plots({"history": [], "events": []}, tmp_path) == []
