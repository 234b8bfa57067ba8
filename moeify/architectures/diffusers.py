"""diffusers FFN classes and conditioning sources, as data.

`FeedForward` is one class built from options (`activation_fn="gelu" | "gelu-approximate" |
"geglu" | "swiglu" | "linear-silu" | ...`): its resolver reads the instance. `net` is
[act-projection, Dropout, Linear, (Dropout)].
"""

from __future__ import annotations

import copy

from torch import nn

from moeify.architectures.layouts import FFNLayout
from moeify.architectures.registry import register_conditioning, register_ffn, register_skip
from moeify.layers.activations import GELU, SigmoidGELU

_FUSED_INTO_ATTENTION = (
    "parallel attention + MLP block: the MLP output is concatenated with the attention output "
    "and projected together by proj_out, so the MLP cannot be replaced token-wise on its own"
)


def feed_forward(module: nn.Module) -> FFNLayout | str:
    net = getattr(module, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) < 3 or not isinstance(net[2], nn.Linear):
        return "FeedForward without the [activation, dropout, linear] net this version of moeify knows"
    first = type(net[0]).__name__
    common = dict(
        proj_in="net.0.proj",
        proj_out="net.2",
        mid_dropout="net.1",
        out_dropout="net.3" if len(net) > 3 else None,
    )
    if first == "GELU":
        return FFNLayout("mlp", act=lambda m: GELU(m.net[0].approximate), **common)
    if first == "GEGLU":
        # GEGLU: `hidden, gate = proj(x).chunk(2); hidden * gelu(gate)`: the gate is the second half.
        return FFNLayout("fused_gated", act=lambda m: GELU("none"), gate_first=False, **common)
    if first == "SwiGLU":
        return FFNLayout("fused_gated", act=lambda m: copy.deepcopy(m.net[0].activation), gate_first=False, **common)
    if first == "ApproximateGELU":
        return FFNLayout("mlp", act=lambda m: SigmoidGELU(), **common)
    if first == "LinearActivation":
        return FFNLayout("mlp", act=lambda m: copy.deepcopy(m.net[0].activation), **common)
    return f"FeedForward with activation {first}, which this version of moeify does not know"


register_ffn("diffusers.models.attention.FeedForward", feed_forward)

_MODELS = "diffusers.models"
DIFFUSERS_SKIPS = {
    f"{_MODELS}.transformers.transformer_flux.FluxSingleTransformerBlock": _FUSED_INTO_ATTENTION,
    f"{_MODELS}.transformers.transformer_hunyuan_video.HunyuanVideoSingleTransformerBlock": _FUSED_INTO_ATTENTION,
    f"{_MODELS}.transformers.sana_transformer.GLUMBConv": (
        "convolutional FFN (depthwise conv over neighbouring tokens): not token-wise"
    ),
    # FFN-shaped, token-wise, but not the token FFNs of the blocks: left dense.
    f"{_MODELS}.embeddings.TimestepEmbedding": "timestep embedder, not a token FFN",
    f"{_MODELS}.embeddings.PixArtAlphaTextProjection": "caption projection, not a token FFN",
}
for _name, _reason in DIFFUSERS_SKIPS.items():
    register_skip(_name, _reason)

# Where each model's cross-attention conditioning comes from (the forward argument and the
# config attribute with its feature size).
DIFFUSERS_CONDITIONING = {
    f"{_MODELS}.transformers.pixart_transformer_2d.PixArtTransformer2DModel": "caption_channels",
    f"{_MODELS}.transformers.transformer_sd3.SD3Transformer2DModel": "joint_attention_dim",
    f"{_MODELS}.transformers.transformer_flux.FluxTransformer2DModel": "joint_attention_dim",
    f"{_MODELS}.transformers.cogvideox_transformer_3d.CogVideoXTransformer3DModel": "text_embed_dim",
    f"{_MODELS}.transformers.transformer_wan.WanTransformer3DModel": "text_dim",
    f"{_MODELS}.transformers.transformer_ltx.LTXVideoTransformer3DModel": "caption_channels",
    f"{_MODELS}.transformers.transformer_hunyuan_video.HunyuanVideoTransformer3DModel": "text_embed_dim",
    f"{_MODELS}.transformers.transformer_mochi.MochiTransformer3DModel": "text_embed_dim",
    f"{_MODELS}.unets.unet_2d_condition.UNet2DConditionModel": "cross_attention_dim",
    f"{_MODELS}.transformers.transformer_2d.Transformer2DModel": "cross_attention_dim",
}
for _name, _attr in DIFFUSERS_CONDITIONING.items():
    register_conditioning(_name, "encoder_hidden_states", _attr)
