"""transformers FFN classes, as data. Classes not listed here still convert when the structural
probe recognises them (`registry.probe`); these entries pin the known ones and the split FFNs
the probe cannot see."""

from __future__ import annotations

from moeify.architectures.layouts import FFNLayout
from moeify.architectures.registry import register_ffn, register_skip

# down(act(gate(x)) * up(x)): the Llama family.
LLAMA_STYLE = FFNLayout("gated", proj_gate="gate_proj", proj_in="up_proj", proj_out="down_proj", act="act_fn")
# fc2(act(fc1(x))).
FC_STYLE = FFNLayout("mlp", proj_in="fc1", proj_out="fc2", act="activation_fn")
NEOX_STYLE = FFNLayout("mlp", proj_in="dense_h_to_4h", proj_out="dense_4h_to_h", act="act")

TRANSFORMERS_FFNS: dict[str, FFNLayout] = {
    **dict.fromkeys(
        (
            "LlamaMLP",
            "MistralMLP",
            "Qwen2MLP",
            "Qwen3MLP",
            "GemmaMLP",
            "Gemma2MLP",
            "Gemma3MLP",
            "Olmo2MLP",
            "GraniteMLP",
            "CohereMLP",
            "Starcoder2MLP",
        ),
        LLAMA_STYLE,
    ),
    **dict.fromkeys(("PhiMLP", "ViTMLP", "CLIPMLP", "SiglipMLP"), FC_STYLE),
    # Phi-3 fuses gate and up in one projection, gate first.
    "Phi3MLP": FFNLayout("fused_gated", proj_in="gate_up_proj", proj_out="down_proj", act="activation_fn"),
    # GPT-2's projections are Conv1D ([in, out] weights); dropout after c_proj.
    "GPT2MLP": FFNLayout("mlp", proj_in="c_fc", proj_out="c_proj", act="act", out_dropout="dropout"),
    "GPTNeoXMLP": NEOX_STYLE,
    "FalconMLP": NEOX_STYLE,
    "T5DenseActDense": FFNLayout("mlp", proj_in="wi", proj_out="wo", act="act", mid_dropout="dropout"),
    "T5DenseGatedActDense": FFNLayout(
        "gated", proj_gate="wi_0", proj_in="wi_1", proj_out="wo", act="act", mid_dropout="dropout"
    ),
    # Split FFNs. BERT: `intermediate` (dense + act) then `output.dense`; output's dropout, residual
    # and LayerNorm stay where they are, applied to the MoE output.
    **dict.fromkeys(
        ("BertLayer", "RobertaLayer", "ElectraLayer", "XLMRobertaLayer"),
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
    "OPTDecoderLayer": FFNLayout(
        "mlp", proj_in="fc1", proj_out="fc2", act="activation_fn", install_at="fc1", identities=("activation_fn", "fc2")
    ),
}

TRANSFORMERS_SKIPS = {
    "BloomMLP": "adds the residual inside the MLP (forward(hidden_states, residual)): not a pure FFN",
}

for _name, _layout in TRANSFORMERS_FFNS.items():
    register_ffn(_name, _layout)
for _name, _reason in TRANSFORMERS_SKIPS.items():
    register_skip(_name, _reason)
