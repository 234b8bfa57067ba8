"""Tiny transformers models, one per architecture of the registry, built from configs (no Hub).

Each `TinyModel` says how to build the model, feed it, read its main output, how many FFN sites
it has, and where each FFN's dense weights live, read independently of moeify so that the tests
can check the packed experts against them bit for bit.

Sizes: hidden 32, 2 layers, 4 heads, vocab 100; every special token id is below the vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

VOCAB = 100
HIDDEN = 32
INTERMEDIATE = 64
BATCH, SEQ = 2, 8
IMAGE, PATCH = 16, 8

# Special tokens inside the vocab (several configs default to ids of the real 32k-50k vocabs).
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Decoders shared by the Llama family: head_dim pinned (Qwen3 and Gemma default to 128 / 256).
DECODER = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": HIDDEN // 4,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    **TOKENS,
}
SLIDING = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}
ENCODER = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
}


@dataclass(frozen=True)
class DenseFFN:
    """One FFN's weights in moeify's packed orientation: w_in [I_in, D] ([gate; up] when gated),
    w_out [D, I]; cloned, so they survive the conversion."""

    w_in: Tensor
    b_in: Tensor | None
    w_out: Tensor
    b_out: Tensor | None


def _weight(module: nn.Module, conv1d: bool) -> Tensor:
    # GPT-2's Conv1D stores [in, out]: its transpose is the nn.Linear [out, in].
    return (module.weight.t() if conv1d else module.weight).detach().clone()


def _bias(module: nn.Module) -> Tensor | None:
    return None if module.bias is None else module.bias.detach().clone()


def ffn_reader(*proj_in: str, proj_out: str, conv1d: bool = False) -> Callable[[nn.Module], DenseFFN]:
    """A reader for FFNs whose input rows are `proj_in` stacked in order (gate first when gated)."""

    def read(site: nn.Module) -> DenseFFN:
        ins = [site.get_submodule(path) for path in proj_in]
        out = site.get_submodule(proj_out)
        biases = [_bias(m) for m in ins]
        return DenseFFN(
            w_in=torch.cat([_weight(m, conv1d) for m in ins]),
            b_in=None if biases[0] is None else torch.cat(biases),
            w_out=_weight(out, conv1d),
            b_out=_bias(out),
        )

    return read


def token_inputs(model: PreTrainedModel) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Ids from 3 up: no pad/bos/eos in the middle of a sequence.
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def seq2seq_inputs(model: PreTrainedModel) -> dict[str, Tensor]:
    inputs = token_inputs(model)
    generator = torch.Generator().manual_seed(2)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, SEQ // 2), generator=generator)
    return inputs


def image_inputs(model: PreTrainedModel) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)}


def clip_inputs(model: PreTrainedModel) -> dict[str, Tensor]:
    return {**token_inputs(model), **image_inputs(model)}


def logits(output: Any) -> Tensor:
    return output.logits


def last_hidden_state(output: Any) -> Tensor:
    return output.last_hidden_state


def encoder_decoder_states(output: Any) -> Tensor:
    # The encoder's FFNs reach the decoder only through cross-attention: compare both.
    return torch.cat([output.encoder_last_hidden_state, output.last_hidden_state], dim=1)


def clip_embeds(output: Any) -> Tensor:
    # Both towers: the text and the image embeddings.
    return torch.cat([output.text_embeds, output.image_embeds])


@dataclass(frozen=True)
class TinyModel:
    name: str
    model_type: str
    config: dict[str, Any]
    num_sites: int
    read_ffn: Callable[[nn.Module], DenseFFN]  # from the site module (`FFNSite.name`)
    inputs: Callable[[PreTrainedModel], dict[str, Tensor]] = token_inputs
    output: Callable[[Any], Tensor] = logits
    causal_lm: bool = True
    auto_class: type = AutoModelForCausalLM
    # Split FFNs: where the MoE layer goes inside the site, and what becomes nn.Identity.
    install_at: str = ""
    identities: tuple[str, ...] = ()

    def build(self, seed: int = 0) -> PreTrainedModel:
        torch.manual_seed(seed)
        config = AutoConfig.for_model(self.model_type, **self.config)
        model = self.auto_class.from_config(config, attn_implementation="eager")
        return model.float().eval()

    def __str__(self) -> str:  # the pytest id
        return self.name


LLAMA_STYLE = ffn_reader("gate_proj", "up_proj", proj_out="down_proj")  # gate first
FC_STYLE = ffn_reader("fc1", proj_out="fc2")
NEOX_STYLE = ffn_reader("dense_h_to_4h", proj_out="dense_4h_to_h")
SPLIT_STYLE = ffn_reader("intermediate.dense", proj_out="output.dense")  # BERT: the site is the layer

# Decoders with one attention width (no grouped KV heads, no head_dim option).
PLAIN_DECODER = {k: v for k, v in DECODER.items() if k not in ("head_dim", "num_key_value_heads")}
GPT2 = {"n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "n_inner": INTERMEDIATE, "n_positions": 64, "vocab_size": VOCAB}
FALCON = {
    "hidden_size": HIDDEN,
    "ffn_hidden_size": INTERMEDIATE,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": VOCAB,
}
OPT = {**PLAIN_DECODER, "ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN}
del OPT["intermediate_size"]  # OPT calls it ffn_dim
VISION = {k: v for k, v in ENCODER.items() if k not in ("vocab_size", "max_position_embeddings")} | {
    "image_size": IMAGE,
    "patch_size": PATCH,
}
T5 = {
    "d_model": HIDDEN,
    "d_ff": INTERMEDIATE,
    "d_kv": 8,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "vocab_size": VOCAB,
    "decoder_start_token_id": 0,
    **TOKENS,
}

ENCODER_ONLY = {"output": last_hidden_state, "causal_lm": False, "auto_class": AutoModel}
# BERT's FFN is split: `intermediate` (dense + act), then `output.dense` before dropout, residual, norm.
BERT_SPLIT = {**ENCODER_ONLY, "install_at": "intermediate", "identities": ("output.dense",)}
# Encoder and decoder FFNs: 2 + 2 sites.
T5_COMMON = {**ENCODER_ONLY, "num_sites": 4, "inputs": seq2seq_inputs, "output": encoder_decoder_states}

MODELS = [
    TinyModel("llama", "llama", DECODER, 2, LLAMA_STYLE),
    TinyModel("mistral", "mistral", {**DECODER, "sliding_window": 4}, 2, LLAMA_STYLE),
    TinyModel("qwen2", "qwen2", DECODER, 2, LLAMA_STYLE),
    TinyModel("qwen3", "qwen3", DECODER, 2, LLAMA_STYLE),
    TinyModel("gemma", "gemma", DECODER, 2, LLAMA_STYLE),
    TinyModel("gemma2", "gemma2", {**DECODER, **SLIDING}, 2, LLAMA_STYLE),
    TinyModel("gemma3_text", "gemma3_text", {**DECODER, **SLIDING}, 2, LLAMA_STYLE),
    TinyModel("phi", "phi", PLAIN_DECODER, 2, FC_STYLE),
    # Phi-3 fuses [gate; up] into one projection: its weight is already the packed w_in.
    TinyModel("phi3", "phi3", DECODER, 2, ffn_reader("gate_up_proj", proj_out="down_proj")),
    TinyModel("gpt2", "gpt2", {**GPT2, **TOKENS}, 2, ffn_reader("c_fc", proj_out="c_proj", conv1d=True)),
    TinyModel("gpt_neox", "gpt_neox", PLAIN_DECODER, 2, NEOX_STYLE),
    TinyModel("falcon", "falcon", {**FALCON, **TOKENS}, 2, NEOX_STYLE),
    # OPT's fc1 / activation_fn / fc2 sit on the decoder layer itself: the site is the layer.
    TinyModel("opt", "opt", OPT, 2, FC_STYLE, install_at="fc1", identities=("activation_fn", "fc2")),
    TinyModel("bert", "bert", ENCODER, 2, SPLIT_STYLE, **BERT_SPLIT),
    TinyModel(
        "roberta",
        "roberta",
        {**ENCODER, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        2,
        SPLIT_STYLE,
        **BERT_SPLIT,
    ),
    TinyModel("t5", "t5", T5, read_ffn=ffn_reader("wi", proj_out="wo"), **T5_COMMON),
    TinyModel(
        "t5_gated",
        "t5",
        {**T5, "feed_forward_proj": "gated-gelu"},
        read_ffn=ffn_reader("wi_0", "wi_1", proj_out="wo"),
        **T5_COMMON,
    ),
    TinyModel("vit", "vit", VISION, 2, FC_STYLE, inputs=image_inputs, **ENCODER_ONLY),
    # The full CLIPModel: 2 text + 2 vision layers.
    TinyModel(
        "clip",
        "clip",
        {"text_config": {**ENCODER, **TOKENS}, "vision_config": VISION, "projection_dim": 16},
        4,
        FC_STYLE,
        inputs=clip_inputs,
        **{**ENCODER_ONLY, "output": clip_embeds},
    ),
]

CAUSAL_LMS = [m for m in MODELS if m.causal_lm]
BY_NAME = {m.name: m for m in MODELS}
