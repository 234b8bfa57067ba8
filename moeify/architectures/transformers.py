"""transformers FFN classes, as data, keyed by their fully qualified class. Classes not listed
here convert when dataflow discovery recognises them (moeify.surgery.discover); these entries are
the fast path for the most used ones and pin their layouts (the MoE layer's place, so the module
names of checkpoints saved by earlier moeify versions)."""

from __future__ import annotations

from moeify.architectures.layouts import FFNLayout
from moeify.architectures.registry import register_ffn

# down(act(gate(x)) * up(x)): the Llama family.
LLAMA_STYLE = FFNLayout("gated", proj_gate="gate_proj", proj_in="up_proj", proj_out="down_proj", act="act_fn")
# fc2(act(fc1(x))).
FC_STYLE = FFNLayout("mlp", proj_in="fc1", proj_out="fc2", act="activation_fn")
NEOX_STYLE = FFNLayout("mlp", proj_in="dense_h_to_4h", proj_out="dense_4h_to_h", act="act")


def _qualified(model: str, name: str) -> str:
    return f"transformers.models.{model}.modeling_{model}.{name}"


TRANSFORMERS_FFNS: dict[str, FFNLayout] = {
    **dict.fromkeys(
        (
            _qualified("llama", "LlamaMLP"),
            _qualified("mistral", "MistralMLP"),
            _qualified("qwen2", "Qwen2MLP"),
            _qualified("qwen3", "Qwen3MLP"),
            _qualified("gemma", "GemmaMLP"),
            _qualified("gemma2", "Gemma2MLP"),
            _qualified("gemma3", "Gemma3MLP"),
            _qualified("olmo2", "Olmo2MLP"),
            _qualified("granite", "GraniteMLP"),
            _qualified("cohere", "CohereMLP"),
        ),
        LLAMA_STYLE,
    ),
    **dict.fromkeys(
        (
            _qualified("phi", "PhiMLP"),
            _qualified("vit", "ViTMLP"),
            _qualified("clip", "CLIPMLP"),
            _qualified("siglip", "SiglipMLP"),
        ),
        FC_STYLE,
    ),
    # Phi-3 fuses gate and up in one projection, gate first.
    _qualified("phi3", "Phi3MLP"): FFNLayout(
        "fused_gated", proj_in="gate_up_proj", proj_out="down_proj", act="activation_fn"
    ),
    # GPT-2's projections are Conv1D ([in, out] weights); dropout after c_proj.
    _qualified("gpt2", "GPT2MLP"): FFNLayout(
        "mlp", proj_in="c_fc", proj_out="c_proj", act="act", out_dropout="dropout"
    ),
    _qualified("gpt_neox", "GPTNeoXMLP"): NEOX_STYLE,
    _qualified("falcon", "FalconMLP"): NEOX_STYLE,
    _qualified("t5", "T5DenseActDense"): FFNLayout(
        "mlp", proj_in="wi", proj_out="wo", act="act", mid_dropout="dropout"
    ),
    _qualified("t5", "T5DenseGatedActDense"): FFNLayout(
        "gated", proj_gate="wi_0", proj_in="wi_1", proj_out="wo", act="act", mid_dropout="dropout"
    ),
    # Split FFNs. BERT: `intermediate` (dense + act) then `output.dense`; output's dropout, residual
    # and LayerNorm stay where they are, applied to the MoE output.
    **dict.fromkeys(
        (
            _qualified("bert", "BertLayer"),
            _qualified("roberta", "RobertaLayer"),
            _qualified("electra", "ElectraLayer"),
            _qualified("xlm_roberta", "XLMRobertaLayer"),
        ),
        FFNLayout(
            "mlp",
            proj_in="intermediate.dense",
            proj_out="output.dense",
            act="intermediate.intermediate_act_fn",
            install_at="intermediate",
            identities=("output.dense",),
        ),
    ),
    # OPT: fc1 / activation_fn / fc2 sit directly on the decoder layer.
    _qualified("opt", "OPTDecoderLayer"): FFNLayout(
        "mlp", proj_in="fc1", proj_out="fc2", act="activation_fn", install_at="fc1", identities=("activation_fn", "fc2")
    ),
}

for _name, _layout in TRANSFORMERS_FFNS.items():
    register_ffn(_name, _layout)
