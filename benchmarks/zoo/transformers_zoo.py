"""Tiny versions of every base-model type in transformers' `MODEL_MAPPING_NAMES`, built offline
from their default configs, with inputs that run them.

    python benchmarks/zoo/transformers_zoo.py [--only TYPE ...] [--output PATH]

`tiny_config(model_type)` shrinks the default config by generic rules on key names, applied
recursively to its sub-configs (hidden 64, FFN 128, 2 layers, 4 heads of 16, vocab 128 with every
special token inside it, 32 px images, ...), then applies the per-type data of
`transformers_overrides.py`. `build(model_type)` checks the size on the meta device, builds the
model with seeded weights, finds inputs that run it (text, images, audio, images with their
placeholder tokens, or the per-type input specs) and runs it twice: a returned `Built` runs and is
deterministic; anything else is a `ZooSkip` saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

if __package__:  # imported as `zoo.transformers_zoo` (benchmarks/ on sys.path, as coverage.py does)
    from . import MAX_PARAMETERS, Built, ZooSkip
    from .transformers_overrides import CONFIG_OVERRIDES, INPUTS, SKIPS
else:  # run as a script: import the package by its folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from zoo import MAX_PARAMETERS, Built, ZooSkip
    from zoo.transformers_overrides import CONFIG_OVERRIDES, INPUTS, SKIPS

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 2, 4, 2, 16, 128
BATCH, TOKENS, FIRST_ID = 2, 8, 3  # ids below FIRST_ID are usually pad / bos / eos
Params = Mapping[str, inspect.Parameter]  # a forward's signature
# Never turned into skip reasons: the zoo's own refusals, and a caller's alarm (coverage.py's)
PASS_THROUGH = (ZooSkip, TimeoutError)

# Shrink rules by key name, (pattern, target), the first match wins: an int above its target is
# lowered to it (nothing grows), a list of ints element by element.
_RULES: list[tuple[str, int]] = [
    (r"^mamba_(num|n)_heads$", 8),  # Mamba-2 heads x head width = expand (2) x hidden
    (r"^mamba_d_head$", HEAD_DIM),
    (r"(^|_)(num_)?(key_value|kv)_heads(_per_layer)?$|^n_kv_heads$|^multi_query_group_num$", KV_HEADS),
    (r"^(num_|n_)?(attention_)?heads(_per_layer)?$|attention_heads$|^n_head$", HEADS),
    (r"head_dim$|^dim_head$|^d_head$|^attention_head_dim$", HEAD_DIM),
    (r"^rotary_dim$", HEAD_DIM // 2),
    (r"^(kv|q|o)_lora_rank$", 32),
    (r"vocab_size", VOCAB),
    (r"intermediate|ffn|feed_?forward|(^|_)d?ff$|^dim_ff$|d_inner|n_inner|mlp_dim|linear_units|hidden_dim$", FFN),
    (r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$", 4),
    (r"^(num_experts_per_tok|moe_top_?k|moe_k|top_k|num_experts_per_token)$", 2),
    (r"^(n_shared_experts|num_shared_experts|n_group|topk_group|num_expert_group)$", 1),
    (r"^(hidden_size|d_model|n_embd|n_embed|dim|embed_dim|model_dim|emb_dim|embedding_size|embedding_dim)$", HIDDEN),
    (r"(^|_)(layers?|depth|n_layers?|num_blocks|indexes|indices|idxs|layer_ids)$", LAYERS),  # counts, indices
    (r"max_.*position|positions$|^n_ctx$|^max_seq_len|^max_length$|context_length$", 128),
    (r"^attention_window$", 16),
    (r"^(num_mel_bins|n_mel_bins)$", 16),
    (r"^(image_size|img_size)$", 32),
    (r"^patch_size$", 8),
    (r"^num_frames$", 4),
    (r"^num_queries$", 8),  # detection queries: a top-k of the anchors of a tiny image
    (r"tokens_per_image$", 4),  # pooled from the 4 x 4 patches of a tiny image
    (r"(^|_)(state_size|d_state)$", 16),
    (r"^(mamba_)?chunk_size$", 16),  # Mamba-2's scan pads the sequence to whole chunks (256: slow on CPU)
    (r"^num_groups$", 4),  # GroupNorm groups of the narrower channels
    (r"^num_filters$", 8),  # SEANet-style audio codecs double it at each of their 4+ downsamplings
    (r"^base_channels$", 32),  # VQ-VAE image tokenizers: full-resolution width (their GroupNorm has 32 groups)
    (r"^num_res_blocks$", 1),
    (r"^(num_embeddings|codebook_size)$", 128),  # codebook entries
]
# Size-like keys without a rule: one equal to a hidden / FFN width of the config tree (a sub-config's
# `encoder_hidden_size` naming its sibling's width, say) follows that width, one above 256 becomes HIDDEN.
_SIZE_LIKE = r"hidden|dim|size|width|channel|groups"
_NOT_SIZE = (
    r"chunk|window|sampling|sample_rate|samples|rate$|stride|kernel|image_size|img_size|patch|length|period|bucket"
    r"|^max_|position"
)
_TOKEN_ID = r"(token_id|token_index|_id|_index)$"
_NOT_SHRUNK = r"^(max_depth|min_depth|num_labels|id2label|label2id|dtype)$|_eps$|out_indices|out_features|proj_layers"


def model_types() -> list[str]:
    return sorted(MODEL_MAPPING_NAMES)


def _fields(config: PretrainedConfig) -> set[str]:
    """The constructor's keys: derived attributes (set in `__post_init__`) are left to recompute."""
    return {f.name for f in dataclasses.fields(type(config))}


def _sub_configs(config: PretrainedConfig) -> dict[str, PretrainedConfig]:
    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig) and k in _fields(config)}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rule_target(key: str) -> int | None:
    if re.search(_NOT_SHRUNK, key):
        return None
    return next((target for pattern, target in _RULES if re.search(pattern, key)), None)


def _is_size_key(key: str) -> bool:
    return bool(re.search(_SIZE_LIKE, key)) and not re.search(_NOT_SIZE, key) and _rule_target(key) is None


def _is_token_key(key: str) -> bool:
    return bool(re.search(_TOKEN_ID, key.rstrip("s"))) and not re.search(r"layer|block|index_|ignore", key)


def special_token_ids(config: PretrainedConfig) -> set[int]:
    """Every special token id (pad, bos, image token, ...) anywhere in the config tree."""
    ids = set()
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            ids |= special_token_ids(value)
        elif _is_token_key(key):
            ids |= {v for v in (value if isinstance(value, (list, tuple)) else [value]) if _int(v) and v >= 0}
    return ids


def _widths(config: PretrainedConfig, found: dict[int, int] | None = None) -> dict[int, int]:
    """Old hidden / FFN widths anywhere in the tree -> their tiny value (HIDDEN where one is both)."""
    found = {} if found is None else found
    for key, value in vars(config).items():
        target = _rule_target(key)
        if _int(value) and target in (HIDDEN, FFN) and value > target:
            found[value] = min(target, found.get(value, target))
    for sub in _sub_configs(config).values():
        _widths(sub, found)
    return found


def _rotary_dim(values: dict[str, Any]) -> int | None:
    """The rotated width per head (what mrope sections split), from a config's key -> value."""
    head_dim = values.get("qk_rope_head_dim") or values.get("head_dim")
    if head_dim is None and _int(values.get("num_attention_heads")) and _int(values.get("hidden_size")):
        head_dim = values["hidden_size"] // values["num_attention_heads"]
    return head_dim


def _rescale_sections(sections: list[int], total: int) -> list[int]:
    """`sections` scaled to sum to `total` (the largest remainders round up), each at least 1."""
    exact = [s * total / sum(sections) for s in sections]
    scaled = [max(1, int(x)) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: int(exact[i]) - exact[i])[: max(0, total - sum(scaled))]:
        scaled[i] += 1
    return scaled


def _spread(items: list[Any], count: int) -> list[Any]:
    """A per-layer list cut to `count` layers, keeping one layer of each kind where it can (a
    hybrid model's first layers are often all linear attention: keep a full-attention one too)."""
    kinds = list(dict.fromkeys(items)) if all(isinstance(v, (str, int, bool)) for v in items) else items
    return (kinds + items)[:count] if len(kinds) < count else kinds[:count]


@dataclasses.dataclass
class _Level:
    """What shrinking one config (not its sub-configs) needs to know about that config as a whole."""

    layers: dict[int, int]  # old layer count -> new, to cut per-layer lists
    stage_widths: dict[int, int]  # old -> new width in per-stage width lists (and the keys naming one)

    @classmethod
    def of(cls, items: dict[str, Any]) -> _Level:
        """Per-stage width lists are all divided by the power of two that brings the widest to at
        most 256: one divisor for all, so a stage's output still matches the next one's input."""
        layers = {v: min(v, LAYERS) for k, v in items.items() if _int(v) and _rule_target(k) == LAYERS}
        lists = [v for k, v in items.items() if _is_size_key(k) and isinstance(v, (list, tuple))]
        widths = {w for v in lists for w in v if _int(w) and w >= 16}  # not the 3 channels of an image
        divisor = 1 << max(0, (max(widths, default=1) - 1).bit_length() - 8)
        return cls(layers, {w: max(1, w // divisor) for w in widths if divisor > 1})


class _Shrinker:
    """The constructor overrides for one config tree: widths map alike across sub-configs, and
    every special token id (old value -> new) lands at the top of the tiny vocab."""

    def __init__(self, config: PretrainedConfig) -> None:
        self.widths = _widths(config)
        ids = special_token_ids(config)
        free = (i for i in range(VOCAB - 1, 0, -1) if i not in ids)
        self.token_ids = {old: next(free) for old in sorted(i for i in ids if i >= VOCAB)}

    def overrides(self, config: PretrainedConfig) -> dict[str, Any]:
        fields, subs = _fields(config), _sub_configs(config)
        # by field name (a kwarg), its value stored under the attribute_map's name (num_experts is kept
        # as num_local_experts, say)
        stored = {field: type(config).attribute_map.get(field, field) for field in fields - set(subs)}
        items = {field: vars(config)[name] for field, name in stored.items() if name in vars(config)}
        out, level = {}, _Level.of(items)
        for key, value in items.items():
            new = self.value(key, value, level)
            if new is not value and new != value:
                out[key] = new
        out.update(self.attention_fixes(config, items, out))
        out.update(_backbone_outputs(config, out))
        out.update(self.per_layer(config, items, out, level))
        for key, sub in subs.items():
            # A sub-config given as a dict is rebuilt from it alone: start from what differs from
            # its class defaults, as `save_pretrained` writes it (`_out_indices` as out_indices).
            names = {name.lstrip("_") for name in _fields(sub) - set(_sub_configs(sub))} | {"model_type"}
            out[key] = {**{k: v for k, v in sub.to_diff_dict().items() if k in names}, **self.overrides(sub)}
        return out

    def value(self, key: str, value: Any, level: _Level) -> Any:
        if _is_token_key(key) and isinstance(value, (list, tuple)):
            return type(value)(self.token_ids.get(v, v) if _int(v) else v for v in value)
        if _is_token_key(key):
            return self.token_ids.get(value, value) if _int(value) else value
        if _int(value):
            return self.scalar(key, value, _rule_target(key), level)
        if isinstance(value, (list, tuple)):
            return type(value)(self.sequence(key, list(value), level))
        return value

    def scalar(self, key: str, value: int, target: int | None, level: _Level) -> int:
        if value <= 0:
            return value
        if value in level.stage_widths and (target in (HIDDEN, FFN) or _is_size_key(key)):
            return level.stage_widths[value]
        if target == HEADS and re.search("heads", key) and not re.search("attention|n_head", key):
            return 1 << (min(value, 8).bit_length() - 1)  # a pyramid's stage heads: a power of two divides each width
        if target is not None:
            return min(value, target)
        return self.widths.get(value, HIDDEN if value > 256 else value) if _is_size_key(key) else value

    def sequence(self, key: str, items: list[Any], level: _Level) -> list[Any]:
        target = _rule_target(key)
        if len(items) in level.layers and level.layers[len(items)] < len(items):  # one entry per layer
            items = _spread(items, level.layers[len(items)])
        elif re.search(r"(layer_types|layers_block_type)$", key) and not level.layers:  # the layers themselves
            items = _spread(items, LAYERS)
        if not items or not all(_int(v) for v in items):
            return items
        if target == LAYERS and not re.search("num|depth", key):  # layer indices: keep them in range
            return list(dict.fromkeys(min(v, LAYERS - 1) for v in items))
        if target == LAYERS or key == "depths":  # blocks per stage
            return [min(v, 1) for v in items]
        if target is None and _is_size_key(key):  # per-stage widths
            return [level.stage_widths.get(v, v) for v in items]
        return [self.scalar(key, v, target, level) for v in items]

    def attention_fixes(self, config: PretrainedConfig, old: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        """Multi-head attention stays multi-head (MLA and some others require kv heads == heads), an
        MLA head stays its nope + rope parts, sizes a default leaves unset yet the model reads (vocab,
        head_dim, experts) are set, and mrope sections follow the head width."""
        fixes = {}
        for key in (k for k in old if _rule_target(k) == KV_HEADS and not isinstance(old[k], (list, tuple))):
            # its query heads: num_attention_heads for num_key_value_heads, n_head for n_kv_head, ...
            names = (re.sub("(key_value|kv)_heads", "attention_heads", key), re.sub("(key_value|kv)_", "", key))
            heads = next((name for name in names if old.get(name) and name != key), None)
            if heads and old[key] in (None, old[heads]):
                fixes[key] = out.get(heads, old[heads])
        nope, rope = old.get("qk_nope_head_dim"), old.get("qk_rope_head_dim")
        if _int(nope) and _int(rope) and old.get("head_dim") == nope + rope:
            fixes["head_dim"] = out.get("qk_nope_head_dim", nope) + out.get("qk_rope_head_dim", rope)
        for key, value in old.items():
            if value is None and re.search(r"^vocab_size$|^head_dim$|experts", key) and _rule_target(key):
                fixes[key] = _rule_target(key)
        rope_parameters = _rope_sections(config, old, {**old, **out, **fixes})
        return fixes | ({"rope_parameters": rope_parameters} if rope_parameters else {})

    def per_layer(
        self, config: PretrainedConfig, old: dict[str, Any], out: dict[str, Any], level: _Level
    ) -> dict[str, Any]:
        """A heterogeneous config's per-layer overrides (other head counts on its sliding layers,
        say) shrunk too: each kept layer takes those of the first old layer of its type."""
        spec = getattr(config, "_heterogeneity_spec", None)
        overrides, old_types = getattr(spec, "per_layer_overrides", None), old.get("layer_types")
        if not overrides or not old_types:
            return {}
        per_layer = {}
        for layer, kind in enumerate(out.get("layer_types", old_types)):
            source = overrides.get(old_types.index(kind), {})
            shrunk = {key: self.value(key, value, level) for key, value in source.items()}
            fixes = self.attention_fixes(config, {**old, **source}, {**out, **shrunk})
            per_layer[layer] = shrunk | {k: v for k, v in fixes.items() if k in spec.per_layer_attributes}
        return {"per_layer_config": {k: v for k, v in per_layer.items() if v}}


def _rope_sections(config: PretrainedConfig, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """`rope_parameters` with its mrope-style sections rescaled to the new rotary width, or added
    where the config's class says it uses mrope (the modeling code's defaults are full size)."""
    rope, old_dim, new_dim = old.get("rope_parameters"), _rotary_dim(old), _rotary_dim(new)
    if not isinstance(rope, dict) or not old_dim or not new_dim or old_dim == new_dim:
        return None
    sections = {k: v for k, v in rope.items() if k.endswith("_section") and isinstance(v, (list, tuple))}
    for key, value in sections.items():
        sections[key] = _rescale_sections(list(value), round(sum(value) * new_dim / old_dim))
    mrope = "mrope_section" in getattr(config, "ignore_keys_at_rope_validation", ())
    if not sections and mrope and "rope_type" in rope:  # (not a dict of per-layer-type ropes)
        rotated = new_dim * rope.get("partial_rotary_factor", new.get("partial_rotary_factor") or 1)
        sections["mrope_section"] = _rescale_sections([16, 24, 24], int(rotated) // 2)
    return {**rope, **sections} if sections else None


def _backbone_outputs(config: PretrainedConfig, out: dict[str, Any]) -> dict[str, Any]:
    """A ViT backbone's output stages are its layers: keep the ones it outputs among those kept."""
    indices, layers = getattr(config, "out_indices", None), out.get("num_hidden_layers")
    if not indices or layers is None or max(indices) <= layers:
        return {}
    kept = sorted({min(i, layers) for i in indices})
    return {"out_indices": kept, "out_features": [f"stage{i}" for i in kept]}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursing into sub-config dicts."""
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def tiny_config(model_type: str) -> PretrainedConfig:
    """The default config of `model_type`, shrunk. Only keys the default has are passed (sub-configs
    as dicts), to the constructor, so that what it derives from them (layer_types, ...) follows."""
    default = AutoConfig.for_model(model_type)
    overrides = _merge(_Shrinker(default).overrides(default), CONFIG_OVERRIDES.get(model_type, {}))
    return AutoConfig.for_model(model_type, **overrides)


# ----------------------------------------------------------------------------------------- inputs


def _find(config: PretrainedConfig, key: str, default: Any = None) -> Any:
    """`key` in the config, else in its sub-configs (vision ones first), breadth-first."""
    queue = [config]
    while queue:
        current = queue.pop(0)
        if getattr(current, key, None) is not None:
            return getattr(current, key)
        queue += sorted(_sub_configs(current).values(), key=lambda sub: "vision" not in type(sub).__name__.lower())
    return default


def _text_ids(
    config: PretrainedConfig, generator: torch.Generator, shape: tuple[int, ...] = (BATCH, TOKENS)
) -> torch.Tensor:
    """Token ids from FIRST_ID up, below the vocab, avoiding every special token id."""
    vocab = min(_find(config, "vocab_size", VOCAB) or VOCAB, VOCAB)
    allowed = torch.tensor([i for i in range(FIRST_ID, vocab) if i not in special_token_ids(config)])
    return allowed[torch.randint(len(allowed), shape, generator=generator)]


def _pixel_values(config: PretrainedConfig, params: Params, generator: torch.Generator) -> list[dict[str, Any]]:
    """Images [B, C, H, W], after videos [B, T, C, H, W] for a model with frames."""
    size = _find(config, "image_size", 32)
    image = (_find(config, "num_channels", 3), *((size, size) if _int(size) else tuple(size)[-2:]))
    frames = _find(config, "num_frames")
    videos = [torch.randn(BATCH, frames, *image, generator=generator)] if frames else []
    return [{"pixel_values": pixels} for pixels in [*videos, torch.randn(BATCH, *image, generator=generator)]]


def _with_mask(inputs: dict[str, Any], params: Params, frames: int) -> dict[str, Any]:
    """Audio inputs, plus an all-ones frame mask where the forward needs one."""
    required = [key for key, param in params.items() if param.default is inspect.Parameter.empty]
    mask = "input_features_mask" if "input_features_mask" in params else None
    mask = mask or ("attention_mask" if "attention_mask" in required else None)
    return {**inputs, mask: torch.ones(BATCH, frames, dtype=torch.long)} if mask else inputs


def _input_features(config: PretrainedConfig, params: Params, generator: torch.Generator) -> list[dict[str, Any]]:
    """Whisper-style [B, mel bins, frames] (the encoder halves the frames to its positions), then
    the [B, frames, features] of Speech2Text and the conformer encoders."""
    mel_bins = _find(config, "num_mel_bins") or _find(config, "input_feat_per_channel", 16)
    frames = 2 * _find(config, "max_source_positions", 32)
    features = torch.randn(BATCH, mel_bins, frames, generator=generator)
    return [
        _with_mask({"input_features": f}, params, frames) for f in (features, features.transpose(1, 2).contiguous())
    ]


def _input_values(config: PretrainedConfig, params: Params, generator: torch.Generator) -> list[dict[str, Any]]:
    """Raw audio [B, samples] (enough for a wav2vec2 conv stack), a codec's [B, channels, samples],
    or a spectrogram [B, frames, mel bins] (Audio Spectrogram Transformer)."""
    audio = torch.randn(BATCH, 4000, generator=generator)
    forms = [_with_mask({"input_values": audio}, params, 4000), {"input_values": audio[:, None]}]
    if mel_bins := _find(config, "num_mel_bins"):
        forms.append(
            {"input_values": torch.randn(BATCH, _find(config, "max_length", 128), mel_bins, generator=generator)}
        )
    return forms


def _image_inputs(
    config: PretrainedConfig, params: Params, generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """Images as the model may take them: `_pixel_values`, or (Qwen-VL style, where the forward
    takes a `grid_thw`) flattened patches with a (frames, rows, columns) grid per image."""
    grid_key = next((key for key in ("image_grid_thw", "grid_thw") if key in params), None)
    if grid_key is None:
        return _pixel_values(config, params, generator)
    vision = getattr(config, "vision_config", config)
    side = 2 * (getattr(vision, "spatial_merge_size", None) or 1)  # whole merge windows
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3
    width = channels * (getattr(vision, "temporal_patch_size", None) or 1) * vision.patch_size**2
    patches = torch.randn(BATCH * side * side, width, generator=generator)
    name = "hidden_states" if "hidden_states" in params else "pixel_values"
    return [{name: patches, grid_key: torch.tensor([[1, side, side]] * BATCH)}]


def _multimodal_inputs(model: PreTrainedModel, params: Params, generator: torch.Generator) -> dict[str, Any]:
    """Text with as many image tokens as the vision side makes embeddings, and the images ({} for
    a model without image tokens)."""
    config = model.config
    image_token = next(
        (t for t in (_find(config, "image_token_id"), _find(config, "image_token_index")) if _int(t)), None
    )
    if image_token is None or "pixel_values" not in params or not hasattr(model, "get_image_features"):
        return {}
    images = _image_inputs(config, params, generator)[-1]
    with torch.no_grad():
        features = model.get_image_features(**images)  # a tensor, a list of them, or an output
    features = getattr(features, "pooler_output", features)
    per_image = sum(t.numel() // t.shape[-1] for t in ([features] if torch.is_tensor(features) else features)) // BATCH
    text, middle = _text_ids(config, generator), [torch.full((BATCH, per_image), image_token)]
    start, end = _find(config, "vision_start_token_id"), _find(config, "vision_end_token_id")
    if _int(start) and _int(end):  # M-RoPE finds the images by their start token
        middle = [torch.full((BATCH, 1), start), *middle, torch.full((BATCH, 1), end)]
    ids = torch.cat([text[:, :2], *middle, text[:, 2:]], dim=1)
    extras = {"attention_mask": torch.ones_like(ids)}
    # Gemma 3 / PaliGemma (token_type_ids: images attend both ways), Qwen-VL (mm_token_type_ids: M-RoPE)
    extras |= {key: (ids == image_token).long() for key in ("token_type_ids", "mm_token_type_ids")}
    return {"input_ids": ids, **images, **{k: v for k, v in extras.items() if k in params}}


def _spec_input(kind: str, shape: tuple, config: PretrainedConfig, generator: torch.Generator) -> torch.Tensor:
    """One input of `transformers_overrides.INPUTS` (see there for the kinds)."""
    shape = tuple({"B": BATCH, "T": TOKENS}.get(size, size) for size in shape)
    if kind == "ids":
        return _text_ids(config, generator, shape)
    if kind == "box":  # two (x, y) points, sorted: x0 <= x1, y0 <= y1, inside the shrunk 2-D positions
        return torch.randint(100, (*shape[:-1], 2, 2), generator=generator).sort(dim=-2).values.reshape(shape)
    if kind.isdigit():
        return torch.full(shape, int(kind))
    if kind.startswith("int"):
        return torch.randint(int(kind[3:]), shape, generator=generator)
    if kind in ("float", "uniform"):
        return (torch.randn if kind == "float" else torch.rand)(shape, generator=generator)
    if kind == "false":
        return torch.zeros(shape, dtype=torch.bool)
    return (torch.ones if kind == "ones" else torch.zeros)(shape, dtype=torch.long)


_MAIN_INPUTS = {
    "input_ids": lambda config, params, generator: [{"input_ids": _text_ids(config, generator)}],
    "pixel_values": _pixel_values,
    "input_features": _input_features,
    "input_values": _input_values,
}


def _candidate_inputs(model_type: str, model: PreTrainedModel, seed: int) -> list[Callable[[], dict[str, Any]]]:
    """Input sets to try in order, made on demand (making one may fail too): images with their
    tokens for a multimodal model, each form of the main input (plus mask, decoder ids and the
    per-type inputs), then with the other modality that a dual encoder also needs."""
    config, params = model.config, inspect.signature(model.forward).parameters
    generator = torch.Generator().manual_seed(seed)
    main = model.main_input_name
    main = main[0] if isinstance(main, list) else main  # OneFormer: [pixel_values, task_inputs]
    given = {name: _spec_input(*spec, config, generator) for name, spec in INPUTS.get(model_type, {}).items()}
    if main in given or (given and main not in params):  # the per-type inputs are the whole set
        return [partial(dict, given)]
    if "grid_thw" in params or ("image_grid_thw" in params and "input_ids" not in params):  # a Qwen-VL-style tower
        return [partial(dict, inputs) for inputs in _image_inputs(config, params, generator)]
    if type(model).forward is torch.nn.Module.forward:
        raise ZooSkip(f"{type(model).__name__} has no forward (a container of sub-models)")
    if main not in _MAIN_INPUTS:
        raise ZooSkip(f"no inputs for its main input {main!r}")
    extras = {}
    if "attention_mask" in params and main == "input_ids":
        extras["attention_mask"] = torch.ones(BATCH, TOKENS, dtype=torch.long)
    if config.is_encoder_decoder and "decoder_input_ids" in params:
        extras["decoder_input_ids"] = _text_ids(config, generator)
    candidates = [{**inputs, **extras, **given} for inputs in _MAIN_INPUTS[main](config, params, generator)]
    if main == "input_ids" and "pixel_values" in params:
        candidates += [{**candidates[0], **images} for images in _image_inputs(config, params, generator)]
    if main != "input_ids" and "input_ids" in params:
        candidates += [{**inputs, "input_ids": _text_ids(config, generator)} for inputs in candidates]
    return [partial(_multimodal_inputs, model, params, generator)] + [partial(dict, c) for c in candidates]


# ------------------------------------------------------------------------------------------ build


def _model_class(model_type: str) -> type[PreTrainedModel]:
    """The base-model class (AutoModel's choice, without its lookup by config class)."""
    name = MODEL_MAPPING_NAMES[model_type]
    name = name[0] if isinstance(name, tuple) else name  # funnel: (FunnelModel, FunnelBaseModel)
    if not hasattr(transformers, name):
        raise ZooSkip(f"transformers {transformers.__version__} has no class {name}")
    return getattr(transformers, name)


def _model_config(cls: type[PreTrainedModel], config: PretrainedConfig) -> PretrainedConfig:
    """The config `cls` takes: the sub-config of its class where the base model is one part of a
    composite (MusicgenModel is the decoder of a MusicgenConfig)."""
    if isinstance(config, cls.config_class):
        return config
    return next((sub for sub in _sub_configs(config).values() if isinstance(sub, cls.config_class)), config)


def _instantiate(cls: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    try:
        return cls._from_config(config, attn_implementation="eager")
    except (ValueError, NotImplementedError):  # eager refused: the model's own default
        return cls._from_config(config)


def _parameter_count(cls: type[PreTrainedModel], config: PretrainedConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _instantiate(cls, config).parameters())


def _builds_at_default_size(model_type: str) -> bool:
    """Whether the default config builds (on the meta device): if not, the shrinking is not to blame."""
    try:
        cls = _model_class(model_type)
        _parameter_count(cls, _model_config(cls, AutoConfig.for_model(model_type)))
    except Exception:  # any failure answers the question
        return False
    return True


def _big_keys(config: PretrainedConfig, prefix: str = "") -> list[str]:
    """Config entries that still look big (for the reason of a size refusal)."""
    found = []
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            found += _big_keys(value, f"{prefix}{key}.")
        elif _int(value) and value > 256 and not _is_token_key(key):
            found.append(f"{prefix}{key}={value}")
    return found


def _error(error: Exception) -> str:
    """`Type: message` on one line, at most 300 characters (a validation error's last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if type(error).__name__.startswith("Strict") and lines else " ".join(lines)
    return f"{type(error).__name__}: {message}"[:300]


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # ModelOutput included
        output = list(output.values())
    return [t for item in output for t in _tensors(item)] if isinstance(output, (list, tuple)) else []


def _forward(model: PreTrainedModel, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The output tensors, the RNG seeded (as the coverage sweep does: some forwards draw noise)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _tensors(model(**inputs))


def _run(model_type: str, model: PreTrainedModel, seed: int) -> dict[str, Any]:
    """The first candidate input set that runs the model, checked: no NaN out, and a second run
    gives the same outputs."""
    try:
        candidates = _candidate_inputs(model_type, model, seed)
    except PASS_THROUGH:
        raise
    except Exception as error:  # only a ZooSkip leaves build()
        raise ZooSkip(f"no inputs: {_error(error)}") from error
    errors = {}
    for attempt, make_inputs in enumerate(candidates):
        try:
            if inputs := make_inputs():
                outputs = _forward(model, inputs)
                break
        except PASS_THROUGH:
            raise
        except Exception as error:  # any failure means: try the next input set
            errors[attempt] = _error(error)
    else:  # the multimodal attempt (0) comes first, but the main input's error says more
        first = min(errors, key=lambda i: (i == 0, i), default=None)
        raise ZooSkip(f"does not run at tiny size: {errors[first]}" if errors else "no input set applies")
    if any(t.isnan().any() for t in outputs if t.is_floating_point()):  # (-inf is fine: masked logits)
        raise ZooSkip("its forward returns NaN at tiny size")
    if not all(torch.equal(a, b) for a, b in zip(outputs, _forward(model, inputs))):
        raise ZooSkip("its forward is not deterministic")  # a sweep comparing two forwards would fail it
    return inputs


def _build_model(model_type: str, seed: int) -> tuple[PreTrainedModel, int]:
    """The tiny model (fp32, eval, weights drawn from `seed`) and its parameter count."""
    try:
        cls = _model_class(model_type)
        config = _model_config(cls, tiny_config(model_type))
        parameters = _parameter_count(cls, config)
        if parameters > MAX_PARAMETERS:
            raise ZooSkip(f"{parameters:,} parameters after shrinking; big keys: {', '.join(_big_keys(config))}")
        torch.manual_seed(seed)
        return _instantiate(cls, config).float().eval(), parameters
    except PASS_THROUGH:
        raise
    except ImportError as error:  # transformers says "... requires the timm library ..."
        package = re.search(r"requires the (\S+) library", str(error))
        raise ZooSkip(f"needs {package[1] if package else error.name or error}") from error
    except Exception as error:  # the sweep records any build failure as a skip
        default = "" if _builds_at_default_size(model_type) else " (nor at its default size)"
        raise ZooSkip(f"does not build{default}: {_error(error)}") from error


def build(model_type: str, seed: int = 0) -> Built:
    """The tiny `model_type` (fp32, eval, weights drawn from `seed`) and inputs that run it; ZooSkip
    with the reason where it cannot be built or run tiny."""
    if model_type in SKIPS:
        raise ZooSkip(SKIPS[model_type])
    with torch.random.fork_rng(devices=[]):  # the caller's RNG untouched, whatever a model draws
        model, parameters = _build_model(model_type, seed)
        inputs = _run(model_type, model, seed)
    return Built(model_type, model, inputs, notes=f"{parameters:,} parameters; inputs {sorted(inputs)}")


# ------------------------------------------------------------------------------------------- main


def _on_alarm(signum: int, frame: Any) -> None:
    raise TimeoutError


def _sweep_one(model_type: str, timeout: int) -> dict[str, Any]:
    start = time.perf_counter()
    signal.alarm(timeout)
    try:
        built = build(model_type)
        record = {"status": "ok", "reason": "", "parameters": sum(p.numel() for p in built.model.parameters())}
    except ZooSkip as skip:
        record = {"status": "skip", "reason": str(skip), "parameters": None}
    except TimeoutError:
        record = {"status": "skip", "reason": f"timed out after {timeout} s", "parameters": None}
    finally:
        signal.alarm(0)
    return {"model_type": model_type, **record, "seconds": round(time.perf_counter() - start, 2)}


def _reason_group(reason: str) -> str:
    """A skip reason without its particulars: up to the exception type, the package, ..."""
    reason = re.sub(r"^[\d,]+ parameters after shrinking.*", "too many parameters after shrinking", reason)
    return ":".join(reason.split(":")[:2])[:70]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="TYPE", help="these model types (default: all)")
    parser.add_argument("--output", default="/tmp/transformers_zoo.json", help="where the JSON records go")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per model type")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGALRM, _on_alarm)
    start, records = time.perf_counter(), []
    for model_type in args.only or model_types():
        records.append(record := _sweep_one(model_type, args.timeout))
        print(f"{model_type:40} {record['status']:4} {record['seconds']:6.2f}s {record['reason'][:150]}")
    ok = sum(r["status"] == "ok" for r in records)
    print(f"\n{ok} of {len(records)} model types built and ran in {time.perf_counter() - start:.0f} s; skips:")
    for reason, count in Counter(_reason_group(r["reason"]) for r in records if r["status"] == "skip").most_common():
        print(f"{count:5}  {reason}")
    Path(args.output).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
