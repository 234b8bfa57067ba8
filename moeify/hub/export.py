"""`moeify.export(model, directory, format)`: a converted Llama-family causal LM as a native
transformers MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) that plain
`AutoModelForCausalLM.from_pretrained(directory)` loads, with the moeify model's logits.

Check everything, then write: the checkpoint goes to a temporary sibling directory, is reloaded
with plain transformers and compared, and only then moved into place; a refused or failed export
leaves no directory behind. Routing is softmax → top-k → renormalise in moeify and in all three
targets (`norm_topk_prob=True`). What maps, exactly:
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
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moeify.convert import moe_layers
from moeify.layers.experts import PackedExperts
from moeify.layers.moe import MoeLayer
from moeify.layers.routers.linear import LinearRouter

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class ExportError(ValueError):
    """The model cannot be written exactly in the requested native format; the message says why."""


@dataclass(frozen=True)
class ExportFormat:
    """What one native MoE family can hold, as data."""

    experts_field: str  # the config field holding E
    shared_expert: bool  # Qwen2-MoE's sigmoid-gated shared expert
    dense_layers: bool  # `mlp_only_layers`: some layers may stay dense
    bias_field: str | None  # the config flag that gives attention projections a bias


FORMATS: dict[str, ExportFormat] = {  # by model_type
    "mixtral": ExportFormat("num_local_experts", shared_expert=False, dense_layers=False, bias_field=None),
    "qwen2_moe": ExportFormat("num_experts", shared_expert=True, dense_layers=True, bias_field="qkv_bias"),
    "qwen3_moe": ExportFormat("num_experts", shared_expert=False, dense_layers=True, bias_field="attention_bias"),
}
# Decoders whose blocks are pre-norm RMSNorm + rotary attention + SwiGLU MLP at `model.layers.N.mlp`,
# with the same parameter names as the targets. Other parts (q/k norms, biases) are matched by name.
BASES = ("llama", "mistral", "qwen2", "qwen3")
# Base config fields the targets read under the same names and meanings.
COPIED_FIELDS = tuple(
    "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads hidden_act "
    "max_position_embeddings initializer_range rms_norm_eps tie_word_embeddings rope_parameters "
    "attention_dropout pad_token_id bos_token_id eos_token_id".split()
)
_SITE = re.compile(r"model\.layers\.(\d+)\.mlp")


@dataclass(frozen=True)
class MoeShape:
    """What every MoE layer must share: the native formats have one of each per model."""

    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared: int
    temperature: float


def _refuse(fmt: str, reason: str) -> ExportError:
    return ExportError(f"moeify.export(format={fmt!r}): {reason}")


def _check_model(model: nn.Module, fmt: str) -> dict[int, MoeLayer]:
    """The base family and the MoE layers by block index; refuses what is not a supported moeify LM."""
    if fmt not in FORMATS:
        raise ExportError(f"moeify.export: unknown format {fmt!r}; supported formats: {sorted(FORMATS)}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BASES:
        raise _refuse(
            fmt,
            f"the base model {type(model).__name__} (model_type={model_type!r}) is not supported; export "
            f"writes causal LMs of the Llama family ({', '.join(BASES)}) with SwiGLU MLPs",
        )
    if not type(model).__name__.endswith("ForCausalLM"):
        raise _refuse(fmt, f"export needs the causal LM (e.g. LlamaForCausalLM), not {type(model).__name__}")
    layers: dict[int, MoeLayer] = {}
    for name, layer in moe_layers(model):
        match = _SITE.fullmatch(name)
        if match is None:
            raise _refuse(
                fmt, f"MoE layer {name!r} is not a decoder MLP (model.layers.N.mlp); the formats have no place for it"
            )
        layers[int(match.group(1))] = layer
    if not layers:
        raise _refuse(fmt, f"{type(model).__name__} has no moeify MoE layers: call moeify(model) first")
    return layers


def _zero(tensors: list[Tensor | None]) -> bool:
    return all(t is None or not bool(t.detach().count_nonzero()) for t in tensors)


def _check_experts(fmt: str, name: str, experts: nn.Module, act_type: type) -> None:
    if not isinstance(experts, PackedExperts) or not experts.gated:
        kind = type(experts).__name__ if not isinstance(experts, PackedExperts) else "a non-gated (act(W x)) MLP"
        raise _refuse(fmt, f"{name} holds {kind}; the native formats hold gated SwiGLU experts only")
    if type(experts.act) is not act_type:
        raise _refuse(
            fmt,
            f"{name} uses activation {type(experts.act).__name__}, but the config's hidden_act gives {act_type.__name__}",
        )
    if not _zero([experts.b_in, experts.b_out]):
        raise _refuse(fmt, f"{name} has nonzero biases; the native experts have no biases")


def _layer_shape(fmt: str, name: str, layer: MoeLayer, hidden_act: str) -> MoeShape:
    from transformers.activations import ACT2FN

    if not isinstance(layer.router, LinearRouter):
        raise _refuse(
            fmt,
            f"{name} has a {type(layer.router).__name__}; the native formats route with one linear gate "
            "(convert with router='linear')",
        )
    act_type = type(ACT2FN[hidden_act])
    _check_experts(fmt, f"{name}.experts", layer.experts, act_type)
    num_shared = 0
    if layer.shared_experts is not None:
        _check_experts(fmt, f"{name}.shared_experts", layer.shared_experts, act_type)
        num_shared = layer.shared_experts.num_experts
    mantissa, _ = math.frexp(layer.temperature)
    if mantissa != 0.5:
        raise _refuse(
            fmt,
            f"{name} has router_temperature={layer.temperature}; the native routers have no temperature and "
            "only a power of two folds exactly into the router weight",
        )
    return MoeShape(layer.num_experts, layer.top_k, layer.experts.w_out.shape[-1], num_shared, layer.temperature)


def _check_shapes(fmt: str, base_config: PretrainedConfig, layers: dict[int, MoeLayer]) -> tuple[MoeShape, list[int]]:
    """One MoeShape for all layers, and the block indices left dense."""
    distinct = {
        _layer_shape(fmt, f"model.layers.{i}.mlp", layer, base_config.hidden_act) for i, layer in layers.items()
    }
    if len(distinct) > 1:
        raise _refuse(
            fmt, f"the MoE layers differ ({sorted(distinct, key=str)}); the native formats have one shape per model"
        )
    shape = distinct.pop()
    dense = [i for i in range(base_config.num_hidden_layers) if i not in layers]
    target = FORMATS[fmt]
    if dense and not target.dense_layers:
        raise _refuse(
            fmt,
            f"layers {dense} were left dense and {fmt} has only MoE layers; convert every layer, or use "
            "format='qwen2_moe' / 'qwen3_moe' (their mlp_only_layers hold dense layers)",
        )
    if shape.num_shared and not target.shared_expert:
        nonzero = [i for i, layer in layers.items() if not _zero(layer.shared_experts.output_parameters())]
        if nonzero:
            raise _refuse(
                fmt,
                f"layers {nonzero} have {shape.num_shared} shared expert(s) with nonzero weights and {fmt} has no "
                "shared expert; use a format with one (qwen2_moe), or convert with num_shared_experts=0",
            )
    return shape, dense


def _windows(config: PretrainedConfig) -> list[int | None]:
    """The sliding window of each layer's attention (None: full attention), as the model runs it."""
    layers = config.num_hidden_layers
    if config.model_type == "llama":
        return [None] * layers
    if config.model_type in ("qwen2", "qwen3", "qwen2_moe"):
        return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    return [getattr(config, "sliding_window", None)] * layers  # mistral, mixtral, qwen3_moe: one for all


def _window_fields(fmt: str, windows: list[int | None]) -> dict:
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        raise _refuse(fmt, f"the layers use different sliding windows {sizes}; the native formats have one")
    size = sizes[0] if sizes else None
    if fmt == "mixtral":
        return {"sliding_window": size}
    fields = {"use_sliding_window": size is not None, "sliding_window": size or 4096}
    if fmt == "qwen2_moe":
        fields["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
    return fields


def _target_config(
    fmt: str, model: nn.Module, shape: MoeShape, dense: list[int], dtype: torch.dtype
) -> PretrainedConfig:
    from transformers import AutoConfig

    base = model.config
    target = FORMATS[fmt]
    fields = {name: getattr(base, name) for name in COPIED_FIELDS if hasattr(base, name)}
    fields |= {
        "head_dim": getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads,
        "dtype": dtype,
        target.experts_field: shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "output_router_logits": False,
        **_window_fields(fmt, _windows(base)),
    }
    if fmt == "mixtral":
        fields |= {"intermediate_size": shape.intermediate_size, "router_jitter_noise": 0.0}
    else:
        fields |= {"moe_intermediate_size": shape.intermediate_size, "norm_topk_prob": True}
        # Every layer sparse except the dense ones, which keep the base's MLP width.
        fields |= {"decoder_sparse_step": 1, "mlp_only_layers": dense, "intermediate_size": base.intermediate_size}
    if fmt == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = max(shape.num_shared, 1) * shape.intermediate_size
    if target.bias_field is not None:
        keys = model.state_dict().keys()
        fields[target.bias_field] = any(k.endswith("self_attn.q_proj.bias") for k in keys)
    config = AutoConfig.for_model(fmt, **fields)
    if _windows(config) != _windows(base):
        raise _refuse(fmt, f"the attention windows per layer {_windows(base)} cannot be expressed in {fmt}")
    return config


def _moe_tensors(fmt: str, index: int, layer: MoeLayer, dtype: torch.dtype) -> dict[str, Tensor]:
    """The native tensors of one MoE layer."""
    prefix = f"model.layers.{index}.mlp"
    # softmax(W x / T) = softmax((W / T) x) exactly when T is a power of two (checked before).
    tensors = {
        f"{prefix}.gate.weight": (layer.router.gate.weight.detach() / layer.temperature).to(dtype),
        f"{prefix}.experts.gate_up_proj": layer.experts.w_in.detach().to(dtype),
        f"{prefix}.experts.down_proj": layer.experts.w_out.detach().to(dtype),
    }
    if fmt == "qwen2_moe":
        tensors |= _shared_tensors(prefix, layer, dtype)
    return tensors


def _shared_tensors(prefix: str, layer: MoeLayer, dtype: torch.dtype) -> dict[str, Tensor]:
    """moeify's S shared experts as Qwen2-MoE's one shared expert of width S·I."""
    # No shared experts: one zero expert of width I, which adds exactly 0.
    experts = layer.experts if layer.shared_experts is None else layer.shared_experts
    w_in_SID, w_out_SDI = experts.w_in.detach(), experts.w_out.detach()
    if layer.shared_experts is None:
        w_in_SID, w_out_SDI = torch.zeros_like(w_in_SID[:1]), torch.zeros_like(w_out_SDI[:1])
    gate_SID, up_SID = w_in_SID.chunk(2, dim=1)
    hidden = w_in_SID.shape[-1]
    return {
        f"{prefix}.shared_expert.gate_proj.weight": gate_SID.reshape(-1, hidden).to(dtype),
        f"{prefix}.shared_expert.up_proj.weight": up_SID.reshape(-1, hidden).to(dtype),
        # sigmoid(0 · x) = 1/2 exactly; the doubled down_proj cancels it exactly.
        f"{prefix}.shared_expert.down_proj.weight": (2 * torch.cat(w_out_SDI.unbind(0), dim=-1)).to(dtype),
        f"{prefix}.shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype, device=w_in_SID.device),
    }


def _target_state(
    fmt: str, model: nn.Module, layers: dict[int, MoeLayer], target: nn.Module, dtype: torch.dtype
) -> dict:
    """Every tensor of the target model, by its name; refuses a base tensor with no exact place."""
    produced: dict[str, Tensor] = {}
    for index, layer in layers.items():
        produced |= _moe_tensors(fmt, index, layer, dtype)
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
        raise _refuse(
            fmt, f"{fmt} needs tensors the {model.config.model_type} model has no exact match for: {absent[:4]}"
        )
    extra = [k for k, v in base.items() if k not in state and not _zero([v])]
    if extra:
        raise _refuse(fmt, f"{fmt} has no place for these {model.config.model_type} tensors: {extra[:4]}")
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

    layers = _check_model(model, format)
    shape, dense = _check_shapes(format, model.config, layers)
    dtype = _export_dtype(model)
    config = _target_config(format, model, shape, dense, dtype)
    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target.load_state_dict(_target_state(format, model, layers, target, dtype), strict=True, assign=True)
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
    saved = [(layer, layer.tokens_per_expert.clone(), layer.last_losses) for _, layer in moe_layers(model)]
    training = model.training
    try:
        expected = model.eval()(input_ids=ids).logits.float()
    finally:
        model.train(training)
        for layer, counts, losses in saved:
            layer.tokens_per_expert.copy_(counts)
            layer.last_losses = losses
    actual = native(input_ids=ids).logits.float()
    return (actual - expected).abs().max().item(), expected.abs().max().item()


def _prepare_directory(directory: Path, overwrite: bool) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise ExportError(f"moeify.export: {directory} exists and is not empty; pass overwrite=True to replace it")


def _move_into_place(tmp: Path, directory: Path) -> None:
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def export(
    model: nn.Module,
    directory: str | os.PathLike,
    format: str,
    *,
    verify: bool = True,
    tolerance: float = 1e-5,
    overwrite: bool = False,
) -> Path:
    """Write `model` (a moeify-converted Llama / Mistral / Qwen2 / Qwen3 causal LM with linear
    routers) as a native transformers `format` checkpoint: "mixtral", "qwen2_moe" or "qwen3_moe".

    The directory gets the target class's own `save_pretrained` output (config.json,
    model.safetensors, generation_config.json). With `verify`, the written checkpoint is reloaded
    with plain transformers and its logits must match the moeify model's within `tolerance` times
    the logit scale (float32 models), else nothing is written. Raises `ExportError` (a ValueError)
    naming what cannot be represented; no directory is left behind on failure. Returns the path.
    """
    directory = Path(directory)
    _prepare_directory(directory, overwrite)
    target = _build_native(model, format)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.export-", dir=directory.parent))
    try:
        target.save_pretrained(tmp)
        if verify and target.dtype == torch.float32:
            diff, scale = _max_logit_diff(model, tmp)
            if not diff <= tolerance * max(1.0, scale):
                raise _refuse(
                    format,
                    f"the reloaded checkpoint's logits differ by {diff:.3g} (scale {scale:.3g}); nothing was written",
                )
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


__all__ = ["BASES", "FORMATS", "ExportError", "ExportFormat", "export"]
