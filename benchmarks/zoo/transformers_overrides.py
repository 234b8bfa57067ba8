"""Per-model-type exceptions to `transformers_zoo`'s generic shrinking and inputs, as data: what
the rules on key names cannot know (a layer pattern given by periods, a width a model hard-codes,
inputs beyond text / images / audio)."""

from __future__ import annotations

from typing import Any

# ----------------------------------------------------------------------------------------- config

# Swin-style windowed pyramids build their relative-position table for the configured window, so
# every stage must be at least one window wide (64 px / patch 4 / 3 merges = 2).
_SWIN = {"image_size": 64, "window_size": 2}
# EfficientNet hard-codes its stem and head widths (32, 1280), scaled by width_coefficient only:
# the stage widths stay as they are and the coefficients shrink instead.
_EFFICIENTNET = {
    "in_channels": [32, 16, 24, 40, 80, 112, 192],
    "out_channels": [16, 24, 40, 80, 112, 192, 320],
    "width_coefficient": 0.5,
    "depth_coefficient": 0.5,
    "hidden_dim": 640,  # round_filters(1280) at width 0.5
}
# DETR-style detectors default to timm's resnet50 (timm is not installed): transformers' own ResNet,
# tiny, with the same four output stages.
_RESNET = {
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "out_indices": [1, 2, 3, 4],
    }
}
_DAC = {"encoder_hidden_size": 8, "decoder_hidden_size": 32}  # DAC codecs double the width per downsampling
_MROPE = {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [2, 3, 3]}  # for head_dim 16
# Zamba ties one shared attention block across its hybrid layers, so it needs two of them.
_ZAMBA_LAYERS = {
    "num_hidden_layers": 4,
    "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
}
_QWEN4_INDEXER = {  # the sparse-attention indexer's sizes: unset, and required, by default
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 16,
    "indexer_compress_ratio": 4,
}
# Time-series transformers: 8 steps of context plus 3 lags (11 past values), 4 predicted.
_FORECAST = {"prediction_length": 4, "context_length": 8, "lags_sequence": [1, 2, 3], "num_time_features": 1}

# model_type -> config kwargs (sub-configs as dicts) applied over the generic shrinking.
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "align": {"vision_config": _EFFICIENTNET, "projection_dim": 160},  # = the vision pooler's width
    "autoformer": _FORECAST,
    "bamba": {"attn_layer_indices": [1]},  # hybrid: its one attention layer among the first two
    "blip-2": {"image_token_index": 120},  # None by default: no image placeholder to fill
    "chameleon": {"vocabulary_map": {"<image>": 120}},  # None by default, yet read
    # Its audio Swin's four stages are its "hidden layers"; the mel spectrogram is folded into a
    # spec_size x spec_size image (time x mel bins = spec_size**2), widths doubling per stage to 64.
    "clap": {
        "audio_config": {
            "num_hidden_layers": 4,
            "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 2, 4, 8],
            "spec_size": 128,
            "num_mel_bins": 32,
            "patch_embeds_hidden_size": 8,
            "window_size": 2,
        }
    },
    # The rotary embedding reads one rope dict per layer type; the default config has none.
    "cohere_compass": {"text_config": {"rope_parameters": {"full_attention": _MROPE}}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": _MROPE}},
    "conditional_detr": _RESNET,
    "cvt": {"depth": [1, 2, 3]},  # stage i indexes its drop-path rates by i: depth > i
    "dab-detr": _RESNET,
    "dac": _DAC,
    "dbrx": {"attn_config": {"rope_theta": 10_000.0, "clip_qkv": 8.0}},  # unset by default, yet read
    # Patches of patch_size are cut from the image at 1/4, 1/2 and 1/1 scale (64 px for 16 px
    # patches); the hook ids index the 2 encoder layers.
    "deformable_detr": _RESNET,
    "depth_pro": {"patch_size": 16, "intermediate_hook_ids": [1, 0]},
    "detr": _RESNET,
    "donut-swin": _SWIN,
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 0, "n_output_layers": 1},  # they sum to the layers
    # Its sliding layers' heads are qk_nope + qk_rope wide, the global head_dim is not.
    "dots3_note": {"text_config": {"head_dim": 32}},
    "dots3_note_text": {"head_dim": 32},
    "efficientnet": _EFFICIENTNET,
    "emu3": {"vocabulary_map": {"<image>": 120}},
    "esm": {"pad_token_id": 1, "mask_token_id": 2},  # None by default, yet the embeddings need them
    "falcon_h1": {"mamba_d_ssm": 128},  # = mamba heads x head width
    "fun_asr_nano": {"adaptor_config": {"intermediate_size": 16}},  # must be the text hidden // 4
    "gemma3n_text": {"num_kv_shared_layers": 0},  # of 35 layers, the last 15 reuse earlier KV caches
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # expands to one type per layer
    # All linear attention by default, yet its forward reads the length of an attention cache.
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "informer": _FORECAST,
    "instructblip": {"image_token_index": 120},
    "instructblipvideo": {"video_token_index": 120},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # attention on layer 1, not 4 of 8
    "kosmos-2": {"latent_query_num": 8},  # image embeddings fill the 8 text positions the mask marks
    "layoutlmv3": {"coordinate_size": 10, "shape_size": 12},  # 4 x 10 + 2 x 12 = hidden 64
    "levit": {"image_size": 64, "patch_size": 16},  # its stem downsamples 16x, whatever patch_size says
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # None by default, yet read
    "lilt": {"hidden_size": 96},  # six box embeddings of hidden // 6 are concatenated
    "maskformer-swin": _SWIN,
    "mobilevitv2": {"image_size": 64},  # five stride-2 stages, then 2 x 2 unfolding
    "moonshine_streaming": {"num_key_value_heads": 4},  # unset by default, yet read
    "paddleocr_vl": {"text_config": {"rope_parameters": {"mrope_section": [2, 3, 3]}}},  # else [16, 24, 24]
    "pe_audio": {"audio_config": {"dac_config": _DAC}},
    "pe_audio_encoder": {"dac_config": _DAC},
    "perceiver": {"d_latents": 64, "num_latents": 16, "num_self_attends_per_block": 2},
    # Their M-RoPE reads vision_start_token_id, which the thinker configs do not define.
    "qwen2_5_omni_thinker": {"vision_start_token_id": 119},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 119},
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    "qwen4_exp_text": _QWEN4_INDEXER,
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # not recurrent, recurrent: no attention
    "reformer": {"axial_pos_shape": [8, 16], "axial_pos_embds_dim": [32, 32]},  # 8 x 16 positions, 32 + 32 wide
    "sam": {"vision_config": {"num_pos_feats": 32}},  # its positional encoding is hidden // 2 wide
    "sam_hq": {"vision_config": {"num_pos_feats": 32}},
    "swin": _SWIN,
    "swinv2": _SWIN,
    "t5gemma2_encoder": {"text_config": {"dropout_rate": 0.0}},  # unset by default, yet read
    "table-transformer": _RESNET,
    "time_series_transformer": _FORECAST,
    # Its shared block attends over the hidden state concatenated with the embeddings (2 x 64).
    "zamba": {**_ZAMBA_LAYERS, "attn_layer_period": 2, "attn_layer_offset": 1, "attention_hidden_size": 128},
    "zamba2": {**_ZAMBA_LAYERS, "hybrid_layer_ids": [1, 3]},
}

# ----------------------------------------------------------------------------------------- inputs

_VIDEOS = ("float", ("B", 4, 3, 32, 32))  # 4 frames of 32 x 32
_TEXT_LINE = {"pixel_values": ("float", ("B", 3, 48, 160))}  # OCR recognizers pool a 48 px high text line
# NaFlex-style vision towers: 16 flattened 8 x 8 patches (3 x 8 x 8 = 192) on a 4 x 4 grid.
_PATCHES = {
    "pixel_values": ("float", ("B", 16, 192)),
    "pixel_attention_mask": ("ones", ("B", 16)),
    "spatial_shapes": ("4", ("B", 2)),
}
_FORECAST_INPUTS = {
    "past_values": ("float", ("B", 11)),
    "past_time_features": ("float", ("B", 11, 1)),
    "past_observed_mask": ("ones", ("B", 11)),
}

# model_type -> inputs added to the generic ones, name -> (kind, shape). Kinds: "float" (normal),
# "uniform" (0..1), "ids" (text token ids), "box" (x0 <= x1, y0 <= y1 below 100), "int<N>" (below N),
# "<N>" (N everywhere), "ones", "zeros", "false" (bool). In a shape, "B" is the batch size and "T"
# the number of text tokens. Where they hold the model's main input (or it has none), they are
# the whole input set.
INPUTS: dict[str, dict[str, tuple[str, tuple[int | str, ...]]]] = {
    "autoformer": _FORECAST_INPUTS,
    "blip_2_qformer": {"query_embeds": ("float", ("B", 4, 64)), "encoder_hidden_states": ("float", ("B", 16, 64))},
    "bros": {"bbox": ("uniform", ("B", "T", 8))},
    "clap": {"input_features": ("float", ("B", 1, 512, 32))},  # 512 frames x 32 mel bins
    "decision_transformer": {
        "states": ("float", ("B", "T", 17)),
        "actions": ("float", ("B", "T", 4)),
        "rewards": ("float", ("B", "T", 1)),
        "returns_to_go": ("float", ("B", "T", 1)),
        "timesteps": ("int8", ("B", "T")),
        "attention_mask": ("ones", ("B", "T")),
    },
    "depth_pro": {"pixel_values": ("float", ("B", 3, 64, 64))},
    "dia": {"input_ids": ("ids", ("B", "T")), "decoder_input_ids": ("ids", ("B", "T", 9))},  # 9 codebooks
    "gemma3n_audio": {"audio_mel": ("float", ("B", 64, 128)), "audio_mel_mask": ("false", ("B", 64))},
    "gemma4_vision": {"pixel_values": _PATCHES["pixel_values"], "pixel_position_ids": ("int4", ("B", 16, 2))},
    "informer": _FORECAST_INPUTS,
    "instructblip": {"qformer_input_ids": ("ids", ("B", "T"))},
    "instructblipvideo": {
        "pixel_values": _VIDEOS,
        "qformer_input_ids": ("ids", ("B", "T")),
        "input_ids": ("ids", ("B", "T")),
    },
    "kosmos-2": {"input_ids": ("ids", ("B", "T")), "image_embeds_position_mask": ("ones", ("B", "T"))},
    "layoutlmv3": {"bbox": ("box", ("B", "T", 4))},
    "lightglue": {"pixel_values": ("float", ("B", 2, 3, 32, 32))},  # pairs of images to match
    "lilt": {"bbox": ("box", ("B", "T", 4))},
    "lxmert": {"visual_feats": ("float", ("B", 4, 64)), "visual_pos": ("uniform", ("B", 4, 4))},
    "mimi_decoder": {"latents": ("float", ("B", 64, 4))},  # 4 frames of hidden-size latents
    "muse_glimmer_assistant": {
        "noise_embeds": ("float", ("B", "T", 64)),
        "context_hidden_states": ("float", ("B", "T", 64)),
    },
    "musicgen": {"input_ids": ("ids", (8, "T"))},  # a row per codebook (4) of each sample
    "musicgen_melody": {"input_ids": ("ids", (8, "T"))},
    "nemotron3_5_transcribe_word_timestamp": {"inputs_embeds": ("float", ("B", "T", 64))},
    "oneformer": {"task_inputs": ("ids", ("B", 77))},  # the task prompt is text_encoder_context_length long
    "patchtsmixer": {"past_values": ("float", ("B", 32, 1))},  # context 32, 1 channel
    "patchtst": {"past_values": ("float", ("B", 32, 1))},
    "pe_audio": {"input_values": ("float", ("B", 1, 4000))},
    "perceiver": {"inputs": ("float", ("B", "T", 64))},  # already embedded (no preprocessor)
    "pocket_tts_audio_tokenizer_decoder": {"latents": ("float", ("B", 64, 4))},
    "pp_ocrv5_mobile_rec": {"pixel_values": ("float", ("B", 3, 96, 160))},
    "pp_ocrv5_server_rec": _TEXT_LINE,
    "pp_ocrv6_small_rec": _TEXT_LINE,
    "pp_ocrv6_tiny_rec": _TEXT_LINE,
    # Its feature length must be a multiple of 2 x n_window (50).
    "qwen3_asr_encoder": {"input_features": ("float", ("B", 16, 100)), "input_features_mask": ("ones", ("B", 100))},
    # SegGPT stacks the image over its prompt: two 16 x 32 halves of a 32 x 32 input.
    "seggpt": {
        "pixel_values": ("float", ("B", 3, 16, 32)),
        "prompt_pixel_values": ("float", ("B", 3, 16, 32)),
        "prompt_masks": ("float", ("B", 3, 16, 32)),
    },
    "siglip2": {**_PATCHES, "input_ids": ("ids", ("B", "T"))},
    "siglip2_vision_model": _PATCHES,
    "speecht5": {"input_values": ("float", ("B", "T", 64)), "decoder_input_values": ("float", ("B", "T", 64))},
    "time_series_transformer": _FORECAST_INPUTS,
    "timesfm": {
        "past_values": ("float", ("B", 128)),
        "past_values_padding": ("zeros", ("B", 128)),
        "freq": ("zeros", ("B", 1)),
    },
    "timesfm2_5": {"past_values": ("float", ("B", 128))},
    "udop": {"bbox": ("box", ("B", "T", 4))},
    "vibevoice_acoustic_tokenizer_decoder": {"hidden_states": ("float", ("B", 64, 4))},  # latents
    "vibevoice_acoustic_tokenizer_encoder": {"hidden_states": ("float", ("B", 1, 3200))},  # raw audio
    "videoprism": {"pixel_values_videos": _VIDEOS, "input_ids": ("ids", ("B", "T"))},
    "videoprism_vision_model": {"pixel_values_videos": _VIDEOS},
    "vjepa2": {"pixel_values_videos": _VIDEOS},
    "voxtral_realtime": {"input_ids": ("ids", ("B", "T")), "input_features": ("float", ("B", 16, 64))},
    "wav2vec2-bert": {"input_features": ("float", ("B", 64, 160))},  # 2 stacked frames of 80 mel bins
    "xmod": {"lang_ids": ("zeros", ("B",))},
}

# ------------------------------------------------------------------------------------------ skips

_TRACKER = "its forward takes a video inference session (stateful tracking), not tensors"

# model_type -> why it cannot be built or run tiny and offline (without trying).
SKIPS: dict[str, str] = {
    "edgetam_video": _TRACKER,
    "sam2_video": _TRACKER,
    "sam3_tracker_video": _TRACKER,
    "sam3_video": _TRACKER,
}
