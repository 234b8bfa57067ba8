"""Routed experts from several checkpoints of one architecture: Branch-Train-MiX ("Branch-Train-MiX:
Mixing Expert LLMs into a Mixture-of-Experts LLM", Sukhbaatar et al. 2024) and mergekit-moe.

`moeify(base, experts_from=[model_a, model_b, ...])`: routed expert i of every converted FFN is
source i % n's FFN at the same site, bit for bit (num_experts is a multiple of n; with 2n experts
each source gives two clones, which only the router tells apart). Everything else comes from the
base model (`experts_from_rest="base"`, as mergekit-moe does) or is the mean over the sources
("average", as Branch-Train-MiX does). The base may be one of the sources. Laws 2 and 3 hold
(shared experts zero, routers random); Law 1 does not (the experts are not the base's FFN), so
the deviation from the base and from every source is measured and reported, not checked.

Every source is checked before anything changes: same class as the base, every converted site
present with the same shapes and dtypes (and, for "average", every other parameter too), packed
experts only (the generic path copies modules it does not understand, so it has no expert weights
to take from another model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moeify.architectures import read_weights
from moeify.architectures.layouts import FFNWeights
from moeify.config import MoeifyConfig
from moeify.layers.moe import MoeLayer
from moeify.surgery import verify
from moeify.surgery.apply import packed_pairs
from moeify.surgery.plan import ConversionError, ConversionPlan


def source_names(models: list[nn.Module]) -> tuple[str, ...]:
    """Each source's `config._name_or_path` (or `name_or_path`) when set, else "source_{i}"; a
    name given twice gets its index appended, so every source has its own entry."""
    names = []
    for i, model in enumerate(models):
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        name = name if isinstance(name, str) and name else f"source_{i}"
        names.append(f"{name} ({i})" if name in names else name)
    return tuple(names)


def split_keyword(experts_from: Any, overrides: dict[str, Any]) -> tuple[list[nn.Module] | None, dict[str, Any]]:
    """`moeify(..., experts_from=...)`: models are the sources (their names go into the config);
    names alone are the config field (a rebuild for loading, whose weights come from a file)."""
    if experts_from is None:
        return None, overrides
    if isinstance(experts_from, (list, tuple)) and experts_from:
        if all(isinstance(m, nn.Module) for m in experts_from):
            return list(experts_from), {**overrides, "experts_from": source_names(list(experts_from))}
        if all(isinstance(m, str) for m in experts_from):
            return None, {**overrides, "experts_from": tuple(experts_from)}
    raise TypeError(
        "experts_from must be a non-empty list of models of the base's architecture (one per source), got "
        f"{type(experts_from).__name__}: {experts_from!r}"
    )


def check_given(config: MoeifyConfig, models: list[nn.Module] | None) -> None:
    """Names without models build clones of the base: only for a rebuild whose weights then come
    from a checkpoint (`moeify.from_pretrained` converts with verify=False)."""
    if config.experts_from is not None and models is None and config.verify:
        raise ConversionError(
            f"config.experts_from names {len(config.experts_from)} source model(s) {list(config.experts_from)}: pass "
            "the models themselves, moeify(model, experts_from=[model_a, model_b, ...]) (only a rebuild whose "
            "weights come from a checkpoint, verify=False, builds the structure without them)"
        )


def _pieces(weights: FFNWeights) -> list[tuple[str, list[Tensor]]]:
    named = [("w_in", weights.w_in), ("b_in", weights.b_in), ("w_out", weights.w_out), ("b_out", weights.b_out)]
    return [(name, [p.value() for p in pieces]) for name, pieces in named if pieces is not None]


def _mismatch(site: str, i: int, base: FFNWeights, source: FFNWeights) -> str | None:
    """The first difference of shape or dtype between the base's and source i's FFN at a site."""
    theirs = dict(_pieces(source))
    for name, values in _pieces(base):
        other = theirs.get(name)
        if other is None or len(other) != len(values):
            return f"{site}: source {i} has no {name} of the base's layout"
        for a, b in zip(values, other):
            if a.shape != b.shape or a.dtype != b.dtype:
                return (
                    f"{site}: source {i}'s {name} is {tuple(b.shape)} {b.dtype}, the base's {tuple(a.shape)} {a.dtype}"
                )
    return None


@dataclass
class Sources:
    """The checked sources of one conversion, and what it changed (for undoing a failed one)."""

    models: list[nn.Module]
    names: tuple[str, ...]
    ffn: dict[str, list[FFNWeights]]  # site name -> each source's FFN, read in place (no copies)
    rest: list[tuple[nn.Parameter, list[Tensor]]]  # base parameter -> the sources' (for "average")
    outputs: list[list[Tensor]] | None = None
    replaced: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)

    @torch.no_grad()
    def take_experts(self, layer: MoeLayer, site: str) -> None:
        """Routed expert e <- source e % n's FFN at this site, bit for bit."""
        experts = layer.experts
        if experts.w_in.is_meta:
            return
        for e in range(experts.num_experts):
            for packed, pieces in packed_pairs(experts, self.ffn[site][e % len(self.models)]):
                offset = 0
                for piece in pieces:
                    value = piece.value()
                    packed[e, offset : offset + value.shape[0]].copy_(value)
                    offset += value.shape[0]

    def run(self, model: nn.Module, example_inputs: Any, dense_outputs: list[Tensor]) -> None:
        """Every source's outputs on example_inputs, before the base changes (the base itself may
        be a source: its outputs are the dense ones)."""
        self.outputs = []
        for i, source in enumerate(self.models):
            if source is model:
                self.outputs.append(dense_outputs)
                continue
            try:
                self.outputs.append(verify.run_model(source, example_inputs))
            except Exception as error:
                raise ConversionError(
                    f"experts_from source {i} ({self.names[i]}) fails on example_inputs ({type(error).__name__}: "
                    f"{error}); the model was left unchanged"
                ) from error

    @torch.no_grad()
    def average_rest(self) -> None:
        """experts_from_rest="average": every parameter outside the converted FFNs becomes the mean
        over the sources (in float32, rounded once to its dtype). `undo` puts the old values back."""
        averaged = [
            (param, torch.stack([s.detach().float() for s in sources]).mean(0).to(param.dtype))
            for param, sources in self.rest
        ]
        for param, mean in averaged:
            self.replaced.append((param, param.data))
            param.data = mean

    @torch.no_grad()
    def undo(self) -> None:
        for param, old in reversed(self.replaced):
            param.data = old
        self.replaced.clear()

    def deviation(self, converted: list[Tensor]) -> dict[str, float]:
        """max |converted - source| / source scale on example_inputs, per source name."""
        return {name: verify.model_deviation(out, converted) for name, out in zip(self.names, self.outputs or [])}


def _check_model(i: int, base: nn.Module, source: Any) -> None:
    if not isinstance(source, nn.Module):
        raise TypeError(f"experts_from[{i}] must be a model (an nn.Module), got {type(source).__name__}")
    if type(source) is not type(base):
        raise ConversionError(
            f"experts_from[{i}] is a {type(source).__name__} and the base a {type(base).__name__}: the sources must "
            "have the base's architecture (the same class, with the same FFN shapes). Nothing was changed"
        )
    if any(isinstance(m, MoeLayer) for m in source.modules()):
        raise ConversionError(f"experts_from[{i}] is already converted by moeify: pass the dense checkpoints")
    if any(p.is_meta for p in source.parameters()):
        raise ConversionError(f"experts_from[{i}] has parameters on the meta device: its experts need real weights")


def _rest(model: nn.Module, plan: ConversionPlan, models: list[nn.Module]) -> list[tuple[nn.Parameter, list[Tensor]]]:
    """The base's parameters outside the converted FFNs, each with the sources' of the same name."""
    prefixes = tuple(site.name + "." for site in plan.sites)
    theirs = [dict(m.named_parameters()) for m in models]
    rest = []
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            continue
        for i, params in enumerate(theirs):
            other = params.get(name)
            if other is None or other.shape != param.shape or other.dtype != param.dtype:
                found = "none" if other is None else f"{tuple(other.shape)} {other.dtype}"
                raise ConversionError(
                    f"experts_from_rest='average': source {i} has {found} for {name}, the base {tuple(param.shape)} "
                    f"{param.dtype}. Nothing was changed"
                )
        rest.append((param, [params[name] for params in theirs]))
    return rest


def prepare(model: nn.Module, plan: ConversionPlan, models: list[nn.Module]) -> Sources:
    """Check every source against the plan and read their FFNs; raises before anything changes."""
    config = plan.config
    if config.granularity != 1:
        raise ConversionError(
            f"experts_from takes whole FFNs as experts; granularity={config.granularity} cuts them into slices: "
            "pass granularity=1"
        )
    for i, source in enumerate(models):
        _check_model(i, model, source)
    ffn: dict[str, list[FFNWeights]] = {}
    for site in plan.sites:
        if site.layout is None:
            raise ConversionError(
                f"experts_from takes each expert from a source's FFN, and {site.name} is converted on the generic "
                "path (its layout is not known, so there are no FFN weights to take): leave it out with "
                "exclude_modules"
            )
        base = read_weights(model.get_submodule(site.name), site.layout)
        ffn[site.name] = []
        for i, source in enumerate(models):
            try:
                weights = read_weights(source.get_submodule(site.name), site.layout)
            except (AttributeError, ValueError, TypeError, IndexError) as error:
                raise ConversionError(
                    f"experts_from[{i}] has no FFN of the base's layout at {site.name} ({type(error).__name__}: "
                    f"{error}). Nothing was changed"
                ) from None
            mismatch = _mismatch(site.name, i, base, weights)
            if mismatch is not None:
                raise ConversionError(f"experts_from: {mismatch}. Nothing was changed")
            ffn[site.name].append(weights)
    rest = _rest(model, plan, models) if config.experts_from_rest == "average" else []
    return Sources(models=models, names=config.experts_from, ffn=ffn, rest=rest)
