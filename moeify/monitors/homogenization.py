"""Expert homogenization: have the routed experts moved away from their clone and from each other?

Routed experts start as exact clones of the dense FFN (Law 1); they only specialise if they
learn different things. This monitor reads weights (not routing statistics), so it runs on its
own stride: at the first observation and then once `every_n_steps` (50) optimizer steps have
passed since its last read.

Fingerprint: each expert's weights (all its parameters, flattened and concatenated) restricted
to one fixed random sample of `sample_size` (4096) coordinates, the same coordinates for every
expert of a layer (drawn with replacement, spread over the parameters in proportion to their
size; all coordinates when an expert has fewer). Uniform coordinate sampling estimates squared
distances and norms up to a common scale n/m that cancels in the ratios below. Memory is
O(E · sample_size) per layer; one read is E · sample_size gathers per layer and one host copy
for all layers.

Per layer (w_e = fingerprint of expert e now, w0_e = when the runner was attached — right after
conversion when monitors are attached before training, the clones themselves; ||·|| the 2-norm):
  drift       mean_e ||w_e - w0_e|| / ||w0_e||: how far the experts moved from where they began.
  spread      mean over pairs e < f of ||w_e - w_f|| / ((||w_e|| + ||w_f||) / 2).
  spread_max  the same, maximum over pairs (0 while all experts are identical clones).
Event "homogeneous" once spread_max < `threshold` (1e-3) at `patience` (3) consecutive reads
taken at step >= `warmup` (100): after warmup every pair of experts is still (nearly) the same
function, whatever the router does (the linear-router failure: soft saturation with
homogeneous experts). "diversified" when an expert pair separates again.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moeify.checks import in_range
from moeify.layers.experts import ModuleExperts, PackedExperts
from moeify.layers.inventory import is_peft_module
from moeify.monitors.base import CardColumn, CardFigure, Event, Monitor, StepStats, event, register_monitor
from moeify.registry import Registry

_TINY = 1e-30


ExpertWeights = list[Tensor | list[Tensor]]
# Readers for experts whose weights are not all in their own parameters (an adapter adds ΔW), each
# registered with its predicate, tried in registration order before the plain layouts. moeify.integrations.peft
# registers the one for peft adapters when it is imported.
_READERS: Registry[Callable[[nn.Module], ExpertWeights], Callable[[nn.Module], bool]] = Registry(
    "expert weight reader", duplicate="expert weight reader"
)


def register_expert_weight_reader(
    predicate: Callable[[nn.Module], bool], reader: Callable[[nn.Module], ExpertWeights]
) -> None:
    """Make `expert_weights(experts)` return `reader(experts)` whenever `predicate(experts)` holds:
    per parameter, the E experts' weights as their forward computes with them. A reader already
    registered is refused."""
    if not callable(predicate) or not callable(reader):
        got = f"{type(predicate).__name__}, {type(reader).__name__}"
        raise TypeError(f"predicate and reader must be callables, got {got}")
    _READERS.register(reader, predicate)


def expert_weights(experts: nn.Module) -> ExpertWeights:
    """Per parameter, the E experts' values: one [E, n] view (packed) or E flat [n] tensors."""
    if any(is_peft_module(m) for m in experts.modules()):
        # peft adapters change what each expert computes (W + ΔW); their reader lives with the
        # peft glue, which registers it on import. peft itself is loaded already when its modules
        # are in the model, so this import costs nothing more.
        import_module("moeify.integrations.peft")
    for reader, predicate in _READERS.items():
        if predicate(experts):
            return reader(experts)
    if isinstance(experts, PackedExperts):
        params = [p for p in (experts.w_in, experts.b_in, experts.w_out, experts.b_out) if p is not None]
        return [p.detach().reshape(experts.num_experts, -1) for p in params]
    if isinstance(experts, ModuleExperts):
        per_expert = [[p.detach().reshape(-1) for p in e.parameters()] for e in experts.experts]
        return [list(group) for group in zip(*per_expert)]
    raise TypeError(f"expert_homogenization reads PackedExperts or ModuleExperts, not {type(experts).__name__}")


def group_size(group: Tensor | list[Tensor]) -> int:
    return group.shape[-1] if isinstance(group, Tensor) else group[0].numel()


def sample_indices(sizes: list[int], sample_size: int, generator: torch.Generator) -> list[Tensor]:
    """Coordinates to read per parameter: all when few, else ~sample_size spread by size."""
    total = sum(sizes)
    if total <= sample_size:
        return [torch.arange(n) for n in sizes]
    return [torch.randint(n, (max(1, round(sample_size * n / total)),), generator=generator) for n in sizes]


def _sample(group_EN: Tensor, idx: Tensor) -> Tensor:
    """[E, m]: the sampled coordinates of every expert of one packed parameter."""
    if isinstance(group_EN, DTensor):
        # Expert-parallel (moeify.distributed): sample the local experts, then gather the [E, m]
        # rows (E · sample_size floats, never the experts themselves). A collective, as the
        # runner's all-reduce: every rank reads its monitors.
        local = DTensor.from_local(group_EN.to_local().index_select(1, idx), group_EN.device_mesh, group_EN.placements)
        return local.full_tensor()
    return group_EN.index_select(1, idx)


def fingerprint(weights: list[Tensor | list[Tensor]], indices: list[Tensor]) -> Tensor:
    """[E, m] fp32: each expert's sampled coordinates (one gather per packed parameter;
    index_select, as advanced indexing is ~50x slower on CPU)."""
    parts = [
        _sample(group, idx) if isinstance(group, Tensor) else torch.stack([t.index_select(0, idx) for t in group])
        for group, idx in zip(weights, indices)
    ]
    return torch.cat(parts, dim=1).float()


def distances(now_EM: Tensor, start_EM: Tensor) -> Tensor:
    """[drift, spread, spread_max] on the device (see the module docstring)."""
    num_experts = now_EM.shape[0]
    drift = ((now_EM - start_EM).norm(dim=1) / start_EM.norm(dim=1).clamp_min(_TINY)).mean()
    if num_experts < 2:
        zero = drift.new_zeros(())
        return torch.stack([drift, zero, zero])
    # Exact differences: the matmul form of cdist loses ~1e-4 relative, too coarse for "identical".
    pair_EE = torch.cdist(now_EM, now_EM, compute_mode="donot_use_mm_for_euclid_dist")
    norms_E = now_EM.norm(dim=1)
    rel_EE = pair_EE / ((norms_E[:, None] + norms_E[None, :]) / 2).clamp_min(_TINY)
    upper = torch.triu_indices(num_experts, num_experts, 1, device=now_EM.device)
    rel_P = rel_EE[upper[0], upper[1]]
    return torch.stack([drift, rel_P.mean(), rel_P.max()])


class ExpertHomogenization(Monitor):
    name = "expert_homogenization"
    card_columns = (CardColumn("expert spread", "spread_max", last_key="spread_max", order=90),)
    card_figures = (CardFigure("homogeneous_layers", path=("model", "homogeneous_layers"), order=110),)
    resolved_events = ("diversified",)

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        sample_size: int = 4096,
        threshold: float = 1e-3,
        warmup: int = 100,
        patience: int = 3,
        seed: int = 0,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("sample_size", sample_size), ("patience", patience)):
            in_range(name, value, ">= 1")
        in_range("threshold", threshold, "> 0")
        self.every_n_steps, self.sample_size = every_n_steps, sample_size
        self.threshold, self.warmup, self.patience = threshold, warmup, patience
        self._generator = torch.Generator().manual_seed(seed)
        self._last_read: int | None = None
        self._indices: dict[str, list[Tensor]] = {}
        self._start: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}  # consecutive reads below threshold after warmup
        self._flagged: dict[str, bool] = {}
        self._last: dict[str, dict[str, float]] = {}

    def attach(self, model: nn.Module, layer_names: list[str]) -> None:
        """Snapshot the reference fingerprints: the experts as they are when monitoring starts."""
        for name in layer_names:
            self._start[name] = self._fingerprint(model, name).clone()

    def _fingerprint(self, model: nn.Module, name: str) -> Tensor:
        experts = model.get_submodule(name).experts
        weights = expert_weights(experts)
        if name not in self._indices:
            idx = sample_indices([group_size(g) for g in weights], self.sample_size, self._generator)
            device = next(experts.parameters()).device
            self._indices[name] = [i.to(device) for i in idx]
        return fingerprint(weights, self._indices[name])

    def _read(self, stats: StepStats) -> dict[str, list[float]]:
        """One fingerprint per layer, all layers' distances in one host copy."""
        names, rows = [], []
        for layer in stats.layers:
            now_EM = self._fingerprint(stats.model, layer.name)
            start_EM = self._start.setdefault(layer.name, now_EM.clone())
            names.append(layer.name)
            rows.append(distances(now_EM, start_EM))
        # Layers may sit on different devices (device_map); gather on the first, copy once.
        values = torch.stack([r.to(rows[0].device) for r in rows]).tolist() if rows else []
        return dict(zip(names, values))

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        if self._last_read is not None and stats.step - self._last_read < self.every_n_steps:
            return {}, []
        self._last_read = stats.step
        metrics: dict[str, dict[str, float]] = {}
        events: list[Event] = []
        depth = {layer.name: layer.depth for layer in stats.layers}
        for name, (drift, spread, spread_max) in self._read(stats).items():
            metrics[name] = {"drift": drift, "spread": spread, "spread_max": spread_max}
            kind = self._judge(name, stats.step, spread_max)
            if kind == "homogeneous":
                detail = (
                    f"routed experts of layer {depth[name]} ({name}) are still near-identical at step {stats.step}: "
                    f"max pairwise relative distance {spread_max:.2e} < {self.threshold:g} (drift from start {drift:.2e})"
                )
                events.append(event(stats.step, self.name, name, kind, detail, spread_max=spread_max, drift=drift))
            elif kind == "diversified":
                detail = (
                    f"routed experts of layer {depth[name]} ({name}) separated: max pairwise distance {spread_max:.2e}"
                )
                events.append(event(stats.step, self.name, name, kind, detail, spread_max=spread_max))
        self._last.update(metrics)
        return metrics, events

    def _judge(self, name: str, step: int, spread_max: float) -> str | None:
        below = step >= self.warmup and spread_max < self.threshold
        self._count[name] = self._count.get(name, 0) + 1 if below else 0
        flagged = self._flagged.get(name, False)
        if not flagged and self._count[name] >= self.patience:
            self._flagged[name] = True
            return "homogeneous"
        if flagged and not below:
            self._flagged[name] = False
            return "diversified"
        return None

    def summary(self) -> dict[str, Any]:
        layers = {name: {**m, "homogeneous": self._flagged.get(name, False)} for name, m in self._last.items()}
        model = {
            "homogeneous_layers": sum(1 for v in layers.values() if v["homogeneous"]),
            "last_read": self._last_read,
        }
        return {"model": model, "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        """The attach-time reference (fp32 fingerprints as floats: exact through JSON) and the
        coordinates it samples: after a resume `attach` would take the trained experts instead.
        Size: E · sample_size floats per layer."""
        return {
            "last_read": self._last_read,
            "indices": {name: [i.tolist() for i in idx] for name, idx in self._indices.items()},
            "start": {name: start_EM.tolist() for name, start_EM in self._start.items()},
            "count": dict(self._count),
            "flagged": dict(self._flagged),
            "last": {name: dict(m) for name, m in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After `attach`: the tensors go to the devices of the references `attach` took."""
        if self._start and set(state["start"]) != set(self._start):
            raise ValueError(
                f"expert_homogenization state is for layers {sorted(state['start'])}, this model has "
                f"{sorted(self._start)}: load it into the model it was saved from"
            )
        indices, start = {}, {}
        for name, saved in state["start"].items():
            device = self._start[name].device if name in self._start else None
            start[name] = torch.tensor(saved, dtype=torch.float32, device=device)
            indices[name] = [torch.tensor(i, dtype=torch.long, device=device) for i in state["indices"][name]]
            if name in self._start and start[name].shape != self._start[name].shape:
                raise ValueError(
                    f"expert_homogenization state of {name} holds fingerprints of shape {tuple(start[name].shape)}, "
                    f"this model's are {tuple(self._start[name].shape)}: load it into the model it was saved from"
                )
        self._indices, self._start = indices, start
        self._last_read = state["last_read"]
        self._count = dict(state["count"])
        self._flagged = dict(state["flagged"])
        self._last = {name: dict(m) for name, m in state["last"].items()}


register_monitor("expert_homogenization", ExpertHomogenization, default=True)
