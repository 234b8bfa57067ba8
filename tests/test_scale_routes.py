"""The route from a moeify model to transformers' own expert parallelism (integrations/SCALING.md):
`moeify.export` to Mixtral / Qwen2-MoE / Qwen3-MoE, then `from_pretrained(...,
distributed_config=DistributedConfig(ep_size=2, ...))` on 2 gloo ranks, with FSDP2 or tensor
parallelism on the dense weights. Checked against one process: the logits of the moeify model,
each rank's half of the experts, and the experts' gradients of the natively loaded model. The
launched script: tests/dist_scripts/hf_ep_route.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))

from hf_ep_route import FORMATS, LAYOUTS  # noqa: E402
from test_distributed import torchrun  # noqa: E402
from test_export import convert_and_train, tiny, tokens  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES  # noqa: E402

import moeify  # noqa: E402

BASE = {"mixtral": "llama", "qwen2_moe": "llama", "qwen3_moe": "qwen3"}
SHARED = {"mixtral": 0, "qwen2_moe": 2, "qwen3_moe": 0}  # Qwen2-MoE carries moeify's shared experts
EXPERTS, WORLD = 4, 2
# fp32 throughout; measured at most 1.8e-7 on the logits (scale 0.7) and 2.3e-9 on the expert
# gradients (scale 6e-3), over the three formats and both layouts: the ranks sum the same
# products in another order.
LOGITS_ATOL, GRAD_ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    """One trained moeify model per format, exported; the single-process references."""
    out = tmp_path_factory.mktemp("hf_ep")
    ids_BS = tokens(seed=2)
    torch.save(ids_BS, out / "inputs.pt")
    references = {}
    for fmt in FORMATS:
        model = convert_and_train(tiny(BASE[fmt]), num_experts=EXPERTS, num_shared_experts=SHARED[fmt])
        moeify.export(model, out / fmt, fmt)
        with torch.no_grad():
            logits_BSV = model.eval()(input_ids=ids_BS).logits
        native = AutoModelForCausalLM.from_pretrained(out / fmt).train()
        native(input_ids=ids_BS, labels=ids_BS).loss.backward()
        references[fmt] = {
            "logits": logits_BSV,
            "layers": [layer.mlp.experts for layer in native.model.layers],
        }
    return out, references


@pytest.fixture(scope="module")
def ranks(exported) -> list[dict]:
    out, _ = exported
    return torchrun("hf_ep_route.py", out, world=WORLD)


def test_the_launch_is_two_gloo_ranks(ranks):
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_equal_the_moeify_model(exported, ranks, fmt, layout):
    want_BSV = exported[1][fmt]["logits"]
    for rank, record in enumerate(ranks):
        got_BSV = record[fmt][layout]["logits"]
        rows = want_BSV[rank : rank + 1] if layout == "fsdp" else want_BSV  # FSDP: each rank its own row
        assert got_BSV.shape == rows.shape
        assert (got_BSV - rows).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rank_holds_its_half_of_the_experts(exported, ranks, fmt, layout):
    """Rank r holds experts [2r, 2r + 2) of every layer, exactly the exported ones, and their
    gradient after one backward of the LM loss equals one process's on the whole batch."""
    per_rank = EXPERTS // WORLD
    for rank, record in enumerate(ranks):
        got = record[fmt][layout]
        assert got["num_experts"] == [per_rank] * len(exported[1][fmt]["layers"])
        for index, want in enumerate(exported[1][fmt]["layers"]):
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            assert torch.equal(got["gate_up_proj"][index], want.gate_up_proj.detach()[mine])
            assert torch.equal(got["down_proj"][index], want.down_proj.detach()[mine])
            grad_EID = got["gate_up_proj_grad"][index]
            assert grad_EID.shape == (per_rank, *want.gate_up_proj.shape[1:])
            assert (grad_EID - want.gate_up_proj.grad[mine]).abs().max().item() <= GRAD_ATOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_exported_model_matches_every_rule_of_its_ep_plan(exported, fmt):
    """The config class's `base_model_ep_plan` names the exported model's experts (a rule that
    matches nothing is only warned about by transformers, and those experts would stay whole)."""
    config = AutoConfig.from_pretrained(exported[0] / fmt)
    plan = type(config).base_model_ep_plan
    assert plan["layers.*.mlp.experts"] == "ep_dispatch_experts"
    assert set(plan.values()) <= set(ALL_PARALLEL_STYLES)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    named = [*model.base_model.named_modules(), *model.base_model.named_parameters()]
    assert set(plan) <= {re.sub(r"\.\d+\.", ".*.", name) for name, _ in named}


def test_what_the_distributed_config_needs():
    """`enable_expert_parallel=True` alone sets ep_size = tp_size = 1 (no sharding at all), and
    `ep_size` needs a dense layout it divides: the checks SCALING.md's launch lines follow."""
    assert DistributedConfig(enable_expert_parallel=True).ep_size == 1
    with pytest.raises(ValueError, match=r"`ep_size` must divide `fsdp_size \* tp_size`"):
        DistributedConfig(ep_size=2)
    for layout in LAYOUTS.values():
        config = DistributedConfig(**layout)
        assert config.ep_size == 2 and config.efsdp_size == 1  # every expert whole on one rank
