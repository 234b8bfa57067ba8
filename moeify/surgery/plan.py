"""Plan a conversion: every user error is raised here, before anything is built or swapped."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeify.architectures import conditioning_for
from moeify.architectures.layouts import get
from moeify.config import MoeifyConfig
from moeify.layers.inventory import is_peft_module
from moeify.layers.moe import MoeLayer
from moeify.surgery.errors import ConversionError
from moeify.surgery.find import FFNReport, FFNSite, SkippedSite, find_ffns, layer_index, matches


@dataclass(frozen=True)
class ConditioningPlan:
    arg: str  # forward argument carrying the conditioning
    dim: int


@dataclass(frozen=True)
class ConversionPlan:
    config: MoeifyConfig
    report: FFNReport
    conditioning: ConditioningPlan | None
    router_hidden_size: dict[str, int]  # per site name

    @property
    def sites(self) -> list[FFNSite]:
        return self.report.sites


def _pattern(name: str) -> str:
    """A target_modules regex for a module and its siblings at every depth: `encoder.layer.3.ffn`
    -> `encoder\\.layer\\.\\d+\\.ffn`."""
    return re.sub(r"(^|\\\.)\d+(?=\\\.|$)", r"\1\\d+", re.escape(name))


def _candidates(report: FFNReport, limit: int = 12) -> list[SkippedSite]:
    """What looked like an FFN, or could not be looked into, one per class (the first)."""
    seen: set[str] = set()
    shown = []
    for site in [*report.skipped, *report.unrun]:
        if site.class_name not in seen:
            seen.add(site.class_name)
            shown.append(site)
    return shown[:limit]


def _nothing_found(
    model: nn.Module, report: FFNReport, config: MoeifyConfig, traced_on_inputs: bool
) -> ConversionError:
    converted = [s.name for s in report.skipped if s.reason == "already converted by moeify"]
    if converted and config.target_modules is None:
        return ConversionError(
            f"{type(model).__name__} is already converted by moeify ({len(converted)} MoE layer(s), e.g. "
            f"{converted[0]}); converting a converted layer is refused. Start again from the dense model "
            "to change the recipe."
        )
    classes = ", ".join(report.module_classes[:40]) + (" ..." if len(report.module_classes) > 40 else "")
    usage = (
        f"\nModule classes seen: {classes}.\nName the FFN modules yourself, like peft: moeify(model, "
        "target_modules=['mlp']) (names or dotted suffixes) or target_modules=r'<regex>' (matched against the full "
        "module name)"
    )
    unselected = [s for s in report.skipped if s.unselected]
    if unselected:
        shown = "".join(f"\n  - {s.name} [{s.class_name}]: {s.reason}" for s in unselected[:20])
        return ConversionError(
            f"moeify found {len(unselected)} FFN(s) in {type(model).__name__}, but target_modules / exclude_modules / "
            f"layers leave every one dense:{shown}\nWiden the selection (find_ffns(model) lists every FFN found)."
            + usage
            + "."
        )
    candidates = _candidates(report)
    lines = "".join(f"\n  - {s.name} [{s.class_name}]: {s.reason}" for s in candidates)
    example = _pattern(candidates[0].name) if candidates else r".*\.mlp"
    inputs = (
        "\nBlocks that cannot run alone are traced on the inputs they receive in one forward of the model: pass "
        "moeify(model, example_inputs=...) (a dict of keyword arguments, a tuple, or one tensor the model takes)."
        if report.unrun and not traced_on_inputs
        else ""
    )
    return ConversionError(
        f"moeify found no FFN to convert in {type(model).__name__}: no block ran a projection -> activation -> "
        "projection on its tokens."
        + (f"\nCandidates, and why each was rejected:{lines}" if lines else "")
        + inputs
        + usage
        + f"; for instance, a token-wise FFN moeify did not recognise: moeify(model, target_modules=r'{example}')"
    )


def _conditioning(model: nn.Module, config: MoeifyConfig) -> ConditioningPlan | None:
    if config.router != "cross_attention":
        return None
    entry = conditioning_for(model)
    forward_params = inspect.signature(model.forward).parameters
    arg = entry.arg if entry else "encoder_hidden_states"
    if arg not in forward_params:
        raise ConversionError(
            f"router='cross_attention' attends to the model's conditioning, but {type(model).__name__}.forward "
            f"has no `{arg}` argument: this model has no conditioning to attend to. "
            "Use router='linear' or router='mlp'."
        )
    dim = config.conditioning_dim
    if dim is None and entry is not None:
        value = getattr(getattr(model, "config", None), entry.dim_attr, None)
        if isinstance(value, (list, tuple)) and len(set(value)) == 1:
            value = value[0]
        dim = value if isinstance(value, int) else None
    if dim is None:
        raise ConversionError(
            f"router='cross_attention': cannot tell the feature size of `{arg}` for {type(model).__name__}; "
            "pass conditioning_dim=<size of its last dimension>."
        )
    return ConditioningPlan(arg, dim)


def _check_site(model: nn.Module, site: FFNSite, config: MoeifyConfig) -> None:
    module = model.get_submodule(site.name)
    for sub_name, sub in module.named_modules():
        if is_peft_module(sub):
            raise ConversionError(
                f"{site.name} holds a peft adapter ({type(sub).__name__} at {sub_name or site.name}): moeify "
                "reads the dense weights and would drop the adapter. Convert first, then add adapters "
                "(moeify(model); get_peft_model(model, ...)), or merge them (model.merge_and_unload())."
            )
    params = list(module.parameters())
    if any(p.is_meta for p in params) and config.verify:
        raise ConversionError(
            f"{site.name} is on the meta device, so the identity check cannot run; pass verify=False "
            "when converting a meta model whose weights are loaded afterwards."
        )
    if site.source == "generic" and config.num_shared_experts and config.shared_expert_init == "zero_out":
        if not any(isinstance(m, nn.Linear) for m in get(model, site.name).modules()):
            raise ConversionError(
                f"shared_expert_init='zero_out' needs an nn.Linear output projection, and {site.name} "
                f"({site.class_name}) has none; use shared_expert_init='noise'."
            )


def _check_layers(report: FFNReport, config: MoeifyConfig) -> None:
    """`layers=` naming blocks with no FFN is a mistake to say, not to pass over in silence."""
    if config.layers is None:
        return
    found = {s.layer for s in report.sites} | {layer_index(s.name) for s in report.skipped if s.unselected}
    found |= {layer_index(s.name) for s in report.skipped if s.reason == "already converted by moeify"}
    missing = sorted(set(config.layers) - found)
    if missing:
        known = sorted(i for i in found if i is not None)
        raise ConversionError(
            f"layers={list(config.layers)} names block(s) {missing} where moeify found no FFN; the blocks with FFNs "
            f"are {known} (find_ffns(model) lists them)"
        )


def _check_no_peft(model: nn.Module) -> None:
    """A peft model is refused whole, even with no adapter on an FFN: its adapter config and
    checkpoints describe the dense model, so the new routers and experts would be neither saved by
    peft's save_pretrained nor rebuilt by PeftModel.from_pretrained (and get_peft_model's freezing
    would not cover them)."""
    found = next(((n, m) for n, m in model.named_modules() if is_peft_module(m)), None)
    if found is not None:
        name, module = found
        raise ConversionError(
            f"{type(model).__name__} is a peft model ({type(module).__name__} at {name or 'the root'}): its adapters "
            "describe the dense model, and the routers and experts moeify adds would be missing from peft's "
            "checkpoints. Merge the adapters first (model = model.merge_and_unload(); moeify(model)), or convert "
            "first and add adapters after: get_peft_model(moeify(model), moeify.lora_config(model, recipe=...))."
        )


def _router_width(site: FFNSite, config: MoeifyConfig, model: nn.Module) -> int:
    if config.router_hidden_size is not None:
        width = config.router_hidden_size
    else:
        hidden = site.in_features or next(model.get_submodule(site.name).parameters()).shape[-1]
        width = min(256, hidden)
        if config.router == "cross_attention":
            width = max(config.router_num_heads, width - width % config.router_num_heads)
    if config.router == "cross_attention" and width % config.router_num_heads:
        raise ConversionError(
            f"router_hidden_size={width} must be divisible by router_num_heads={config.router_num_heads}"
        )
    return width


def plan_conversion(model: nn.Module, config: MoeifyConfig, example_inputs: Any = None) -> ConversionPlan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moeify expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, MoeLayer):
        raise ConversionError("this module is already a moeify MoE layer; converting it again is refused")
    report = find_ffns(model, config, example_inputs=example_inputs)
    if config.target_modules is not None:
        # Name a converted layer the user targeted, not merely the first converted one.
        hit = [
            s.name
            for s in report.skipped
            if s.reason == "already converted by moeify" and matches(config.target_modules, (s.name,))
        ]
        targeted = [n for n in hit if not any(n.startswith(s.name + ".") for s in report.sites)]
        if targeted and not report.sites:
            raise ConversionError(f"{targeted[0]} is already converted by moeify; converting it again is refused")
    if not report.sites:
        raise _nothing_found(model, report, config, example_inputs is not None)
    _check_layers(report, config)
    for site in report.sites:
        _check_site(model, site, config)
    _check_no_peft(model)
    conditioning = _conditioning(model, config)
    widths = {site.name: _router_width(site, config, model) for site in report.sites}
    if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in model.parameters()):
        raise ConversionError(
            "moeify converts floating-point models; this one has quantized or integer weights. "
            "Convert the full-precision model, then quantize."
        )
    return ConversionPlan(config, report, conditioning, widths)
