"""Data for `diffusers_zoo`: the constructor-argument names its generic rules shrink, and per class
what the rules cannot guess.

SIZE_NAMES / ROPE_AXES: argument names by the size they set. CONFIG: constructor arguments on top of
the generic tiny ones. LAYOUT: the latent layout where the guess from the class name is wrong. INPUTS:
forward inputs on top of (or replacing) the generic ones, made from the `Ctx` (the built model, its
config, seeded tensors). NEEDS / SKIPS: classes refused up front, with the reason. Sizes follow the
zoo's: batch 2, 5 text tokens of width 16, 4 latent channels, 8x8 latents (16 tokens after 2x2
patches), 2 frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.embeddings import (
    get_1d_rotary_pos_embed,
    get_2d_rotary_pos_embed,
    get_2d_rotary_pos_embed_lumina,
)

if TYPE_CHECKING:
    from .diffusers_zoo import Ctx

# Constructor arguments by the size they set (diffusers spells each one many ways), shrunk wherever a class
# has them: role -> names. A per-block tuple default becomes a tuple of the tiny value.
SIZE_NAMES: dict[str, str] = {
    "layers": "num_layers n_layers depth num_hidden_layers nlayers dit_depth num_visual_blocks",
    "blocks": """num_single_layers num_refiner_layers n_refiner_layers num_mmdit_layers num_single_dit_layers
        mmdit_layers num_text_blocks num_text_layers num_layerwise_text_blocks num_refiner_text_blocks
        perceiver_num_layers approximator_layers layers_per_block num_res_blocks LFE_depth""",
    "heads": """num_attention_heads n_heads num_heads nheads dit_heads num_kv_heads n_kv_heads num_key_value_heads
        num_key_value_attention_heads num_cross_attention_heads text_num_attention_heads text_num_key_value_heads
        block_num_heads audio_num_attention_heads cross_attn_num_heads LFE_num_heads face_encoder_num_heads
        motion_num_attention_heads""",
    "head_dim": """attention_head_dim head_dim cross_attention_head_dim audio_attention_head_dim d_kv
        cross_attn_dim_head LFE_dim_head linear_head_dim""",
    # model widths, and every conditioning width (text, pooled text, image, time embeddings)
    "width": """hidden_size dim model_dim embed_dim dit_dim token_dim d_model embedding_dim cross_attention_dim
        joint_attention_dim caption_channels caption_projection_dim pooled_projection_dim text_dim text_embed_dim
        text_embed_2_dim cap_feat_dim context_in_dim text_in_dim in_text_dim in_text_dim2 text_hidden_dim
        encoder_hid_dim cond_token_dim global_cond_dim encoder_hidden_size cross_attention_dim_t5 text_emb_dim
        dit_text_dim condition_dim llm_features_dim text_encoder_dim image_dim image_embed_dim image_proj_dim
        time_embed_dim time_dim freq_dim timestep_guidance_channels timestep_channels time_proj_dim
        time_embedding_dim timestep_embed_dim time_embed_hidden_dim t_emb_dim timestep_features_dim time_step_dim
        timestep_ratio_embedding_dim fourier_embedding_dim adaln_dim adaln_lora_dim dim_cond cond_embed_dim
        global_states_input_dim cross_attention_input_dim audio_cross_attention_dim crossattn_proj_in_channels
        encoder_hidden_states_channels conditioning_dim clip_text_pooled_in_channels approximator_hidden_dim
        approximator_num_channels motion_encoder_dim motion_style_dim face_encoder_hidden_dim""",
    "ffn": """ffn_dim intermediate_size ff_dim ffn_hidden_size d_ff ff_inner_dim moe_intermediate_dim
        text_intermediate_size""",
    "channels": """in_channels out_channels in_visual_dim out_visual_dim io_channels audio_in_channels
        audio_out_channels""",
    "side": "sample_size sample_height sample_width",
    "groups": "norm_num_groups",
    "condition_encoder": "conditioning_embedding_out_channels ctrl_conditioning_embedding_out_channels",
}
# Rotary tables that split the head dim over 2-4 position axes (t, h, w, ...): each axis gets an even share.
ROPE_AXES = ("axes_dims_rope", "axes_dim_rope", "rope_axes_dim", "axes_dims", "axes_dim", "rope_dim_list", "rope_dim")

NEEDS: dict[str, str] = {"CosmosControlNetModel": "torchvision (it resizes its padding mask with torchvision)"}
SKIPS: dict[str, str] = {
    "ControlNetXSAdapter": "runs only inside a UNetControlNetXSModel (swept there)",
    "MotionAdapter": "its forward is a no-op: the motion modules run inside UNetMotionModel (swept there)",
    "ZImageControlNetModel": "borrows its embedders from a ZImageTransformer2DModel (from_transformer)",
    **dict.fromkeys(
        """FluxMultiControlNetModel HunyuanDiT2DMultiControlNetModel MultiControlNetModel
        QwenImageMultiControlNetModel SD3MultiControlNetModel""".split(),
        "a container of other controlnets (swept one by one)",
    ),
}

# HunyuanDiT learns one padding embedding per text position: the text lengths must match the inputs'
_HUNYUAN_DIT = {"patch_size": 2, "text_len": 5, "text_len_t5": 5}

CONFIG: dict[str, dict[str, Any]] = {
    "AceStepTransformer1DModel": {"audio_acoustic_hidden_dim": 2, "sliding_window": 4},  # 2 + 2 context channels
    "BriaFibo2Transformer2DModel": {
        "dim": 32,  # its refiner and perceiver FFNs are dim * 8/3 rounded down to 64s: 0 wide below 24
        "n_heads": 4,
        "injection_layer_ids": (1,),  # block 1 reads text bundle 1; bundle 0 feeds the gist perceiver
        "min_num_gist_tokens": 2,
        "max_num_gist_tokens": 4,
        "gist_step": 2,
        "gist_min_text_len": 2,
        "gist_max_text_len": 8,
    },
    "CogVideoXTransformer3DModel": {"sample_frames": 5, "max_text_seq_length": 5},  # 5 frames -> 2 latent frames
    "ConsisIDTransformer3DModel": {"sample_frames": 5, "max_text_seq_length": 5},
    "ControlNetUnionModel": {
        "addition_time_embed_dim": 4,
        "num_control_type": 2,
        "num_trans_channel": 8,
        "num_trans_head": 2,
        "num_proj_channel": 8,
    },
    "Cosmos3OmniTransformer": {
        "vocab_size": 64,
        "latent_channel": 4,
        "patch_latent_dim": 16,  # 4 channels x 2x2 patches
        "rope_axes_dim": (2, 1, 1),  # interleaved (t, h, w) sections of the 4 rotary frequencies
    },
    "CosmosTransformer3DModel": {
        "attention_head_dim": 12,  # its rotary table splits the head dim over (t, h, w) in even thirds
        "max_size": (4, 16, 16),
        "concat_padding_mask": False,  # the padding mask is resized with torchvision
    },
    "DiTTransformer2DModel": {"num_embeds_ada_norm": 10},
    # its 3D rotary table gives h and w 3/8 of the head dim each, which must be even
    "EasyAnimateTransformer3DModel": {"patch_size": 2, "out_channels": 4, "attention_head_dim": 16},
    "GlmImageTransformer2DModel": {"prior_vq_quantizer_codebook_size": 8},
    "HiDreamImageTransformer2DModel": {
        "patch_size": 2,
        "caption_channels": [16, 16],
        "llama_layers": [0, 1, 2],  # one text-encoder layer per block (2 double-stream + 1 single-stream)
        "max_resolution": (16, 16),
        "axes_dims_rope": (4, 2, 2),  # its position ids have 3 axes, the default table 2
    },
    "HunyuanDiT2DControlNetModel": _HUNYUAN_DIT,
    "HunyuanDiT2DModel": _HUNYUAN_DIT,
    "HunyuanVideoFramepackTransformer3DModel": {"has_image_proj": True, "has_clean_x_embedder": True},
    "Ideogram4Transformer2DModel": {"mrope_section": (2, 1, 1)},  # h and w take 1 of the 4 frequencies each
    # 4 doubling levels (its per-level attention flags are a fixed 4-tuple); 1 layer per block breaks its up path
    "Kandinsky3UNet": {"block_out_channels": (8, 16, 32, 64), "groups": 4, "layers_per_block": 2},
    "Kandinsky6SRTransformer3DModel": {"patch_size": (1, 1, 1)},  # its attention tiles need an 8x8 token grid
    "Kandinsky6Transformer3DModel": {"visual_cond": False},
    "LatteTransformer3DModel": {
        "patch_size": 2,
        "video_length": 2,
        "caption_channels": 16,
        "cross_attention_dim": 16,
        "norm_type": "ada_norm_single",  # as Latte ships; the default layer_norm takes no timestep
        "num_embeds_ada_norm": 1000,
    },
    "LongCatAudioDiTTransformer": {"latent_dim": 4},
    "Lumina2Transformer2DModel": {"multiple_of": 16, "axes_lens": (16, 16, 16)},
    "LuminaNextDiT2DModel": {"num_kv_heads": 2, "multiple_of": 16},
    "MiniMaxH3Transformer3DModel": {"rope_freq_dim": 1},  # 3 axes x 2 x 1 of the 8 head channels rotate
    "MiniMaxMusic3RVQDepthDecoder": {"audio_vocab_size": 32},
    "MiniMaxMusic3Transformer1DModel": {"rotary_dim": 4},
    # its dense FFNs are dim * 8/3 rounded down to 128s: 0 wide below 48
    "NucleusMoEImageTransformer2DModel": {"num_attention_heads": 6},
    "OmniGenTransformer2DModel": {
        "vocab_size": 64,
        "pad_token_id": 0,
        "rope_scaling": {"long_factor": [1.0] * 4, "short_factor": [1.0] * 4},  # one per rotary frequency
    },
    "PRXTransformer2DModel": {"axes_dim": [4, 4]},
    "PriorTransformer": {"num_embeddings": 5},  # its positional table covers the 5 text tokens
    # the backbone-only feature set: noisy coordinates and latents, their times, CA pair distances
    "RFD4ProteinaTransformer": {
        "feats_seq": ("xt_bb_ca", "xt_local_latents"),
        "feats_cond_seq": ("time_emb_bb_ca", "time_emb_local_latents"),
        "feats_pair_repr": ("xt_bb_ca_pair_dists",),
        "feats_pair_cond": ("time_emb_bb_ca",),
        "pair_repr_dim": 8,
        "latent_dim": 4,
        "tri_mult_c": 8,
        "seq_sep_dim": 8,
        "xt_pair_dist_dim": 8,
    },
    "StableAudio3DiTModel": {"num_memory_tokens": 2, "local_add_cond_dim": 4},
    "StableCascadeUNet": {
        "block_out_channels": (16, 32),
        "num_attention_heads": (2, 2),
        "down_num_layers_per_block": (1, 1),
        "up_num_layers_per_block": (1, 1),
    },
    "T5FilmDecoder": {"input_dims": 4, "targets_length": 16},
    # 32 channels per attention head; its Fourier time features ride along as 2 x 32 extra input channels
    "UNet1DModel": {"block_out_channels": (32, 64), "extra_in_channels": 64},
    "UNetControlNetXSModel": {"ctrl_block_out_channels": (4, 8), "ctrl_max_norm_num_groups": 4},
    "UNetSpatioTemporalConditionModel": {
        "block_out_channels": (32, 64),  # its GroupNorms have 32 groups, fixed
        "addition_time_embed_dim": 4,
        "projection_class_embeddings_input_dim": 12,  # 3 added time ids x 4
    },
    "UVit2DModel": {
        "micro_cond_encode_dim": 4,
        "micro_cond_embed_dim": 20,  # 5 micro-conditions x 4
        "vocab_size": 32,
        "codebook_size": 16,
        "block_out_channels": 16,
    },
    "WanAnimate2Transformer3DModel": {"in_dim": 8, "out_dim": 4, "text_len": 8, "use_img_emb": False},
    "WanAnimateTransformer3DModel": {
        "in_channels": 12,  # 2 x latent_channels + 4
        "latent_channels": 4,
        "motion_encoder_size": 8,  # 8x8 face crops: one residual block down to the 4x4 output conv
        "motion_encoder_channel_sizes": {"8": 8, "4": 8},
        "motion_dim": 4,  # its motion basis is orthogonalised in motion_encoder_dim (16): at most 16 directions
        "inject_face_latents_blocks": 2,  # a face adapter after every 2nd block: one at tiny depth
    },
    "WanVACETransformer3DModel": {"vace_layers": [0, 1], "vace_in_channels": 4},
}

LAYOUT: dict[str, str] = {
    "AnyFlowFARTransformer3DModel": "frames",
    "AnyFlowTransformer3DModel": "frames",
    "CogVideoXTransformer3DModel": "frames",
    "ConsisIDTransformer3DModel": "frames",
    "HiDreamImageTransformer2DModel": "image",  # it patchifies itself; its img_ids are optional
    "I2VGenXLUNet": "video",
    "Kandinsky5Transformer3DModel": "video_last",
    "Kandinsky6Transformer3DModel": "video_last",
    "Krea2Transformer2DModel": "tokens",
    "LongCatAudioDiTTransformer": "tokens",
    "LTX2VideoTransformer3DModel": "tokens",
    "LTXVideoTransformer3DModel": "tokens",
    "NucleusMoEImageTransformer2DModel": "tokens",
    "QwenImage21Transformer2DModel": "tokens",
    "QwenImageControlNetModel": "tokens",
    "QwenImageTransformer2DModel": "tokens",
    "SanaWMLTX2RefinerTransformer3DModel": "tokens",
    "SparseControlNetModel": "video",
    "UNetMotionModel": "video",
    "UNetSpatioTemporalConditionModel": "frames",
}


def _cosmos3_inputs(x: Ctx) -> dict[str, Any]:
    """Cosmos 3's unbatched packed stream: a 5-token prompt (the understanding prefix), then two noisy
    one-frame latents (the batch of 2) of 4x4 2x2-patches each, with (t, h, w) mrope positions."""
    patches = (x.side // 2) ** 2
    rows = 5 + 2 * patches
    grid = torch.arange(patches)
    image_ids = torch.stack([torch.full((patches,), 5), grid // (x.side // 2), grid % (x.side // 2)])
    return {
        "input_ids": torch.randint(1, 64, (5,), generator=x.generator),
        "text_indexes": torch.arange(5),
        "position_ids": torch.cat([torch.arange(5).expand(3, -1), image_ids, image_ids + 1], dim=1),
        "und_len": 5,
        "sequence_length": rows,
        "vision_tokens": [x.randn(1, 4, 1, x.side, x.side) for _ in range(2)],
        "vision_token_shapes": [(1, x.side // 2, x.side // 2)] * 2,
        "vision_sequence_indexes": torch.arange(5, rows),
        "vision_mse_loss_indexes": torch.arange(5, rows),
        "vision_timesteps": (x.steps() / 1000).repeat_interleave(patches),  # one per noisy token
        "vision_noisy_frame_indexes": [torch.tensor([0])] * 2,
    }


def _frame_steps(x: Ctx) -> dict[str, torch.Tensor]:
    """AnyFlow's flow-map timesteps: a source t and a target r per sample and frame."""
    steps = x.steps()[:, None].expand(2, x.frames)
    return {"timestep": steps, "r_timestep": steps / 2}


def _hunyuan_dit_inputs(x: Ctx) -> dict[str, torch.Tensor]:
    """HunyuanDiT's two prompts (CLIP-like and T5) with masks, SDXL-style size ids, a style id, and the
    2D rotary table of its 4x4 patch grid."""
    return {
        "text_embedding_mask": x.mask(),
        "encoder_hidden_states_t5": x.text(),
        "text_embedding_mask_t5": x.mask(),
        "image_meta_size": torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * 2),
        "style": torch.zeros(2, dtype=torch.long),
        "image_rotary_emb": get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt"),
    }


def _ideogram_inputs(x: Ctx) -> dict[str, torch.Tensor]:
    """Ideogram 4's one packed stream: 5 text rows then 16 image rows, told apart by `indicator`
    (3 = text, 2 = image), with (t, h, w) positions and a single attention segment."""
    image_ids, text_ids = x.position_ids(3)
    text_ids[:, 0] = torch.arange(5)
    image_ids[:, 0] = 5
    rows = 5 + len(image_ids)
    return {
        "hidden_states": x.batched(rows, 4),
        "encoder_hidden_states": x.batched(rows, 16),
        "position_ids": torch.cat([text_ids, image_ids]).long().expand(2, -1, -1),
        "segment_ids": torch.zeros(2, rows, dtype=torch.long),
        "indicator": torch.tensor([3] * 5 + [2] * len(image_ids)).expand(2, -1),
    }


def _image_shapes(x: Ctx) -> list[list[tuple[int, int, int]]]:
    """QwenImage-style (frames, h, w) of the packed latents, one list per sample."""
    return [[(1, x.side // 2, x.side // 2)]] * 2


def _minimax_h3_inputs(x: Ctx) -> dict[str, torch.Tensor]:
    """MiniMax-H3's one packed stream: 5 text, 4 video, 3 audio rows (modality tags 1, 0, 2); text at
    the first of the two distinct noise levels, video and audio at the second."""
    tags = torch.tensor([1] * 5 + [0] * 4 + [2] * 3)
    return {
        "hidden_states": x.batched(4, 16),  # patchified video rows: 4 channels x (1, 2, 2) patches
        "audio_hidden_states": x.batched(3, 4),
        "timestep": x.steps() / 1000,
        "timestep_indices": (tags != 1).long(),
        "token_tags": tags,
        "position_ids": torch.stack([torch.arange(12), torch.zeros(12), torch.arange(12) % 2], dim=-1).long(),
        "text_indices": torch.arange(5),
        "video_indices": torch.arange(5, 9),
        "audio_indices": torch.arange(9, 12),
    }


def _omnigen_inputs(x: Ctx) -> dict[str, Any]:
    """OmniGen's stream: 5 prompt tokens, a time token, then the 16 image patches, all attending to all."""
    rows = 5 + 1 + (x.side // 2) ** 2
    return {
        "input_ids": torch.randint(1, 64, (2, 5), generator=x.generator),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(2, rows, rows),
        "position_ids": torch.arange(rows).expand(2, -1),
    }


def _size_conditions() -> dict[str, torch.Tensor]:
    """CogView-style SDXL micro-conditions: original and target (h, w) and crop corner, per sample."""
    size = torch.tensor([[64.0, 64.0]] * 2)
    return {"original_size": size, "target_size": size, "crop_coords": torch.zeros(2, 2)}


def _wan_animate_2_inputs(x: Ctx) -> dict[str, Any]:
    """Wan-Animate-2's reference pass ("extract"): per-sample lists of noisy and condition latents and
    prompts, and the KV cache the pass fills (rewritten, not appended to, on every call)."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    return {
        "hidden_states": list(x.latents()),
        "condition_latents": list(x.latents()),
        "encoder_hidden_states": list(x.text()),
        "kv_cache": WanAnimate2KVCache(len(x.model.blocks)),
        "kv_cache_mode": "extract",
        "seq_len": x.frames * (x.side // 2) ** 2,
        "offset_grid_sizes": torch.tensor([[x.frames, x.side // 2, x.side // 2]]),
    }


INPUTS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "AceStepTransformer1DModel": lambda x: {
        "hidden_states": x.batched(16, 2),  # [B, frames, acoustic channels]
        "context_latents": x.batched(16, 2),
        "timestep_r": x.steps() / 2,
    },
    "AnyFlowFARTransformer3DModel": lambda x: {**_frame_steps(x), "chunk_partition": [1, 1]},
    "AnyFlowTransformer3DModel": _frame_steps,
    "BriaFibo2Transformer2DModel": lambda x: {"encoder_hidden_states": x.batched(2, 5, 16)},  # 2 text bundles
    "BriaFiboTransformer2DModel": lambda x: {"text_encoder_layers": [x.text() for _ in range(3)]},  # one per block
    "CogView3PlusTransformer2DModel": lambda x: _size_conditions(),
    "CogView4Transformer2DModel": lambda x: _size_conditions(),
    "ControlNetUnionModel": lambda x: {
        "controlnet_cond": [x.control(), x.control()],  # one image per control type
        "control_type": torch.tensor([[1.0, 0.0]] * 2),
        "control_type_idx": [0],
    },
    "Cosmos3OmniTransformer": _cosmos3_inputs,
    "DiTTransformer2DModel": lambda x: {"class_labels": torch.tensor([1, 2])},
    "ErnieImageTransformer2DModel": lambda x: {"text_bth": x.text(), "text_lens": torch.tensor([5, 3])},
    "GlmImageTransformer2DModel": lambda x: {
        **{k: v for k, v in _size_conditions().items() if k != "original_size"},
        "prior_token_id": torch.randint(0, 8, (2, 16), generator=x.generator),  # one per image token
        "prior_token_drop": torch.tensor([False, True]),
    },
    "HiDreamImageTransformer2DModel": lambda x: {
        "encoder_hidden_states_t5": x.text(),
        "encoder_hidden_states_llama3": x.randn(3, 2, 5, 16),  # [llama layers, B, tokens, width]
        "pooled_embeds": x.batched(16),
    },
    "HunyuanDiT2DControlNetModel": _hunyuan_dit_inputs,
    "HunyuanDiT2DModel": _hunyuan_dit_inputs,
    "HunyuanVideo15Transformer3DModel": lambda x: {
        "encoder_hidden_states_2": x.text(),
        "encoder_attention_mask_2": x.mask(),
        "image_embeds": x.batched(3, 16),
    },
    "HunyuanVideoFramepackTransformer3DModel": lambda x: {
        "image_embeds": x.batched(3, 16),
        "indices_latents": torch.arange(x.frames),
        # FramePack's clean, 2x- and 4x-compressed history latents, with their frame indices
        "latents_clean": x.latents()[:, :, :1],
        "indices_latents_clean": torch.arange(1),
        "latents_history_2x": x.latents(),
        "indices_latents_history_2x": torch.arange(2),
        "latents_history_4x": torch.cat([x.latents(), x.latents()], dim=2),
        "indices_latents_history_4x": torch.arange(4),
    },
    "I2VGenXLUNet": lambda x: {
        "fps": torch.tensor([8.0, 8.0]),
        "image_latents": x.latents(),
        "image_embeddings": x.batched(16),
    },
    "Ideogram4Transformer2DModel": _ideogram_inputs,
    "JoyImageEditPlusTransformer3DModel": lambda x: {
        "hidden_states": x.batched(16, 4, 1, 2, 2),  # 16 patches of (C, t, h, w)
        "shape_list": [[(1, 4, 4)]] * 2,
    },
    "Kandinsky3UNet": lambda x: {"encoder_attention_mask": x.mask()},  # optional in the signature, not in the code
    "Kandinsky5Transformer3DModel": lambda x: {
        "visual_rope_pos": [torch.arange(x.frames), torch.arange(x.side // 2), torch.arange(x.side // 2)],
        "text_rope_pos": torch.arange(5),
    },
    "Kandinsky6SRTransformer3DModel": lambda x: {"hidden_states": x.batched(1, 8, 8, 9)},  # 2 x 4 + mask channels
    "Krea2Transformer2DModel": lambda x: {
        "encoder_hidden_states": x.batched(5, 1, 16),  # [B, tokens, tapped text-encoder layers, width]
        "position_ids": torch.cat(x.position_ids(3)[::-1]),  # text tokens first
    },
    "LTX2VideoTransformer3DModel": lambda x: {
        "num_frames": 1,
        "height": x.side // 2,
        "width": x.side // 2,
        "audio_hidden_states": x.batched(3, 4),
        "audio_num_frames": 3,
        "audio_encoder_hidden_states": x.text(),
    },
    "LTXVideoTransformer3DModel": lambda x: {"num_frames": 1, "height": x.side // 2, "width": x.side // 2},
    "LongCatAudioDiTTransformer": lambda x: {"encoder_attention_mask": x.mask()},
    "LuminaNextDiT2DModel": lambda x: {
        "encoder_mask": x.mask(),
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(8, 2 * x.side, 2 * x.side),
        "cross_attention_kwargs": {},  # its blocks unpack it unconditionally
    },
    "MiniMaxH3Transformer3DModel": _minimax_h3_inputs,
    "MiniMaxMusic3RVQDepthDecoder": lambda x: {"inputs_embeds": x.batched(4, 16)},
    "MiniMaxMusic3Transformer1DModel": lambda x: {"encoder_hidden_states": x.text(tokens=16)},  # one per frame
    "NucleusMoEImageTransformer2DModel": lambda x: {"img_shapes": _image_shapes(x)},
    "OmniGenTransformer2DModel": _omnigen_inputs,
    "PriorTransformer": lambda x: {"hidden_states": x.batched(16), "proj_embedding": x.batched(16)},
    # the prompt, then one slot per 2x2 latent tokens of the target image
    "QwenImage21Transformer2DModel": lambda x: {
        "img_shapes": _image_shapes(x),
        "img_mask": torch.tensor([False] * 5 + [True] * (x.side // 4) ** 2).expand(2, -1),
    },
    "QwenImageControlNetModel": lambda x: {"img_shapes": _image_shapes(x)},
    "QwenImageTransformer2DModel": lambda x: {"img_shapes": _image_shapes(x)},
    "RFD4ProteinaTransformer": lambda x: {
        "bb_ca": x.batched(8, 3),  # 8 residues
        "local_latents": x.batched(8, 4),
        "bb_ca_time": x.steps() / 1000,
        "local_latents_time": x.steps() / 1000,
        "padding_mask": torch.ones(2, 8, dtype=torch.bool),
        "conditioning": {
            "is_in_context_conditioning": torch.zeros(2, 8, dtype=torch.bool),
            "supports_local_latent": torch.ones(2, 8, dtype=torch.bool),
        },
    },
    "SanaWMLTX2RefinerTransformer3DModel": lambda x: {
        "video_rotary_emb": x.model.build_rotary_emb_for_absolute_positions(
            batch_size=2, frame_positions=[0], height=x.side // 2, width=x.side // 2, device="cpu", fps=24.0
        )
    },
    "SanaWMTransformer3DModel": lambda x: {
        "mask": x.mask(),
        "timestep": x.steps()[:, None, None].expand(2, 1, x.frames),  # [B, 1, frames]
    },
    "SparseControlNetModel": lambda x: {
        "encoder_hidden_states": x.text().repeat_interleave(x.frames, dim=0),  # one prompt per frame
        # its simplified condition encoder keeps the latents' size; every frame is a conditioning frame
        "controlnet_cond": x.randn(2, x.config["conditioning_channels"], x.frames, x.side, x.side),
        "conditioning_mask": torch.ones(2, 1, x.frames, x.side, x.side),
    },
    "StableAudio3DiTModel": lambda x: {"global_hidden_states": x.batched(16), "timestep": x.steps() / 1000},
    "StableAudioDiTModel": lambda x: {
        "global_hidden_states": x.batched(1, 16),
        # half-head rotary over the 16 frames and the prepended global token
        "rotary_embedding": get_1d_rotary_pos_embed(4, 17, use_real=True, repeat_interleave_real=False),
    },
    "StableCascadeUNet": lambda x: {"timestep_ratio": x.steps() / 1000, "clip_text_pooled": x.batched(1, 16)},
    "T5FilmDecoder": lambda x: {
        "encodings_and_masks": [(x.text(), x.mask())],
        "decoder_input_tokens": x.batched(16, 4),
        "decoder_noise_time": x.steps() / 1000,
    },
    "TransformerTemporalModel": lambda x: {
        "hidden_states": x.randn(2 * x.frames, 4, x.side, x.side),  # frames folded into the batch
        "num_frames": x.frames,
        "encoder_hidden_states": None,  # temporal self-attention only
    },
    "UNet1DModel": lambda x: {"sample": x.batched(4, 64), "timestep": x.steps()[:1]},  # 64 steps: 2 downsamples
    "UNetMotionModel": lambda x: {"encoder_hidden_states": x.text().repeat_interleave(x.frames, dim=0)},
    "UNetSpatioTemporalConditionModel": lambda x: {"added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2)},
    "UVit2DModel": lambda x: {
        "input_ids": torch.randint(0, 16, (2, 8, 8), generator=x.generator),
        "pooled_text_emb": x.batched(16),
        "micro_conds": torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]] * 2),
    },
    "WanAnimate2Transformer3DModel": _wan_animate_2_inputs,
    "WanAnimateTransformer3DModel": lambda x: {
        "pose_hidden_states": x.latents(channels=4)[:, :, 1:],  # one frame fewer than the latents
        "face_pixel_values": x.randn(2, 3, 4, 8, 8),  # 4 face frames -> 1 motion frame (+1 padding)
        "encoder_hidden_states_image": x.text(),
    },
    "WanVACETransformer3DModel": lambda x: {
        "control_hidden_states": x.latents(),
        "control_hidden_states_scale": torch.ones(2),  # one per VACE layer
    },
    "ZImageTransformer2DModel": lambda x: {
        "x": list(x.randn(2, 4, 1, 8, 8)),  # per-sample [C, F, H, W]
        "t": x.steps() / 1000,
        "cap_feats": list(x.text()),
    },
}
