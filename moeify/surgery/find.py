"""Find the FFN sites of a model (the dry run behind `find_ffns`). Nothing here changes the model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from moeify.architectures import read_weights
from moeify.architectures.layouts import FFNLayout, join
from moeify.architectures.registry import classify, required_positional_args
from moeify.config import MoeifyConfig, recipe
from moeify.layers.moe import MoeLayer
from moeify.surgery.capture import capture_calls
from moeify.surgery.discover import Analyser, Analysis, ffn_shaped, worth_tracing
from moeify.surgery.ops import pointwise_conv

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


@dataclass(frozen=True)
class FFNSite:
    """One FFN that will be converted."""

    name: str  # module path of the site (the module holding the whole FFN)
    class_name: str
    source: str  # "registry" | "dataflow" (traced alone) | "example_inputs" (traced in a forward of them) | "generic"
    install_path: str  # where the MoE layer goes (differs from `name` for split FFNs)
    layer: int | None  # block index: the first integer in `name`
    in_features: int | None = None
    intermediate_size: int | None = None
    out_features: int | None = None
    gated: bool | None = None
    layout: FFNLayout | None = field(default=None, repr=False, compare=False)
    # Runs per forward of the block it was found in: > 1 for one module serving several depths
    # (ALBERT); its MoE layer is shared the same way, and its routing counts add all of them.
    calls: int = 1

    @property
    def layer_path(self) -> str:
        """Where the MoeLayer itself lives: `install_path`, or inside the wrapper installed there
        (`AddResidual`, `SplitExit`: `<install_path>.moe`)."""
        layout = self.layout
        wrapped = layout is not None and (layout.split or layout.residual is not None or layout.channels_first)
        return f"{self.install_path}.moe" if wrapped else self.install_path

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("layout")
        return data


@dataclass(frozen=True)
class Recorded:
    """An FFN found by tracing its block on example inputs: rediscovering it needs those inputs,
    so a saved checkpoint records it (moeify.surgery.record)."""

    layout: FFNLayout
    calls: int = 1


@dataclass(frozen=True)
class SkippedSite:
    name: str
    class_name: str
    reason: str
    unselected: bool = False  # an FFN, left dense by target_modules / exclude_modules / layers

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FFNReport:
    """Every FFN site found, and every one skipped with the reason."""

    sites: list[FFNSite]
    skipped: list[SkippedSite]
    module_classes: list[str]  # every class seen, for the nothing-matched error
    unrun: list[SkippedSite] = field(default_factory=list)  # FFN-shaped blocks that could not be traced
    captured: dict[str, Recorded] = field(default_factory=dict)  # found on example inputs (selected or not)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def as_dict(self) -> dict:
        return {"sites": [s.as_dict() for s in self.sites], "skipped": [s.as_dict() for s in self.skipped]}

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} FFN site(s) to convert, {len(self.skipped)} skipped"]
        for s in self.sites:
            sizes = f"{s.in_features}->{s.intermediate_size}->{s.out_features}" if s.in_features else "generic"
            shared = f", one module run {s.calls}x per forward" if s.calls > 1 else ""
            lines.append(f"  + {s.name} [{s.class_name}, {s.source}, {'gated ' if s.gated else ''}{sizes}{shared}]")
        for s in self.skipped:
            lines.append(f"  - {s.name} [{s.class_name}]: {s.reason}")
        return "\n".join(lines)


def layer_index(name: str) -> int | None:
    """The block index of a site: the first integer in its name (3 in `model.layers.3.mlp`, 0 in
    T5's `encoder.block.0.layer.1.DenseReluDense`, whose second integer is the sub-layer)."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def matches(patterns: str | tuple[str, ...] | None, names: tuple[str, ...]) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches exact
    names and dotted suffixes."""
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, n) for n in names)
    return any(n == p or n.endswith("." + p) for n in names for p in patterns or ())


def _selection_reason(config: MoeifyConfig, names: tuple[str, ...], layer: int | None) -> str | None:
    """Why the user's filters leave this site dense (None: convert it)."""
    if config.target_modules is not None and not matches(config.target_modules, names):
        return "not selected by target_modules"
    if config.exclude_modules is not None and matches(config.exclude_modules, names):
        return "excluded by exclude_modules"
    if config.layers is not None:
        if layer is None:
            return "has no block index in its name, so layers= cannot select it"
        if layer not in config.layers:
            return f"block {layer} is not in layers={list(config.layers)}"
    return None


def _static(name: str, module: nn.Module, config: MoeifyConfig) -> FFNSite | SkippedSite | None:
    """What is known without running anything: converted layers, the registries, MoE blocks."""
    class_name = type(module).__name__
    if isinstance(module, MoeLayer):
        return SkippedSite(name, class_name, "already converted by moeify")
    verdict = classify(module)
    if verdict is None:
        return None
    if verdict.layout is None:
        return SkippedSite(name, class_name, verdict.reason)
    try:
        read_weights(module, verdict.layout)
    except (ValueError, AttributeError):
        return None  # an entry this version of the class no longer fits: the dataflow decides
    return _site(name, module, verdict.layout, verdict.source, config)


def _site(
    name: str, module: nn.Module, layout: FFNLayout, source: str, config: MoeifyConfig, calls: int = 1
) -> FFNSite | SkippedSite:
    """The site of an FFN whose layout is known, or why it is skipped."""
    class_name = type(module).__name__
    install_path = join(name, layout.install_at)
    try:
        weights = read_weights(module, layout)
    except (ValueError, AttributeError) as error:
        return SkippedSite(name, class_name, f"does not fit its {layout.kind} layout: {error}")
    if weights.out_features != weights.in_features and source == "registry":
        return SkippedSite(name, class_name, "output size differs from input size: not a residual FFN")
    reason = _selection_reason(config, (name, install_path), layer_index(name))
    if reason:
        return SkippedSite(name, class_name, reason, unselected=True)
    return FFNSite(
        name,
        class_name,
        source,
        install_path,
        layer_index(name),
        weights.in_features,
        weights.intermediate_size,
        weights.out_features,
        weights.gated,
        layout,
        calls,
    )


class _Walk:
    """Top-down over the module tree: a module the registries know is decided at once; any other
    is traced (once per structure) if it may hold an FFN and can run alone, else its children are
    looked at. Submodules a trace never ran are walked too."""

    def __init__(self, model: nn.Module, config: MoeifyConfig, recorded: dict[str, Recorded]) -> None:
        self.config = config
        self.sites: list[FFNSite] = []
        self.skipped: list[SkippedSite] = []
        self.known: list[str] = []  # every FFN found, selected or not, and every static skip
        self.pending: list[tuple[str, nn.Module, str]] = []  # FFN-shaped blocks that could not run alone
        self.recorded = recorded  # found on example inputs before (a loaded checkpoint's record)
        self.captured: dict[str, Recorded] = {}  # found on example inputs, selected or not
        self.classes: set[str] = {type(model).__name__}
        self.analyser = Analyser()
        self.static_below = _static_ancestors(model)

    def add(self, verdict: FFNSite | SkippedSite) -> None:
        (self.sites if isinstance(verdict, FFNSite) else self.skipped).append(verdict)
        self.known.append(verdict.name)

    def visit(self, prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            self.consider(join(prefix, child_name), child)

    def consider(self, name: str, module: nn.Module) -> None:
        self.classes.add(type(module).__name__)
        recorded = self.recorded.get(name)
        if recorded is not None:
            self.captured[name] = recorded
            self.add(_site(name, module, recorded.layout, "example_inputs", self.config, recorded.calls))
            return
        verdict = _static(name, module, self.config)
        if verdict is not None:
            self.add(verdict)
            return
        if id(module) not in self.static_below and worth_tracing(module):
            analysis = self.analyser.analyse(module)
            if analysis.error is None:
                self.take(name, module, analysis)
                self.visit_unrun(name, "", module, analysis.ran)
                return
            if ffn_shaped(module):
                self.pending.append((name, module, analysis.error))
        self.visit(name, module)

    def take(self, name: str, module: nn.Module, analysis: Analysis, source: str = "dataflow") -> None:
        for found in analysis.found:
            site = module.get_submodule(found.path) if found.path else module
            site_name = join(name, found.path)
            if source == "example_inputs":
                self.captured[site_name] = Recorded(found.layout, found.calls)
            self.add(_site(site_name, site, found.layout, source, self.config, found.calls))
        for miss in analysis.misses:  # reported, but no claim on the module: target_modules may force it
            where = join(name, miss.where)
            self.skipped.append(SkippedSite(where, type(module.get_submodule(miss.where)).__name__, miss.reason))

    def visit_unrun(self, name: str, relative: str, module: nn.Module, ran: frozenset[str]) -> None:
        for child_name, child in module.named_children():
            path = join(relative, child_name)
            if path not in ran:
                self.consider(join(name, child_name), child)
            elif next(child.children(), None) is not None:
                self.visit_unrun(join(name, child_name), path, child, ran)

    def trace_on(self, model: nn.Module, example_inputs: Any) -> None:
        """FFN-shaped blocks that could not run alone, with no FFN found below them: traced on the
        inputs they receive in one forward of `example_inputs` (the outermost of nested ones)."""
        claimed = [s.name for s in self.sites] + self.known
        blocks = [(n, m) for n, m, _ in self.pending if not any(c == n or c.startswith(n + ".") for c in claimed)]
        blocks = [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o, _ in blocks)]
        if not blocks or any(p.is_meta for p in model.parameters()):
            return
        inputs = capture_calls(model, example_inputs, [m for _, m in blocks])
        resolved = set()
        for name, module in blocks:
            if id(module) not in inputs:
                continue  # the forward never called it
            args, kwargs = inputs[id(module)]
            analysis = self.analyser.analyse_on(module, args, kwargs)
            if analysis.error is None:
                self.take(name, module, analysis, source="example_inputs")
                resolved.add(name)
        self.pending = [p for p in self.pending if not any(p[0] == r or p[0].startswith(r + ".") for r in resolved)]

    def unrun(self) -> list[SkippedSite]:
        """FFN-shaped blocks that could not be traced, none of whose FFNs was found otherwise."""
        claimed = [s.name for s in self.sites] + self.known
        return [
            SkippedSite(name, type(module).__name__, error)
            for name, module, error in self.pending
            if not any(c == name or c.startswith(name + ".") for c in claimed)
        ]

    def force_targets(self, model: nn.Module) -> None:
        """target_modules naming modules no FFN was found in: the generic path (deep copies). A
        pattern (the regex, or one name of the list) that selects FFNs found here only selects:
        `r".*language_model\\..*"` converts the language model's FFNs, not its norms."""
        targets = self.config.target_modules
        if targets is None:
            return
        patterns = [targets] if isinstance(targets, str) else [(t,) for t in targets]
        found = [(s.name, s.install_path) for s in self.sites]
        forcing = [p for p in patterns if not any(matches(p, names) for names in found)]
        taken = self.known + [s.install_path for s in self.sites]
        for name, module in model.named_modules():
            if not name or isinstance(module, MoeLayer) or not any(matches(p, (name,)) for p in forcing):
                continue
            if any(name == t or name.startswith(t + ".") or t.startswith(name + ".") for t in taken):
                continue
            self.add(self._generic(name, module))
            taken.append(name)

    def _generic(self, name: str, module: nn.Module) -> FFNSite | SkippedSite:
        class_name = type(module).__name__
        if not any(
            isinstance(m, nn.Linear) or pointwise_conv(m) or type(m).__name__ == "Conv1D" for m in module.modules()
        ):
            return SkippedSite(
                name, class_name, "targeted, but it holds no projection (nn.Linear, Conv1D, 1x1 conv): not an FFN"
            )
        required = required_positional_args(module)
        if len(required) != 1:
            return SkippedSite(
                name, class_name, f"targeted, but its forward takes {required}, not the hidden states alone"
            )
        reason = _selection_reason(self.config, (name,), layer_index(name))
        if reason:
            return SkippedSite(name, class_name, reason, unselected=True)
        return FFNSite(name, class_name, "generic", name, layer_index(name))


def _static_ancestors(model: nn.Module) -> set[int]:
    """ids of the modules with a registry entry, a MoE block or a converted layer below them:
    those are walked into, never traced whole (the entry decides, and experts are no FFNs)."""
    found: set[int] = set()

    def walk(module: nn.Module) -> bool:
        below = False
        for child in module.children():
            if walk(child) or isinstance(child, MoeLayer) or classify(child) is not None:
                below = True
        if below:
            found.add(id(module))
        return below

    walk(model)
    return found


def find_ffns(
    model: nn.Module, config: MoeifyConfig | None = None, *, example_inputs: Any = None, **overrides: Any
) -> FFNReport:
    """Dry run: every FFN site `moeify(model, config)` would convert, and every site it would
    skip with the reason. Nothing changes.

    Blocks are traced alone on random hidden states; with `example_inputs` (what `model` takes:
    a dict of keyword arguments, a tuple, or one tensor), blocks that cannot run alone are traced
    on the inputs they receive in one forward of it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_ffns expects a torch.nn.Module, got {type(model).__name__}")
    config = recipe(config, overrides, "find_ffns")
    state = getattr(model, "moeify_state", None)
    walk = _Walk(model, config, dict(getattr(state, "captured", None) or {}))
    walk.visit("", model)
    if example_inputs is not None:
        walk.trace_on(model, example_inputs)
    walk.force_targets(model)
    return FFNReport(walk.sites, walk.skipped, sorted(walk.classes), walk.unrun(), walk.captured)
