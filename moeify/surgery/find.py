"""Find the FFN sites of a model (the dry run behind `find_ffns`). Nothing here changes the model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from moeify.architectures import classify, read_weights
from moeify.architectures.layouts import FFNLayout
from moeify.architectures.registry import required_positional_args
from moeify.config import MoeifyConfig
from moeify.layers.moe import MoeLayer

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


@dataclass(frozen=True)
class FFNSite:
    """One FFN that will be converted."""

    name: str  # module path of the site (the module holding the whole FFN)
    class_name: str
    source: str  # "registry" | "probe" | "generic"
    install_path: str  # where the MoE layer goes (differs from `name` for split FFNs)
    layer: int | None  # block index: the first integer in `name`
    in_features: int | None = None
    intermediate_size: int | None = None
    out_features: int | None = None
    gated: bool | None = None
    layout: FFNLayout | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("layout")
        return data


@dataclass(frozen=True)
class SkippedSite:
    name: str
    class_name: str
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FFNReport:
    """Every FFN site found, and every one skipped with the reason."""

    sites: list[FFNSite]
    skipped: list[SkippedSite]
    module_classes: list[str]  # every class seen, for the nothing-matched error

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):  # noqa: ANN204
        return iter(self.sites)

    def as_dict(self) -> dict:
        return {"sites": [s.as_dict() for s in self.sites], "skipped": [s.as_dict() for s in self.skipped]}

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} FFN site(s) to convert, {len(self.skipped)} skipped"]
        for s in self.sites:
            sizes = f"{s.in_features}->{s.intermediate_size}->{s.out_features}" if s.in_features else "generic"
            lines.append(f"  + {s.name} [{s.class_name}, {s.source}, {'gated ' if s.gated else ''}{sizes}]")
        for s in self.skipped:
            lines.append(f"  - {s.name} [{s.class_name}]: {s.reason}")
        return "\n".join(lines)


def layer_index(name: str) -> int | None:
    """The block index of a site: the first integer in its name (3 in `model.layers.3.mlp`, 0 in
    T5's `encoder.block.0.layer.1.DenseReluDense`, whose second integer is the sub-layer)."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def _matches(patterns: str | tuple[str, ...] | None, names: tuple[str, ...]) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches exact
    names and dotted suffixes."""
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, n) for n in names)
    return any(n == p or n.endswith("." + p) for n in names for p in patterns or ())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _selection_reason(config: MoeifyConfig, names: tuple[str, ...], layer: int | None) -> str | None:
    """Why the user's filters leave this site dense (None: convert it)."""
    if config.target_modules is not None and not _matches(config.target_modules, names):
        return "not selected by target_modules"
    if config.exclude_modules is not None and _matches(config.exclude_modules, names):
        return "excluded by exclude_modules"
    if config.layers is not None:
        if layer is None:
            return "has no block index in its name, so layers= cannot select it"
        if layer not in config.layers:
            return f"block {layer} is not in layers={list(config.layers)}"
    return None


def _judge(name: str, module: nn.Module, config: MoeifyConfig) -> FFNSite | SkippedSite | None:
    """The verdict on one module: a site, a skip (both stop the walk), or None (look inside)."""
    class_name = type(module).__name__
    if isinstance(module, MoeLayer):
        return SkippedSite(name, class_name, "already converted by moeify")
    verdict = classify(module)
    layer = layer_index(name)
    if verdict is None:
        if config.target_modules is None or not _matches(config.target_modules, (name,)):
            return None
        required = required_positional_args(module)
        if len(required) != 1:
            return SkippedSite(name, class_name, f"targeted, but its forward takes {required}, not the hidden states alone")
        reason = _selection_reason(config, (name,), layer)
        if reason:
            return SkippedSite(name, class_name, reason)
        return FFNSite(name, class_name, "generic", name, layer)
    if verdict.layout is None:
        return SkippedSite(name, class_name, verdict.reason)
    layout = verdict.layout
    install_path = _join(name, layout.install_at)
    try:
        weights = read_weights(module, layout)
    except (ValueError, AttributeError) as error:
        return SkippedSite(name, class_name, f"does not fit its {layout.kind} layout: {error}")
    if weights.out_features != weights.in_features:
        return SkippedSite(name, class_name, "output size differs from input size: not a residual FFN")
    reason = _selection_reason(config, (name, install_path), layer)
    if reason:
        return SkippedSite(name, class_name, reason)
    return FFNSite(
        name,
        class_name,
        verdict.source,
        install_path,
        layer,
        weights.in_features,
        weights.intermediate_size,
        weights.out_features,
        weights.gated,
        layout,
    )


def find_ffns(model: nn.Module, config: MoeifyConfig | None = None, **overrides) -> FFNReport:  # noqa: ANN003
    """Dry run: every FFN site `moeify(model, config)` would convert, and every site it would
    skip with the reason. Nothing changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_ffns expects a torch.nn.Module, got {type(model).__name__}")
    config = (config or MoeifyConfig()).replace(**overrides) if overrides else (config or MoeifyConfig())
    sites: list[FFNSite] = []
    skipped: list[SkippedSite] = []
    classes: set[str] = {type(model).__name__}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = _join(prefix, child_name)
            classes.add(type(child).__name__)
            verdict = _judge(name, child, config)
            if isinstance(verdict, FFNSite):
                sites.append(verdict)
            elif isinstance(verdict, SkippedSite):
                skipped.append(verdict)
            else:
                visit(name, child)

    visit("", model)
    return FFNReport(sites, skipped, sorted(classes))
