"""Routers initialised from data: `moeify(model, router_init=..., calibration_inputs=...)`.

Law 3 starts every router random. Two recipes start the linear router's rows (logits_E = W x, one
row of W per routed expert) from the FFN inputs the dense model computes on calibration inputs:

- "kmeans" (LLaMA-MoE v2's clustering of hidden states into experts): the FFN inputs of a
  calibration batch are clustered into E centroids per layer, and expert e's row points along
  centroid e. The clustering is spherical k-means (cosine similarity, k-means++ seeding, Lloyd
  steps until the assignments stop changing, at most `KMEANS_MAX_ITERS`), because a router whose
  rows have one common norm sends each token to argmax_e cos(x, row_e): its top-1 choice at
  initialisation *is* the cluster assignment. Euclidean centroids would not give that.
- "prompts" (mergekit-moe's "hidden" gate mode): `calibration_inputs` holds one set of prompts
  per routed expert, and expert e's row points along the mean FFN input of its prompts' tokens
  (computed with the model being converted, as mergekit computes them with its base model).

Scale: every row has the same norm s, chosen per layer so that the RMS of the logits over the
calibration tokens equals what the random router of Law 3 gives there, router_init_std * RMS ||x||
(E[(w.x)^2] = std^2 ||x||^2 for w ~ N(0, std^2)). Giving the rows the random rows' norm instead
(std * sqrt(D)) would make the logits about sqrt(D) times larger than random ones (cosines of O(1)
with the data instead of O(1/sqrt(D))): 64x at D = 4096, a near one-hot softmax from the first
step, the soft saturation "Sparse Mixture-of-Experts Routing in Visual Diffusion Transformers"
reports for linear routers. With the same logit scale the routes start meaningful and as soft.

Laws: the experts are untouched (Law 1) and so are the shared experts (Law 2): clones with
renormalised top-k weights reproduce the dense FFN whatever the router says, so the identity
check still holds. Only Law 3 changes (the rows come from data), and only for the linear router:
the mlp router's logits pass through a random hidden layer and the cross-attention router adds a
random conditioning term, so neither has a row per expert in the FFN's input space to set.
Cost: one forward of the dense model per calibration batch; "kmeans" keeps every layer's real
tokens on the CPU in fp32 until it clusters them, T * D * 4 bytes per layer (16k tokens of a
4096-wide model: 268 MB per layer), and clusters there (float32, seeded: the rows do not depend
on the device). A progress bar shows on a terminal from 8 batches on.
With fine-grained experts (granularity G) there are E / G rows to compute, one per copy of the
FFN, each repeated for the copy's G slices (the virtual groups stay tied, so the identity check
still holds), and "prompts" takes one entry per copy.
A saved model keeps its router weights; loading rebuilds random routers and reads them from the
file (moeify.hub.load), so no calibration inputs are needed then.

Shape legend: T tokens, D model dim, E experts, C copies of the FFN (E / granularity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeify.config import MoeifyConfig
from moeify.layers.routers import LinearRouter
from moeify.recipes.calibration import as_batches, capture_ffn_inputs, concatenated, is_batch
from moeify.surgery.errors import ConversionError
from moeify.surgery.plan import ConversionPlan

KMEANS_MAX_ITERS = 100
# Added to a site's router seed (config.seed * 1_000_003 + index), so the k-means draws differ
# from the random router's own.
KMEANS_SEED_OFFSET = 300_007


@dataclass(frozen=True)
class KMeans:
    """Spherical k-means of some tokens: unit centroids, each token's cluster, the Lloyd steps run."""

    centroids_ED: Tensor
    assignment_T: Tensor
    iterations: int
    converged: bool


def _plus_plus(u_TD: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding on unit vectors: each next centre drawn with probability proportional to
    its squared distance to the nearest centre so far (2 - 2 cos)."""
    tokens = u_TD.shape[0]
    first = int(torch.randint(tokens, (1,), generator=generator))
    chosen = [first]
    dist_T = (2 - 2 * (u_TD @ u_TD[first])).clamp_min(0)
    for _ in range(1, num_clusters):
        # Every token on a centre already (fewer distinct tokens than clusters): any token will do.
        if float(dist_T.sum()) > 0:
            pick = int(torch.multinomial(dist_T, 1, generator=generator))
        else:
            pick = int(torch.randint(tokens, (1,), generator=generator))
        chosen.append(pick)
        dist_T = torch.minimum(dist_T, (2 - 2 * (u_TD @ u_TD[pick])).clamp_min(0))
    return u_TD[chosen].clone()


def spherical_kmeans(x_TD: Tensor, num_clusters: int, *, seed: int, max_iters: int = KMEANS_MAX_ITERS) -> KMeans:
    """Cluster the directions of `x_TD` into `num_clusters` unit centroids (float32, on CPU: the
    result does not depend on the device). A cluster left empty keeps its centroid."""
    tokens, width = x_TD.shape
    if tokens < num_clusters:
        raise ValueError(
            f"k-means of {tokens} token(s) into {num_clusters} clusters: needs at least one token per cluster"
        )
    u_TD = F.normalize(x_TD.detach().to(device="cpu", dtype=torch.float32), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    c_ED = _plus_plus(u_TD, num_clusters, generator)
    assignment_T = (u_TD @ c_ED.T).argmax(dim=-1)
    iterations, converged = 0, False
    while iterations < max_iters:
        sums_ED = torch.zeros(num_clusters, width).index_add_(0, assignment_T, u_TD)
        filled_E = torch.bincount(assignment_T, minlength=num_clusters) > 0
        c_ED = torch.where(filled_E[:, None], F.normalize(sums_ED, dim=-1), c_ED)
        iterations += 1
        new_T = (u_TD @ c_ED.T).argmax(dim=-1)
        converged = torch.equal(new_T, assignment_T)
        assignment_T = new_T
        if converged:
            break
    return KMeans(c_ED, assignment_T, iterations, converged)


def row_scale(directions_ED: Tensor, x_TD: Tensor, init_std: float) -> float:
    """The common row norm that gives logits the RMS of Law 3's random router on these tokens:
    init_std * RMS ||x|| (see the module docstring). Tokens orthogonal to every row (or all zero):
    the random rows' norm, init_std * sqrt(D)."""
    rms_norm = x_TD.pow(2).sum(dim=-1).mean().sqrt()
    rms_logit = (x_TD @ directions_ED.T).pow(2).mean().sqrt()
    if float(rms_logit) <= 0:
        return init_std * x_TD.shape[-1] ** 0.5
    return float(init_std * rms_norm / rms_logit)


@dataclass(frozen=True)
class SiteRows:
    """The router rows of one converted FFN, and what they came from."""

    name: str
    rows_ED: Tensor  # fp32, CPU
    tokens: int  # real (unpadded) calibration tokens seen at this FFN
    scale: float  # the rows' common norm
    iterations: int | None = None  # k-means: Lloyd steps run
    converged: bool | None = None  # k-means: the assignments stopped changing


@dataclass(frozen=True)
class RouterInit:
    """What `router_init` computed: per converted FFN, its rows (in the plan's site order)."""

    mode: str
    batches: int
    sites: list[SiteRows]

    def rows(self) -> dict[str, Tensor]:
        return {site.name: site.rows_ED for site in self.sites}

    def summary(self) -> dict[str, Any]:
        """Plain numbers for logs and reports (no tensors)."""
        return {
            "mode": self.mode,
            "batches": self.batches,
            "sites": {
                s.name: {"tokens": s.tokens, "scale": s.scale, "iterations": s.iterations, "converged": s.converged}
                for s in self.sites
            },
        }


def _copies(config: MoeifyConfig) -> int:
    """Distinct router rows at conversion: one per routed expert, or with fine-grained experts one
    per copy of the FFN (its `granularity` slices share it: moeify.recipes.granularity)."""
    return config.num_experts // config.granularity


def _per_slice(rows_CD: Tensor, granularity: int) -> Tensor:
    """Each copy's row repeated for its slices (the virtual groups stay tied)."""
    return rows_CD.repeat_interleave(granularity, dim=0)


def _prompt_sets(config: MoeifyConfig, calibration_inputs: Any) -> list[list[Any]]:
    """`calibration_inputs` of router_init='prompts': one entry per routed expert (per copy with
    granularity > 1), each one batch or a non-empty list of batches."""
    experts = _copies(config)
    if (
        is_batch(calibration_inputs)
        or not isinstance(calibration_inputs, Sequence)
        or isinstance(calibration_inputs, str)
    ):
        raise TypeError(
            f"router_init='prompts' takes calibration_inputs as a list with one entry per routed expert "
            f"({experts}{', one per copy of the FFN' if config.granularity > 1 else ''}), each that expert's prompts (one batch, or a list of batches); got {type(calibration_inputs).__name__}"
        )
    if len(calibration_inputs) != experts:
        raise ConversionError(
            f"router_init='prompts': calibration_inputs has {len(calibration_inputs)} entries, but there are "
            + (
                f"num_experts={experts} routed experts; give one entry (that expert's prompts) per expert"
                if config.granularity == 1
                else f"{experts} copies of the FFN (num_experts={config.num_experts} / granularity={config.granularity}); "
                "give one entry per copy (its slices share a router row at conversion)"
            )
        )
    sets = []
    for expert, entry in enumerate(calibration_inputs):
        batches = list(as_batches(entry, f"router_init='prompts': calibration_inputs[{expert}]"))
        bad = [type(b).__name__ for b in batches if not is_batch(b)]
        if not batches or bad:
            raise TypeError(
                f"router_init='prompts': calibration_inputs[{expert}] must be one batch or a non-empty list of batches "
                f"(dicts of keyword arguments, tuples, or tensors), got {'an empty list' if not batches else bad[0]}"
            )
        sets.append(batches)
    return sets


def check(config: MoeifyConfig, calibration_inputs: Any) -> None:
    """Every refusal of these recipes, before anything runs or changes."""
    mode = config.router_init
    if mode == "random":
        if calibration_inputs is not None:
            raise ConversionError(
                "calibration_inputs are read only to initialise routers from data, and router_init='random': set "
                "router_init='kmeans' (router rows = k-means centroids of the FFN inputs on these batches) or "
                "router_init='prompts' (one list of prompts per routed expert), or leave calibration_inputs out"
            )
        return
    if calibration_inputs is None:
        what = (
            "a batch or a list of batches" if mode == "kmeans" else "a list with one set of prompts per routed expert"
        )
        raise ConversionError(
            f"router_init={mode!r} computes the router rows from the model's FFN inputs on calibration data: pass "
            f"moeify(model, calibration_inputs=...) ({what}), or use router_init='random'"
        )
    if config.router != "linear":
        raise ConversionError(
            f"router_init={mode!r} sets each routed expert's row of a linear router's weight (logits = W x); the "
            f"{config.router!r} router has no such row (the mlp router's logits pass through a random hidden layer, the "
            "cross-attention router adds a random conditioning term): use router='linear', or router_init='random'"
        )
    if mode == "prompts":
        _prompt_sets(config, calibration_inputs)
    else:
        batches = as_batches(calibration_inputs, "router_init='kmeans': calibration_inputs")
        if isinstance(batches, list):
            bad = [type(b).__name__ for b in batches if not is_batch(b)]
            if not batches or bad:
                raise TypeError(
                    "router_init='kmeans': calibration_inputs must be one batch or a non-empty list of batches (dicts "
                    f"of keyword arguments, tuples, or tensors), got {'an empty list' if not batches else 'a ' + bad[0]}"
                )


def _tokens_or_refuse(name: str, x_TD: Tensor, needed: int, what: str) -> Tensor:
    if x_TD.shape[0] < needed:
        why = f"k-means into {needed} clusters needs at least one per cluster" if needed > 1 else "a mean needs one"
        raise ConversionError(
            f"router_init: {what} gave {x_TD.shape[0]} real (unpadded) token(s) at {name}, and {why}: pass more "
            "calibration tokens. The model was left unchanged"
        )
    return x_TD


def _kmeans_rows(model: nn.Module, plan: ConversionPlan, calibration_inputs: Any) -> RouterInit:
    config, sites = plan.config, plan.sites
    chunks: list[list[Tensor]] = [[] for _ in sites]
    batches = as_batches(calibration_inputs, "router_init='kmeans': calibration_inputs")
    count = capture_ffn_inputs(
        model, sites, batches, lambda i, x_TD: chunks[i].append(x_TD), description="router_init='kmeans'"
    )
    rows = []
    for index, site in enumerate(sites):
        width = site.in_features or 0
        x_TD = _tokens_or_refuse(site.name, concatenated(chunks[index], width), _copies(config), "calibration_inputs")
        chunks[index] = []  # free the tokens of each site once clustered
        result = spherical_kmeans(x_TD, _copies(config), seed=config.seed * 1_000_003 + index + KMEANS_SEED_OFFSET)
        scale = row_scale(result.centroids_ED, x_TD, config.router_init_std)
        rows_ED = _per_slice(result.centroids_ED * scale, config.granularity)
        rows.append(SiteRows(site.name, rows_ED, x_TD.shape[0], scale, result.iterations, result.converged))
    return RouterInit("kmeans", count, rows)


def _prompt_rows(model: nn.Module, plan: ConversionPlan, calibration_inputs: Any) -> RouterInit:
    config, sites = plan.config, plan.sites
    per_expert: list[list[Tensor]] = []  # [expert][site] -> x_TD
    count = 0
    for expert, batches in enumerate(_prompt_sets(config, calibration_inputs)):
        chunks: list[list[Tensor]] = [[] for _ in sites]
        count += capture_ffn_inputs(
            model,
            sites,
            batches,
            lambda i, x_TD, chunks=chunks: chunks[i].append(x_TD),
            description=f"router_init='prompts' expert {expert}",
        )
        per_expert.append([concatenated(c, site.in_features or 0) for c, site in zip(chunks, sites)])
    rows = []
    for index, site in enumerate(sites):
        tokens = [
            _tokens_or_refuse(site.name, per_expert[e][index], 1, f"calibration_inputs[{e}] (expert {e}'s prompts)")
            for e in range(_copies(config))
        ]
        directions_CD = F.normalize(torch.stack([x_TD.mean(dim=0) for x_TD in tokens]), dim=-1)
        x_TD = torch.cat(tokens)
        scale = row_scale(directions_CD, x_TD, config.router_init_std)
        rows.append(SiteRows(site.name, _per_slice(directions_CD * scale, config.granularity), x_TD.shape[0], scale))
    return RouterInit("prompts", count, rows)


def compute(model: nn.Module, plan: ConversionPlan, calibration_inputs: Any) -> RouterInit | None:
    """The router rows of every planned site (None for router_init='random'). Runs the dense
    model on the calibration inputs; nothing of it changes."""
    mode = plan.config.router_init
    if mode == "random":
        return None
    if mode == "kmeans":
        return _kmeans_rows(model, plan, calibration_inputs)
    return _prompt_rows(model, plan, calibration_inputs)


@torch.no_grad()
def set_rows(router: nn.Module, rows_ED: Tensor) -> None:
    """Give a freshly built linear router its rows (checked against its weight's shape)."""
    if not isinstance(router, LinearRouter):
        raise TypeError(f"router_init sets the rows of a LinearRouter, got {type(router).__name__}")
    weight = router.gate.weight
    if tuple(weight.shape) != tuple(rows_ED.shape):
        raise ValueError(
            f"router rows of shape {tuple(rows_ED.shape)} do not fit a router weight of {tuple(weight.shape)}"
        )
    weight.copy_(rows_ED.to(device=weight.device, dtype=weight.dtype))


def describe(mode: str) -> str:
    """One line for the model card."""
    return {
        "random": "random (Law 3)",
        "kmeans": "k-means centroids of the FFN inputs on calibration data",
        "prompts": "mean FFN input of each expert's calibration prompts",
    }.get(mode, mode)


__all__ = [
    "KMeans",
    "RouterInit",
    "SiteRows",
    "check",
    "compute",
    "describe",
    "row_scale",
    "set_rows",
    "spherical_kmeans",
]
