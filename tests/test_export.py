"""moeify.export: trained moeify models → native transformers MoE checkpoints that plain
`AutoModelForCausalLM.from_pretrained` loads with the same logits; refusals leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify.hub import export as export_module
from moeify.hub.export import ExportError, export

VOCAB, SEQ = 100, 12
DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
NATIVE = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def tiny(model_type: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **DECODER | extra)).float()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def convert_and_train(model: nn.Module, steps: int = 2, **overrides) -> nn.Module:
    """Convert, then take optimizer steps on loss + aux loss so routers, experts and shared experts
    all move away from their init (experts stop being clones of the dense FFN)."""
    moeify.moeify(model, **{"num_experts": 4, "top_k": 2, "seed": 0} | overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = tokens()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def assert_matches_native(model: nn.Module, directory, fmt: str, implementation: str | None = None) -> float:
    kwargs = {} if implementation is None else {"experts_implementation": implementation}
    native = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    assert type(native).__name__ == NATIVE[fmt]
    ids = tokens(seed=2)
    diff = (logits(native, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(native.generate(ids, **greedy), model.generate(ids, **greedy))
    return diff


# (base, format, conversion overrides, base config extras): every pair that maps exactly.
CASES = [
    ("llama", "mixtral", {"num_shared_experts": 0}, {}),
    ("mistral", "mixtral", {"num_shared_experts": 0}, {"sliding_window": 4}),  # windowed attention, uniform
    ("llama", "qwen2_moe", {"num_shared_experts": 2}, {}),
    ("mistral", "qwen2_moe", {"num_shared_experts": 1}, {"sliding_window": 4}),
    ("qwen2", "qwen2_moe", {"num_shared_experts": 1}, {}),
    (
        "qwen2",
        "qwen2_moe",
        {"num_shared_experts": 0},
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    ("qwen3", "qwen3_moe", {"num_shared_experts": 0}, {}),
    ("llama", "qwen2_moe", {"num_shared_experts": 1, "layers": [1]}, {"tie_word_embeddings": True}),  # layer 0 dense
    ("qwen3", "qwen3_moe", {"num_shared_experts": 0, "layers": [0]}, {}),  # layer 1 stays dense
    ("llama", "mixtral", {"num_shared_experts": 0, "router_temperature": 2.0}, {}),  # folds exactly
]


@pytest.mark.parametrize(("base", "fmt", "overrides", "extra"), CASES, ids=lambda v: str(v))
def test_export_loads_natively_with_equal_logits(tmp_path, base, fmt, overrides, extra):
    model = convert_and_train(tiny(base, **extra), **overrides)
    directory = export(model, tmp_path / "out", fmt)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == fmt and "auto_map" not in config
    assert_matches_native(model, directory, fmt)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_matches(tmp_path, implementation):
    model = convert_and_train(tiny("llama"), num_shared_experts=2)
    directory = export(model, tmp_path / "out", "qwen2_moe")
    assert_matches_native(model, directory, "qwen2_moe", implementation)


def test_shared_experts_that_output_zero_export_to_mixtral(tmp_path):
    """zero_out shared experts add exactly nothing until trained: Mixtral can drop them."""
    model = tiny("llama")
    moeify.moeify(model, num_experts=4, top_k=2, num_shared_experts=1, shared_expert_init="zero_out")
    with torch.no_grad():  # train the routed side only
        for _, layer in moeify.moe_layers(model):
            layer.router.gate.weight.normal_(std=1.0)
            layer.experts.w_in.add_(torch.randn_like(layer.experts.w_in) * 0.1)
    assert_matches_native(model, export(model, tmp_path / "out", "mixtral"), "mixtral")


def test_the_qwen2_moe_shared_expert_is_one_doubled_mlp_behind_a_half_gate(tmp_path):
    model = convert_and_train(tiny("llama"), num_shared_experts=2)
    native = export_module._build_native(model, "qwen2_moe")
    ours = model.model.layers[0].mlp.shared_experts
    theirs = native.model.layers[0].mlp
    assert theirs.shared_expert.gate_proj.weight.shape == (2 * 64, 32)
    assert torch.equal(theirs.shared_expert_gate.weight, torch.zeros(1, 32))
    assert torch.equal(theirs.shared_expert.down_proj.weight[:, :64], 2 * ours.w_out[0].detach())
    x = torch.randn(5, 32)
    with torch.no_grad():
        gated = torch.sigmoid(theirs.shared_expert_gate(x)) * theirs.shared_expert(x)
        assert (gated - ours.forward_all(x)).abs().max() <= 1e-6


def refused(tmp_path, model: nn.Module, fmt: str, match: str, **kwargs) -> None:
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ExportError, match=match):
        export(model, tmp_path / "out", fmt, **kwargs)
    assert sorted(tmp_path.iterdir()) == before  # no directory, no temporary leftovers


def test_refuses_mlp_router(tmp_path):
    refused(
        tmp_path, convert_and_train(tiny("llama"), router="mlp", num_shared_experts=0), "mixtral", "MlpRouter|linear"
    )


def test_refuses_unsupported_base(tmp_path):
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    )
    moeify.moeify(gpt2, num_experts=4, top_k=2)
    refused(tmp_path, gpt2, "mixtral", "model_type='gpt2'.*not supported")


def test_refuses_nonzero_shared_experts_where_the_format_has_none(tmp_path):
    model = convert_and_train(tiny("llama"), num_shared_experts=1)
    refused(tmp_path, model, "mixtral", "shared expert.*qwen2_moe")
    refused(tmp_path, convert_and_train(tiny("qwen3"), num_shared_experts=1), "qwen3_moe", "no shared expert")


def test_refuses_a_temperature_that_does_not_fold_exactly(tmp_path):
    model = convert_and_train(tiny("llama"), num_shared_experts=0, router_temperature=1.5)
    refused(tmp_path, model, "mixtral", "router_temperature=1.5")


def test_refuses_dense_layers_in_mixtral(tmp_path):
    model = convert_and_train(tiny("llama"), num_shared_experts=0, layers=[0])
    refused(tmp_path, model, "mixtral", r"layers \[1\] were left dense")


@pytest.mark.parametrize(
    ("base", "fmt", "match"),
    [
        ("qwen3", "mixtral", "q_norm"),  # Qwen3's per-head q/k norms
        ("qwen3", "qwen2_moe", "q_norm"),
        ("llama", "qwen3_moe", "q_norm"),  # Qwen3-MoE needs q/k norms the base lacks
        ("qwen2", "mixtral", "q_proj.bias"),  # trained q/k/v biases
    ],
)
def test_refuses_attention_the_format_cannot_hold(tmp_path, base, fmt, match):
    refused(tmp_path, convert_and_train(tiny(base), num_shared_experts=0), fmt, match)


def test_refuses_per_layer_windows_in_a_uniform_format(tmp_path):
    extra = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    refused(tmp_path, convert_and_train(tiny("qwen2", **extra), num_shared_experts=0), "mixtral", "windows")


def test_refuses_expert_biases_foreign_activations_and_ungated_experts(tmp_path):
    refused(
        tmp_path, convert_and_train(tiny("llama", mlp_bias=True), num_shared_experts=0), "mixtral", "nonzero biases"
    )
    model = convert_and_train(tiny("llama"), num_shared_experts=0)
    model.model.layers[1].mlp.experts.act = nn.GELU()
    refused(tmp_path, model, "mixtral", "activation GELU")
    model.model.layers[0].mlp.experts.gated = False  # an act(W x) MLP layout
    refused(tmp_path, model, "mixtral", "non-gated")


def test_refuses_unknown_format_unconverted_model_and_occupied_directory(tmp_path):
    model = convert_and_train(tiny("llama"), num_shared_experts=0)
    refused(tmp_path, model, "deepseek_v3", "unknown format")
    refused(tmp_path, tiny("llama"), "mixtral", "no moeify MoE layers")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    refused(tmp_path, model, "mixtral", "not empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    export(model, tmp_path / "out", "mixtral", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_logit_check_writes_nothing_and_keeps_routing_state(tmp_path, monkeypatch):
    model = convert_and_train(tiny("llama"), num_shared_experts=0)
    model.train()
    counts = [layer.tokens_per_expert.clone() for _, layer in moeify.moe_layers(model)]
    export(model, tmp_path / "ok", "mixtral")  # the real check ran a forward
    assert all(torch.equal(c, layer.tokens_per_expert) for c, (_, layer) in zip(counts, moeify.moe_layers(model)))
    assert model.training
    monkeypatch.setattr(export_module, "_max_logit_diff", lambda model, directory: (1.0, 1.0))
    refused(tmp_path, model, "mixtral", "logits differ")


# ---------------------------------------------------------------------------------------------
# The format registry: a format registered outside moeify exports through its own handler.


@pytest.fixture
def registry(monkeypatch):
    """The export-format registry, restored after the test (formats registered in it vanish)."""
    from moeify.hub.formats import base

    monkeypatch.setattr(base, "_FORMATS", base._FORMATS.copy())
    return base


def register_toy(registry) -> list[str]:
    """A format named 'toy_moe' written as a Mixtral checkpoint, holding at most 4 experts; returns
    the MoE prefixes its tensor mapping is asked for."""
    asked: list[str] = []

    @moeify.register_export_format("toy_moe")
    class ToyMoe(registry.ExportFormat):
        model_type = "mixtral"

        def refusal(self, name, layer):
            return f"{name} has {layer.num_experts} experts; toy_moe holds 4" if layer.num_experts > 4 else None

        def config_fields(self, source):
            shape = source.shape
            return {
                "num_local_experts": shape.num_experts,
                "intermediate_size": shape.intermediate_size,
                "router_aux_loss_coef": 0.25,  # visible in config.json, no effect on the logits
            }

        def moe_tensors(self, prefix, layer, dtype):
            asked.append(prefix)
            return super().moe_tensors(prefix, layer, dtype)

    return asked


def test_a_registered_format_exports_through_its_handler(tmp_path, registry):
    from moeify.cli import build_parser

    asked = register_toy(registry)
    assert build_parser().parse_args(["export", "a", "b", "--format", "toy_moe"]).format == "toy_moe"
    model = convert_and_train(tiny("llama"), num_shared_experts=0)
    directory = export(model, tmp_path / "written", "toy_moe")
    assert asked == ["model.layers.0.mlp", "model.layers.1.mlp"]
    config = json.loads((directory / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["router_aux_loss_coef"]) == ("mixtral", 4, 0.25)
    assert assert_matches_native(model, directory, "mixtral") <= 1e-5
    # Its refusal runs before anything is written; the shared refusals name it only where it fits.
    refused(tmp_path, convert_and_train(tiny("llama"), num_experts=8, num_shared_experts=0), "toy_moe", "holds 4")
    dense_layer = convert_and_train(tiny("llama"), num_shared_experts=0, layers=[0])
    refused(tmp_path, dense_layer, "toy_moe", r"format='qwen2_moe' / 'qwen3_moe' \(they hold dense layers")
    refused(tmp_path, model, "gpt9", r"supported formats: \['mixtral', 'qwen2_moe', 'qwen3_moe', 'toy_moe'\]")


def test_registering_a_format_twice_or_not_a_format_is_refused(registry):
    mixtral = registry.export_format("mixtral")
    with pytest.raises(ValueError, match="export format named 'mixtral' is already registered"):
        moeify.register_export_format("mixtral")
    with pytest.raises(ValueError, match="an identifier"):
        moeify.register_export_format("toy moe")
    with pytest.raises(TypeError, match="ExportFormat subclass"):
        moeify.register_export_format("toy_moe")(dict)
    assert registry.export_format("mixtral") is mixtral
    assert registry.export_format_names() == ("mixtral", "qwen2_moe", "qwen3_moe")
