"""The shared helpers every part reads a converted model with (moeify.layers.inventory), the one
version source, the one all-reduce of counts, and the expert-weight reader registry of the
homogenization monitor (peft's reader is found without importing moeify.integrations.peft first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from core_helpers import tiny_llama
from torch import nn

import moeify
import moeify.convert
from moeify.layers import inventory
from moeify.layers.stats import sum_over_ranks
from moeify.monitors import homogenization
from moeify.monitors.homogenization import expert_weights, register_expert_weight_reader

ROOT = Path(__file__).resolve().parents[1]


def test_inventory_counts_and_errors() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, seed=0)
    layers = inventory.require_moe_layers(model)
    assert [name for name, _ in layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert moeify.convert.moe_layers is inventory.moe_layers and moeify.moe_layers is inventory.moe_layers
    assert moeify.convert.parameter_counts(model) == inventory.parameter_counts(model)
    assert inventory.peft_module_name(model) is None
    with pytest.raises(ValueError, match=r"^apply_expert_parallel: Linear has no moeify MoE layers: call moeify"):
        inventory.require_moe_layers(nn.Linear(2, 2), "apply_expert_parallel")
    assert [inventory.human(n) for n in (1_240_000_000, 135_000_000, 4_100, 512)] == [
        "1.24B",
        "135.00M",
        "4.10K",
        "512",
    ]


def test_version_has_one_source() -> None:
    from moeify._version import __version__

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moeify._version.__version__"}
    assert moeify.__version__ == __version__ == "0.1.0"


def test_sum_over_ranks_is_a_no_op_on_one_process() -> None:
    counts = torch.tensor([2**24 + 1, 3], dtype=torch.int64)
    sum_over_ranks(counts)
    assert counts.tolist() == [2**24 + 1, 3] and counts.dtype == torch.int64


def test_expert_weight_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(homogenization, "_READERS", homogenization._READERS.copy())
    experts = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, seed=0).model.layers[0].mlp.experts
    plain = expert_weights(experts)
    assert [tuple(w.shape) for w in plain] == [(4, 2 * 64 * 32), (4, 32 * 64)]

    def halved(module: nn.Module) -> list[torch.Tensor]:
        return [w / 2 for w in plain]

    register_expert_weight_reader(lambda module: module is experts, halved)
    assert all(torch.equal(a, b / 2) for a, b in zip(expert_weights(experts), plain))
    with pytest.raises(ValueError, match="is already registered"):
        register_expert_weight_reader(lambda module: True, halved)
    with pytest.raises(TypeError, match="predicate and reader must be callables, got int, function"):
        register_expert_weight_reader(1, halved)


def test_peft_experts_are_read_with_their_adapters_without_importing_the_glue() -> None:
    """A LoRA built by hand (no moeify.integrations.peft import): the monitor still reads W + ΔW."""
    code = """
import sys, torch
from core_helpers import tiny_llama
from peft import LoraConfig, get_peft_model
import moeify
from moeify.monitors.homogenization import expert_weights
model = moeify.moeify(tiny_llama(), num_experts=4, top_k=2, seed=0)
plain = [w.clone() for w in expert_weights(model.model.layers[0].mlp.experts)]
names = ["model.layers.0.mlp.experts.w_in", "model.layers.0.mlp.experts.w_out"]
config = LoraConfig(r=2, target_modules=[], target_parameters=names, init_lora_weights=False)
peft_model = get_peft_model(model, config)
assert "moeify.integrations.peft" not in sys.modules
read = expert_weights(peft_model.get_submodule("base_model.model.model.layers.0.mlp.experts"))
assert "moeify.integrations.peft" in sys.modules
assert [w.shape for w in read] == [w.shape for w in plain]
assert all(not torch.equal(a, b) for a, b in zip(read, plain))  # B != 0: the adapters count
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "tests", timeout=300)
