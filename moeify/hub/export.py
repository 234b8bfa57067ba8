"""`moeify.export(model, directory, format)`: a converted Llama-family causal LM as a native
transformers MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) that plain
`AutoModelForCausalLM.from_pretrained(directory)` loads, with the moeify model's logits.

Check everything (moeify.hub.export_formats: the registered formats, each one's handler declaring
what it holds, its config fields and tensor names; every refusal), then write: the checkpoint goes to a temporary sibling directory, is reloaded
with plain transformers and compared, and only then moved into place; a refused or failed export
leaves no directory behind. Routing is softmax → top-k → renormalise in moeify and in all three
targets (`norm_topk_prob=True`); a model converted with normalize_topk=False keeps the raw
probabilities, which the Qwen formats write as `norm_topk_prob=False` and Mixtral (always
renormalising) refuses. Fine-grained experts (granularity G) are experts of width I / G
(`moe_intermediate_size`, Mixtral's `intermediate_size`); their w_out scaling by G is just
weights. What maps, exactly:
  router gate.weight       → mlp.gate.weight / router_temperature (powers of two only: exact)
  experts w_in [E, 2I, D]  → mlp.experts.gate_up_proj (both [gate; up]); w_out → down_proj
  S shared experts         → Qwen2-MoE's one shared_expert of width S·I (a sum of S MLPs is one
                             wider MLP); its gate sigmoid(shared_expert_gate(x)) is exactly 1/2
                             with a zero weight, and the shared down_proj is doubled (x2, x1/2:
                             exact in binary floating point)
  dense layers             → mlp_only_layers (Qwen formats)
  attention, norms, embeds → by name; a bias only the target has is zero, a base tensor the
                             target has no place for must be all zero

Shape legend: D model dim, I expert intermediate dim, E experts, S shared experts.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moeify.atomic import as_directory, staged_directory
from moeify.hub.companions import Saveable, check_savers, write_companions
from moeify.hub.export_formats import (
    BASES,
    ExportError,
    ExportFormat,
    ExportSource,
    MoeShape,
    check_model,
    check_shapes,
    export_format,
    export_format_names,
)
from moeify.hub.formats.base import is_zero, refuse
from moeify.layers.inventory import moe_layers
from moeify.layers.moe import MoeLayer

if TYPE_CHECKING:
    from transformers import PretrainedConfig


# Base config fields the targets read under the same names and meanings.
COPIED_FIELDS = tuple(
    "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads hidden_act "
    "max_position_embeddings initializer_range rms_norm_eps tie_word_embeddings rope_parameters "
    "attention_dropout pad_token_id bos_token_id eos_token_id".split()
)


def _windows(config: PretrainedConfig) -> list[int | None]:
    """The sliding window of each layer's attention (None: full attention), as the model runs it:
    per layer where the config has `layer_types` (Qwen2, Qwen3, Qwen2-MoE), else one for all
    (Mistral, Mixtral, Qwen3-MoE; Llama has none)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in layer_types]


def _source(handler: ExportFormat, model: nn.Module, shape: MoeShape, dense: list[int]) -> ExportSource:
    windows = _windows(model.config)
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        raise handler.refuse(f"the layers use different sliding windows {sizes}; the native formats have one")
    keys = model.state_dict().keys()
    attention_bias = any(k.endswith("self_attn.q_proj.bias") for k in keys)
    return ExportSource(model.config, shape, dense, windows, sizes[0] if sizes else None, attention_bias)


def _target_config(
    handler: ExportFormat, model: nn.Module, source: ExportSource, dtype: torch.dtype
) -> PretrainedConfig:
    from transformers import AutoConfig

    base = model.config
    fields = {name: getattr(base, name) for name in COPIED_FIELDS if hasattr(base, name)}
    fields |= {
        "head_dim": getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads,
        "dtype": dtype,
        "num_experts_per_tok": source.shape.top_k,
        "output_router_logits": False,
    }
    fields |= handler.config_fields(source)
    config = AutoConfig.for_model(handler.model_type or handler.name, **fields)
    if _windows(config) != source.windows:
        raise handler.refuse(f"the attention windows per layer {source.windows} cannot be expressed in {handler.name}")
    return config


def _target_state(
    handler: ExportFormat, model: nn.Module, layers: dict[int, MoeLayer], target: nn.Module, dtype: torch.dtype
) -> dict:
    """Every tensor of the target model, by its name; refuses a base tensor with no exact place."""
    fmt = handler.name
    produced: dict[str, Tensor] = {}
    for index, layer in layers.items():
        produced |= handler.moe_tensors(f"model.layers.{index}.mlp", layer, dtype)
    moe_prefixes = tuple(f"model.layers.{index}.mlp." for index in layers)
    base = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(moe_prefixes)}
    state, absent = {}, []
    for key, meta in target.state_dict().items():
        value = produced.get(key, base.get(key))
        if value is None and key.endswith(".bias"):
            value = torch.zeros(meta.shape, dtype=dtype)  # a bias the base does not have: zero is exact
        if value is None or value.shape != meta.shape:
            absent.append(key if value is None else f"{key} {tuple(value.shape)} vs {tuple(meta.shape)}")
        state[key] = value
    if absent:
        raise refuse(
            fmt, f"{fmt} needs tensors the {model.config.model_type} model has no exact match for: {absent[:4]}"
        )
    extra = [k for k, v in base.items() if k not in state and not is_zero([v])]
    if extra:
        raise refuse(fmt, f"{fmt} has no place for these {model.config.model_type} tensors: {extra[:4]}")
    return state


def _export_dtype(model: nn.Module) -> torch.dtype:
    dtype = model.get_input_embeddings().weight.dtype
    if dtype != torch.float32:
        warnings.warn(
            f"exporting in {dtype}: the native routers run in {dtype} where moeify's run in float32, so routes "
            "may differ on near ties; the logits check only runs for float32 models",
            stacklevel=4,
        )
    return dtype


def _build_native(model: nn.Module, format: str) -> nn.Module:
    """The native transformers MoE model equal to `model` (parameters share storage where they can;
    rotary buffers stay on the meta device, so use it to save, not to run). Raises ExportError."""
    from transformers import AutoModelForCausalLM

    handler = export_format(format)  # the registered handler (moeify.hub.export_formats): no per-format code here
    layers = check_model(model, handler)
    shape, dense = check_shapes(handler, model.config, layers)
    source = _source(handler, model, shape, dense)
    dtype = _export_dtype(model)
    config = _target_config(handler, model, source, dtype)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target.load_state_dict(_target_state(handler, model, layers, target, dtype), strict=True, assign=True)
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    return target


@torch.no_grad()
def _max_logit_diff(model: nn.Module, directory: Path) -> tuple[float, float]:
    """Reload `directory` with plain transformers and compare its logits with the moeify model's on
    fixed random tokens; the moeify model's mode and routing counters are left as they were."""
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    native = AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    saved = [(layer, layer.loss_state()) for _, layer in moe_layers(model)]
    training = model.training
    try:
        expected = model.eval()(input_ids=ids).logits.float()
    finally:
        model.train(training)
        for layer, state in saved:
            layer.restore_loss_state(state)
    actual = native(input_ids=ids).logits.float()
    return (actual - expected).abs().max().item(), expected.abs().max().item()


def _prepare_directory(directory: Path, overwrite: bool) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise ExportError(f"moeify.export: {directory} exists and is not empty; pass overwrite=True to replace it")


def export(
    model: nn.Module,
    directory: str | os.PathLike,
    format: str,
    *,
    verify: bool = True,
    tolerance: float = 1e-5,
    overwrite: bool = False,
    tokenizer: Saveable | None = None,
    processor: Saveable | None = None,
) -> Path:
    """Write `model` (a moeify-converted Llama / Mistral / Qwen2 / Qwen3 causal LM with linear
    routers) as a native transformers `format` checkpoint: "mixtral", "qwen2_moe", "qwen3_moe", or a
    format added with `register_export_format` (moeify.hub.export_formats).

    The directory gets the target class's own `save_pretrained` output (config.json,
    model.safetensors, generation_config.json) and the tokenizer / chat template / processor
    files (moeify.hub.companions): `tokenizer` / `processor` (anything with `save_pretrained`)
    saved into it, else the files found beside the model's source (the dense checkpoint, or the
    moeify checkpoint it was loaded from), so `transformers.pipeline("text-generation",
    model=directory)` works as is. With `verify`, the written checkpoint is reloaded
    with plain transformers and its logits must match the moeify model's within `tolerance` times
    the logit scale (float32 models), else nothing is written. Raises `ExportError` (a ValueError)
    naming what cannot be represented; no directory is left behind on failure. Returns the path.
    """
    directory = as_directory(directory, "moeify.export")
    if not isinstance(verify, bool) or not (isinstance(tolerance, (int, float)) and 0 < tolerance < float("inf")):
        raise ExportError(
            f"moeify.export: verify must be True/False and tolerance a positive number, got {verify!r}, {tolerance!r}"
        )
    check_savers("moeify.export", tokenizer=tokenizer, processor=processor)
    _prepare_directory(directory, overwrite)
    target = _build_native(model, format)

    def check(staging: Path) -> None:
        if verify and target.dtype == torch.float32:
            diff, scale = _max_logit_diff(model, staging)
            if not diff <= tolerance * max(1.0, scale):
                raise refuse(
                    format,
                    f"the reloaded checkpoint's logits differ by {diff:.3g} (scale {scale:.3g}); nothing was written",
                )

    # Written beside `directory`, checked, then swapped in whole (moeify.atomic): a failure or a
    # kill at any point leaves what was there. The export replaces the whole directory.
    with staged_directory(directory, owned=lambda name: True, check=check) as staging:
        target.save_pretrained(staging)
        write_companions(model, staging, tokenizer=tokenizer, processor=processor)
    return directory


__all__ = ["BASES", "ExportError", "ExportFormat", "export", "export_format_names"]
