"""Every bad input gets a clear, actionable error, and the model is untouched afterwards: the same
module types, every state_dict tensor equal, no `moeify_state`, no parameter left sharing storage
with a half-built MoE layer."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from core_helpers import GatedMLP, Stack, assert_untouched, llama_config, snapshot, stack_input, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

import moeify
from moeify import (
    ConversionError,
    FFNLayout,
    MoeLayer,
    find_ffns,
    moe_layers,
    register_conditioning,
    register_ffn,
    register_router,
    register_skip,
)
from moeify.architectures import registry
from moeify.architectures.transformers import LLAMA_STYLE
from moeify.layers.routers import base as router_base
from moeify.layers.routers.linear import LinearRouter


@pytest.mark.parametrize("bad", ["meta-llama/Llama-3.2-1B", {"weight": torch.zeros(2)}, None])
def test_not_a_module(bad) -> None:
    with pytest.raises(TypeError, match=rf"moeify expects a torch.nn.Module, got {type(bad).__name__}"):
        moeify.moeify(bad)
    with pytest.raises(TypeError, match=rf"find_ffns expects a torch.nn.Module, got {type(bad).__name__}"):
        find_ffns(bad)


class NoFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


def test_nothing_matches_lists_classes_and_target_modules_usage() -> None:
    model = NoFFN()
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model)
    message = str(error.value)
    assert "moeify found no FFN to convert in NoFFN" in message
    assert "Module classes seen: Embedding, LayerNorm, Linear, NoFFN." in message
    assert "target_modules=['mlp']" in message and "regex" in message
    assert isinstance(error.value, ValueError)  # ConversionError is a ValueError
    assert_untouched(model, before)


def test_target_modules_matching_nothing() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model, target_modules=["feed_forward"])
    message = str(error.value)
    assert (
        "found 2 FFN(s) in LlamaForCausalLM, but target_modules / exclude_modules / layers leave every one dense"
        in message
    )
    assert "model.layers.0.mlp [LlamaMLP]: not selected by target_modules" in message
    assert "LlamaMLP" in message.split("Module classes seen:")[1]  # the class to name instead
    assert_untouched(model, before)


def test_target_modules_naming_a_non_ffn() -> None:
    """Attention is no token-wise FFN. Its forward needs position embeddings but declares them
    optional, so the signature cannot tell; the identity check's call fails, and says so."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model, target_modules=["self_attn"])
    message = str(error.value)
    assert message.startswith(
        "model.layers.0.self_attn: the identity check could not run the FFN on tokens shaped (2, 8, 32)"
    )
    assert "not a token-wise FFN" in message
    assert_untouched(model, before)


def test_target_modules_naming_a_module_with_two_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * scale

    model = Stack(TwoInputs())
    before = snapshot(model)
    with pytest.raises(
        ConversionError, match=r"layers.0.mlp \[TwoInputs\]: targeted, but its forward takes \['x', 'scale'\]"
    ):
        moeify.moeify(model, target_modules=["mlp"])
    assert_untouched(model, before)


def test_cross_attention_router_without_conditioning() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model, router="cross_attention")
    message = str(error.value)
    assert "LlamaForCausalLM.forward has no `encoder_hidden_states` argument" in message
    assert "router='linear' or router='mlp'" in message
    assert_untouched(model, before)


def test_cross_attention_router_without_conditioning_dim() -> None:
    """A forward with the argument but no registered feature size: asks for conditioning_dim."""

    class Conditioned(Stack):
        def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(x)

    model = Conditioned(GatedMLP())
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"pass conditioning_dim=<size of its last dimension>"):
        moeify.moeify(model, router="cross_attention")
    assert_untouched(model, before)
    moeify.moeify(model, router="cross_attention", conditioning_dim=12, router_num_heads=2)
    layer = model.layers[0].mlp
    assert isinstance(layer, MoeLayer) and layer.router.to_k.in_features == 12


def test_already_converted_is_refused() -> None:
    model = moeify.moeify(tiny_llama(), num_experts=4)
    before = snapshot(model)
    with pytest.raises(
        ConversionError, match=r"already converted by moeify \(2 MoE layer\(s\), e.g. model.layers.0.mlp\)"
    ):
        moeify.moeify(model)
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp is already converted by moeify"):
        moeify.moeify(model, target_modules=["layers.1.mlp"])
    with pytest.raises(ConversionError, match="already a moeify MoE layer"):
        moeify.moeify(model.model.layers[0].mlp)
    assert [(name, type(m).__name__) for name, m in model.named_modules()] == before.types
    assert all(torch.equal(v, before.state[k]) for k, v in model.state_dict().items())
    assert len(model.moeify_state.conversions) == 1


def test_peft_adapter_on_the_mlp_is_refused() -> None:
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["up_proj"]))
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model)
    message = str(error.value)
    assert "base_model.model.model.layers.0.mlp holds a peft adapter (Linear at up_proj)" in message
    assert "would drop the adapter" in message and "merge_and_unload()" in message
    assert_untouched(model, before)


def test_meta_model_needs_verify_false() -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config())
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp is on the meta device.*pass verify=False"):
        moeify.moeify(model, num_experts=4)
    assert_untouched(model, before)
    moeify.moeify(model, num_experts=4, verify=False)
    layers = moe_layers(model)
    assert [name for name, _ in layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    experts = layers[0][1].experts
    assert experts.w_in.is_meta and tuple(experts.w_in.shape) == (4, 128, 32)
    assert layers[0][1].router.gate.weight.is_meta
    assert model.moeify_state.config.verify is False


@pytest.fixture
def isolated_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it (the tables are module globals)."""
    monkeypatch.setattr(registry, "_FFN", registry._FFN.copy())
    monkeypatch.setattr(registry, "_SKIP", registry._SKIP.copy())
    monkeypatch.setattr(registry, "_CONDITIONING", registry._CONDITIONING.copy())
    monkeypatch.setattr(router_base, "_ROUTERS", router_base._ROUTERS.copy())


class SwappedMLP(GatedMLP):
    """Computes like GatedMLP; registered below with its gate and up projections swapped."""


SWAPPED = FFNLayout("gated", proj_gate="up_proj", proj_in="gate_proj", proj_out="down_proj", act="act_fn")


def _measured(message: str) -> float:
    found = re.search(r"max \|moe - dense\| is ([0-9.e+-]+) of the output scale", message)
    assert found, message
    return float(found.group(1))


@pytest.mark.usefixtures("isolated_registries")
def test_wrong_layout_fails_the_identity_check() -> None:
    register_ffn(SwappedMLP, SWAPPED)
    torch.manual_seed(0)
    # Block 0 (dataflow, right) is built and checked first, its dense weights then share the
    # experts' storage; block 1 (registry, wrong) fails, and that sharing must be undone.
    model = Stack(GatedMLP(), SwappedMLP())
    assert [s.source for s in find_ffns(model)] == ["dataflow", "registry"]
    before = snapshot(model)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model, num_experts=4)
    message = str(error.value)
    assert message.startswith("layers.1.mlp: the converted layer does not reproduce the dense FFN")
    assert _measured(message) > 1e-2  # not a rounding error: act(up) * gate is another function
    assert "(allowed 1e-05)" in message and "exclude_modules" in message
    assert_untouched(model, before)
    # Leaving the wrong site out converts the rest.
    moeify.moeify(model, num_experts=4, exclude_modules=["layers.1.mlp"])
    assert [name for name, _ in moe_layers(model)] == ["layers.0.mlp"]


@pytest.mark.usefixtures("isolated_registries")
def test_example_inputs_mismatch_leaves_the_model_untouched() -> None:
    """verify=False skips the per-layer check, so the wrong layout is built and swapped in; the
    whole-model check on example_inputs catches it and undoes the swaps and the storage sharing."""
    register_ffn(SwappedMLP, SWAPPED)
    torch.manual_seed(0)
    model = Stack(GatedMLP(), SwappedMLP())
    x = stack_input()
    before = snapshot(model)
    with torch.no_grad():
        dense = model(x)
    with pytest.raises(ConversionError) as error:
        moeify.moeify(model, num_experts=4, verify=False, example_inputs=x)
    message = str(error.value)
    assert "does not reproduce the dense model on example_inputs" in message
    difference = float(re.search(r"max relative difference ([0-9.e+-]+)", message).group(1))
    assert difference > 1e-3
    assert "the model was left unchanged" in message
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), dense)


def test_example_inputs_match_passes() -> None:
    torch.manual_seed(0)
    model = Stack(GatedMLP(), GatedMLP())
    x = stack_input()
    with torch.no_grad():
        dense = model(x)
    moeify.moeify(model, num_experts=4, example_inputs=x)
    assert len(moe_layers(model)) == 2
    # The check's forward is no training statistic: the routing counts start at zero.
    assert all(int(layer.tokens_per_expert.sum()) == 0 for _, layer in moe_layers(model))
    with torch.no_grad():
        assert (model(x) - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_generic_module_with_residual_inside_needs_no_shared_experts() -> None:
    """A zeroed copy of `x + tanh(W x)` outputs x, not 0: the shared experts cannot start at zero."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 0.1 * torch.tanh(self.lin(x))

    model = Stack(Residual())
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"layers.0.mlp: its shared experts .* Pass num_shared_experts=0"):
        moeify.moeify(model, target_modules=["mlp"], num_experts=4)
    assert_untouched(model, before)


# ---------------------------------------------------------------------------------------------
# Registries refuse duplicates, and a refused duplicate changes nothing


@pytest.mark.usefixtures("isolated_registries")
def test_registries_refuse_duplicates() -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    llama_mlp = "transformers.models.llama.modeling_llama.LlamaMLP"
    with pytest.raises(ValueError, match=f"an FFN class '{llama_mlp}' is already registered"):
        register_ffn(LlamaMLP, SWAPPED)  # the class and its qualified name are one key
    assert registry._FFN[llama_mlp] is LLAMA_STYLE
    glumb = "diffusers.models.transformers.sana_transformer.GLUMBConv"
    with pytest.raises(ValueError, match=f"a skipped class '{glumb}' is already registered"):
        register_skip(glumb, "another reason")
    assert "convolutional" in registry._SKIP[glumb]
    with pytest.raises(ValueError, match="a router kind named 'linear' is already registered"):
        register_router("linear", lambda spec: LinearRouter(spec.hidden_size, spec.num_experts, 1.0))
    assert router_base._ROUTERS["linear"] is not None
    pixart = "diffusers.models.transformers.pixart_transformer_2d.PixArtTransformer2DModel"
    with pytest.raises(ValueError, match=f"'{pixart}' is already registered"):
        register_conditioning(pixart, "encoder_hidden_states", "caption_channels")
    # A second registration of a new class is refused too.
    register_skip(SwappedMLP, "not token-wise")
    with pytest.raises(ValueError, match="'test_errors.SwappedMLP' is already registered"):
        register_skip("test_errors.SwappedMLP", "not token-wise")


@pytest.mark.usefixtures("isolated_registries")
@pytest.mark.parametrize("register", [register_ffn, register_skip, register_conditioning])
def test_registries_refuse_bare_class_names(register) -> None:
    """Several models define their own class called FeedForward: a bare name would match them all."""
    args = {register_ffn: (SWAPPED,), register_skip: ("a reason",), register_conditioning: ("arg", "dim")}[register]
    before = (registry._FFN.copy(), registry._SKIP.copy(), registry._CONDITIONING.copy())
    with pytest.raises(ValueError, match=r"fully qualified name \('package.module.ClassName'\), got 'FeedForward'"):
        register("FeedForward", *args)
    assert (registry._FFN, registry._SKIP, registry._CONDITIONING) == before


@pytest.mark.usefixtures("isolated_registries")
def test_registered_router_kind_is_usable() -> None:
    """register_router makes `router=<kind>` a valid config value that builds that router."""
    built = []

    def builder(spec):
        built.append(spec)
        return LinearRouter(spec.hidden_size, spec.num_experts, spec.init_std)

    register_router("my_linear", builder)
    model = moeify.moeify(tiny_llama(), num_experts=4, router="my_linear")
    assert [(s.hidden_size, s.num_experts) for s in built] == [(32, 4), (32, 4)]
    assert model.moeify_state.config.router == "my_linear"


@pytest.mark.parametrize("config", [{"num_experts": 4}, 8, "linear"], ids=["dict", "int", "str"])
def test_the_wrong_object_as_config_is_a_clear_type_error(config) -> None:
    model = tiny_llama()
    before = snapshot(model)
    for call in (moeify.moeify, find_ffns):
        with pytest.raises(TypeError, match=r"config must be a MoeifyConfig or None, got"):
            call(model, config)
    assert_untouched(model, before)


def test_layers_naming_a_block_without_an_ffn_is_refused() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        ConversionError,
        match=r"layers=\[0, 7\] names block\(s\) \[7\] where moeify found no FFN; the blocks with FFNs are \[0, 1\]",
    ):
        moeify.moeify(model, layers=[0, 7])
    assert_untouched(model, before)


def test_example_inputs_that_do_not_run_the_dense_model_are_refused() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ConversionError, match=r"example_inputs do not run the dense LlamaForCausalLM \(IndexError"):
        moeify.moeify(model, example_inputs={"input_ids": torch.tensor([[1000]])})
    assert_untouched(model, before)


def _bad_calls(tmp_path):
    from moeify.monitors import attach_monitors

    converted = moeify.moeify(tiny_llama(), num_experts=2)
    return [
        (lambda: attach_monitors(converted, 5), TypeError, "monitors must be 'default'"),
        (lambda: attach_monitors(converted, sinks=[3]), TypeError, "sinks must be a list of sinks"),
        (lambda: attach_monitors(5), TypeError, "attach_monitors watches an nn.Module"),
        (lambda: moeify.aux_loss(5), TypeError, "aux_loss reads a model converted by moeify"),
        (
            lambda: moeify.save_pretrained(converted, 5),
            TypeError,
            "moeify.save_pretrained: the directory must be a path",
        ),
        (lambda: moeify.from_pretrained(None), TypeError, "moeify.from_pretrained: the directory must be a path"),
        (lambda: moeify.from_pretrained(tmp_path, device="bogus"), ValueError, "device='bogus' is not a torch device"),
        (lambda: moeify.export(converted, tmp_path / "e", "mixtral", tolerance=-1), ValueError, "tolerance a positive"),
    ]


def test_bad_arguments_are_refused_at_the_door(tmp_path) -> None:
    """Each public call checks its arguments itself: a message naming the call and the argument,
    never an error from inside pathlib, safetensors or a later step, and nothing written."""
    for call, kind, says in _bad_calls(tmp_path):
        with pytest.raises(kind, match=re.escape(says)):
            call()
    assert list(tmp_path.iterdir()) == []
