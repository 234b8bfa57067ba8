"""Routing per denoising timestep: which experts a diffusion model uses at each noise level.

    diag = TimestepRouting(num_buckets=20, max_timestep=1000).attach(pipe.transformer)
    pipe(prompt, num_inference_steps=4)
    for entry in diag.read():              # one device->host copy, then the buffers are zeroed
        print(entry.timestep, [layer.load_share for layer in entry.layers])
    diag.detach()

While training it is a monitor like the others (not a default one, it needs a timestep):
`attach_monitors(model, ["expert_load", TimestepRouting()])`. Each window then reports, per layer
and per timestep bucket seen, `t=<mean timestep>/cv`, `.../entropy` and `.../share_<e>`.

How it counts, with no host sync per forward (the runner's rule):
- A forward pre-hook on the root model takes its `timestep` argument (keyword or positional) and
  turns it into bucket indices on the device: floor(t / max_timestep * num_buckets), clamped. Each
  bucket also sums the timesteps it got, so it reports the mean timestep it saw: with one
  timestep per bucket (e.g. `num_buckets=max_timestep=1000` and integer timesteps) that is
  exactly the pipeline's timestep.
- A forward hook on every MoE layer's router recomputes the routing from the router's logits
  (moeify.layers.scoring: the same scores, bias and top-k as `MoeLayer.route`, so the same experts)
  and adds each token's top-k one-hot, probabilities, entropy, max probability and top-k margin
  into that layer's [num_buckets, 2E+4] buffer with one `index_add_`.
- Tokens are attributed by splitting a layer's flattened tokens into N equal consecutive groups,
  N = timestep.numel(): one timestep per sample (FFN inputs [B, S, D], or [B*F, S, D] for video)
  or per token ([B, S], LTX-style); a single timestep covers every token. Classifier-free
  guidance repeats t over the doubled batch, so both halves land in the same bucket.
- `read()` / `observe()` concatenate every buffer, all-reduce under torch.distributed (so call it
  on every rank), copy to the host once and reset.

Timestep scales: DDPM-style schedulers and flow-matching pipelines such as SD3 pass t in
[0, 1000]; Flux-style pipelines pass t / 1000 to the transformer: use `max_timestep=1.0` there.

Shape legend: T tokens, E experts, K top-k, N timesteps of one forward, U buckets, X stat columns.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moeify.layers import losses, scoring
from moeify.layers.inventory import moe_layers, no_moe_layers
from moeify.layers.moe import MoeLayer
from moeify.layers.stats import INDEX, STATS, sum_over_ranks
from moeify.monitors.base import Event, LayerStats, Monitor, StepStats, register_monitor
from moeify.monitors.load import load_cv

TIME_COLUMNS = 3  # per bucket: sum of t, timesteps counted, timesteps above max_timestep


@dataclass(frozen=True)
class TimestepStats:
    """Every MoE layer's routing over the forwards whose timestep fell in one bucket."""

    timestep: float  # mean timestep seen in the bucket
    low: float  # the bucket covers [low, high)
    high: float
    count: int  # timesteps counted (samples x forwards, or tokens for per-token timesteps)
    layers: list[LayerStats]  # routed_norm / shared_norm are 0: the router never sees expert outputs


def routing_rows(logits_TE: Tensor, layer: MoeLayer) -> Tensor:
    """Per token [T, 2E+4]: top-k one-hot | probabilities | 1 | entropy | max prob | top-k margin."""
    top_k = layer.top_k
    scores_TE, probs_TE = scoring.scores(logits_TE.float(), layer.temperature, layer.router_score)
    expert_idx_TK, _, top_probs_TK1 = scoring.choose(scores_TE, probs_TE, top_k, layer.expert_bias)
    chosen_TE = torch.zeros_like(probs_TE).scatter_(1, expert_idx_TK, 1.0)
    if top_probs_TK1.shape[1] > top_k:
        margin_T = top_probs_TK1[:, top_k - 1] - top_probs_TK1[:, top_k]
    else:
        margin_T = torch.zeros_like(top_probs_TK1[:, 0])
    columns = [torch.ones_like(margin_T), losses.entropy(probs_TE), top_probs_TK1[:, 0], margin_T]
    return torch.cat([chosen_TE, probs_TE, torch.stack(columns, dim=1)], dim=1)


def _positional_index(forward: Any, name: str) -> int | None:
    names = [
        p.name
        for p in inspect.signature(forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return names.index(name) if name in names else None


class TimestepRouting(Monitor):
    """Per-timestep-bucket routing statistics of every MoE layer of a diffusion model.

    Args:
        num_buckets: how many equal slices [0, max_timestep) is cut into.
        max_timestep: the largest timestep the model gets (1000; 1.0 for Flux-style t / 1000).
        arg: the forward argument holding the timestep.
    """

    name = "timestep_routing"

    def __init__(self, num_buckets: int = 20, max_timestep: float = 1000.0, arg: str = "timestep") -> None:
        if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or num_buckets < 1:
            raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
        if not isinstance(max_timestep, (int, float)) or not math.isfinite(max_timestep) or max_timestep <= 0:
            raise ValueError(f"max_timestep must be a finite number > 0, got {max_timestep!r}")
        self.num_buckets, self.max_timestep, self.arg = num_buckets, float(max_timestep), arg
        self.model: nn.Module | None = None
        self._layers: list[tuple[str, MoeLayer]] = []
        self._buffers: list[Tensor] = []  # per layer, [U, 2E+4] fp32 on its router's device
        self._times_UX: Tensor | None = None
        self._bucket_N: Tensor | None = None  # the buckets of the forward in flight
        self._position: int | None = None
        self._hooks: list[Any] = []
        self._total: Tensor | None = None  # host copy of everything read so far, for summary()

    # ------------------------------------------------------------------ hooks

    def attach(self, model: nn.Module, layer_names: list[str] | None = None) -> TimestepRouting:
        """Start counting on `model` (the converted denoiser, e.g. `pipe.transformer`)."""
        if self.model is model:
            return self
        if self.model is not None:
            raise RuntimeError("this TimestepRouting is attached to another model: detach() it first")
        layers = [(n, m) for n, m in moe_layers(model) if layer_names is None or n in layer_names]
        if not layers:
            raise no_moe_layers(model)
        self._position = _positional_index(model.forward, self.arg)
        parameters = inspect.signature(model.forward).parameters.values()
        if self._position is None and not any(p.name == self.arg or p.kind == p.VAR_KEYWORD for p in parameters):
            raise ValueError(f"{type(model).__name__}.forward takes no `{self.arg}` argument: pass arg=")
        self.model, self._layers = model, layers
        devices = [next(layer.router.parameters()).device for _, layer in layers]
        self._buffers = [
            torch.zeros(self.num_buckets, 2 * layer.num_experts + 4, device=device)
            for (_, layer), device in zip(layers, devices)
        ]
        self._times_UX = torch.zeros(self.num_buckets, TIME_COLUMNS, device=devices[0])
        self._total = None
        self._hooks.append(model.register_forward_pre_hook(self._capture, with_kwargs=True))
        # A router called outside the model's forward (a block run on its own) is not counted.
        self._hooks.append(model.register_forward_hook(lambda *_: setattr(self, "_bucket_N", None), always_call=True))
        for index, (_, layer) in enumerate(layers):
            self._hooks.append(layer.router.register_forward_hook(functools.partial(self._count, index, layer)))
        return self

    def detach(self) -> None:
        """Remove the hooks (what was counted stays readable)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.model, self._bucket_N = [], None, None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get(self.arg)
        if t is None and self._position is not None and self._position < len(args):
            t = args[self._position]
        if t is None:  # a forward without a timestep is not counted
            self._bucket_N = None
            return
        times = self._times_UX
        t_N = torch.as_tensor(t).detach().to(device=times.device, dtype=torch.float32).flatten()
        bucket_N = (t_N * (self.num_buckets / self.max_timestep)).floor().long().clamp_(0, self.num_buckets - 1)
        self._bucket_N = bucket_N
        rows_NX = torch.stack([t_N, torch.ones_like(t_N), (t_N > self.max_timestep).float()], dim=1)
        times.index_add_(0, bucket_N, rows_NX)

    def _count(self, index: int, layer: MoeLayer, router: nn.Module, inputs: tuple, logits_TE: Tensor) -> None:
        # Gradient checkpointing re-runs the router inside backward: count each forward once, as MoeLayer does.
        if self._bucket_N is None or torch._C._current_graph_task_id() != -1:
            return
        with torch.no_grad():
            rows_TX = routing_rows(logits_TE.detach(), layer)
            tokens, groups = rows_TX.shape[0], self._bucket_N.numel()
            if tokens % groups:
                raise RuntimeError(
                    f"timestep routing: {self._layers[index][0]} routed {tokens} tokens but the forward got "
                    f"{groups} timesteps; tokens must split into one equal, consecutive group per timestep"
                )
            bucket_T = self._bucket_N.to(rows_TX.device).repeat_interleave(tokens // groups)
            self._buffers[index].index_add_(0, bucket_T, rows_TX)

    # ------------------------------------------------------------------ reading

    def read(self, *, reset: bool = True) -> list[TimestepStats]:
        """The buckets that saw a forward since the last read, highest timestep first."""
        if self._times_UX is None:
            raise RuntimeError("TimestepRouting.read(): attach(model) first")
        device = self._times_UX.device
        flat = torch.cat([self._times_UX.flatten()] + [b.flatten().to(device) for b in self._buffers])
        sum_over_ranks(flat)
        host = flat.cpu().double()
        if reset:  # the window is consumed: it joins the run's total
            self._times_UX.zero_()
            for buffer in self._buffers:
                buffer.zero_()
            self._total = host if self._total is None else self._total + host
        self._warn_scale(host[: self.num_buckets * TIME_COLUMNS].view(self.num_buckets, TIME_COLUMNS))
        return self._parse(host)

    def _parse(self, flat: Tensor) -> list[TimestepStats]:
        times_UX = flat[: self.num_buckets * TIME_COLUMNS].view(self.num_buckets, TIME_COLUMNS)
        offset, per_layer = self.num_buckets * TIME_COLUMNS, []
        for _, layer in self._layers:
            width = 2 * layer.num_experts + 4
            per_layer.append(flat[offset : offset + self.num_buckets * width].view(self.num_buckets, width).tolist())
            offset += self.num_buckets * width
        width = self.max_timestep / self.num_buckets
        out = []
        for bucket in reversed(range(self.num_buckets)):
            t_sum, count, _ = times_UX[bucket].tolist()
            if not count:
                continue
            layers = [
                _layer_stats(name, depth, layer, rows[bucket])
                for depth, ((name, layer), rows) in enumerate(zip(self._layers, per_layer))
            ]
            out.append(TimestepStats(t_sum / count, bucket * width, (bucket + 1) * width, int(count), layers))
        return out

    def _warn_scale(self, times_UX: Tensor) -> None:
        counted = times_UX[:, 1].sum().item()
        if times_UX[:, 2].sum().item():
            warnings.warn(
                f"timestep routing: timesteps above max_timestep={self.max_timestep:g} were counted in the "
                "last bucket; pass the model's largest timestep as max_timestep",
                stacklevel=3,
            )
        elif (
            counted and times_UX[0, 1].item() == counted and self.max_timestep > 1 and times_UX[0, 0].item() <= counted
        ):
            warnings.warn(
                f"timestep routing: every timestep was in [0, 1] and landed in the first bucket; if the model "
                f"gets t / {self.max_timestep:g} (Flux-style), pass max_timestep=1.0",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ the monitor protocol

    def observe(self, stats: StepStats) -> tuple[dict[str, dict[str, float]], list[Event]]:
        entries = self.read()
        metrics: dict[str, dict[str, float]] = {name: {} for name, _ in self._layers}
        for entry in entries:
            for layer in entry.layers:
                for key, value in _load_metrics(layer).items():
                    metrics[layer.name][f"t={entry.timestep:.4g}/{key}"] = value
        metrics["model"] = {"timesteps": float(len(entries))}
        return metrics, []

    def summary(self) -> dict[str, Any]:
        """Every window read (and reset) so far, per timestep bucket and layer (JSON-serialisable)."""
        entries = self._parse(self._total) if self._total is not None else []
        return {
            "num_buckets": self.num_buckets,
            "max_timestep": self.max_timestep,
            "timesteps": [
                {
                    "timestep": e.timestep,
                    "range": [e.low, e.high],
                    "count": e.count,
                    "layers": {layer.name: _load_metrics(layer) for layer in e.layers},
                }
                for e in entries
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        # The device buffers hold one window, consumed by each observation: only the total remains.
        return {"total": self._total.tolist() if self._total is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        total = state["total"]
        if total is not None and self._layers:
            expected = self.num_buckets * (TIME_COLUMNS + sum(2 * layer.num_experts + 4 for _, layer in self._layers))
            if len(total) != expected:
                raise ValueError(
                    f"timestep_routing state holds {len(total)} totals, this monitor counts {expected} "
                    "(num_buckets or the MoE layers differ): load it with the settings and model it was saved with"
                )
        self._total = torch.tensor(total, dtype=torch.float64) if total is not None else None


def _layer_stats(name: str, depth: int, layer: MoeLayer, row: list[float]) -> LayerStats:
    e = layer.num_experts
    sums = [0.0] * len(STATS)  # routed_norm / shared_norm stay 0
    for offset, stat in enumerate(("tokens", "entropy", "max_prob", "margin")):
        sums[INDEX[stat]] = row[2 * e + offset]
    return LayerStats.from_sums(name, depth, layer.top_k, row[:e], row[e : 2 * e], sums)


def _load_metrics(layer: LayerStats) -> dict[str, float]:
    share = layer.load_share
    return {"cv": load_cv(layer), "entropy": layer.entropy, **{f"share_{e}": s for e, s in enumerate(share)}}


def format_table(entries: list[TimestepStats]) -> str:
    """One line per timestep and layer: the load share of each expert, in percent."""
    lines = []
    for entry in entries:
        for layer in entry.layers:
            shares = " ".join(f"{100 * s:5.1f}" for s in layer.load_share)
            lines.append(f"t={entry.timestep:8.3f}  {layer.name}: {shares}  (entropy {layer.entropy:.3f})")
    return "\n".join(lines)


register_monitor("timestep_routing", TimestepRouting)
