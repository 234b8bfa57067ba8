"""`MoeifyConfig`: the conversion recipe, validated on construction, JSON with a version.

Every field has one meaning and one check; a bad value raises `ValueError` naming the field,
what was given and what is accepted. Unknown keys and newer versions are refused on load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from moeify.layers.routers import router_kinds
from moeify.layers.scoring import SCORES

# 2: aux_loss_in_output (version-1 configs read as True, the default).
# 3: router_score and balance_bias_rate (older configs read as "softmax" and 0: what they did).
# 4: the upcycling recipes: granularity, normalize_topk, router_init, reinit_fraction, experts_from,
#    experts_from_rest (older configs read as 1, True, "random", 0, None, "base": plain clones).
CONFIG_VERSION = 4
MAX_SEED = 2**43

ROUTER_KINDS = ("linear", "mlp", "cross_attention")  # built in; `register_router` adds more
# Training inits of the shared experts, applied after the identity check (Law 2).
#   "noise":    every shared weight matrix ~ N(0, shared_noise_std), biases zero (the paper's choice).
#               The output moves by O(std^2), and both projections start tiny, so their gradients
#               start tiny too (proportional to the other projection's std).
#   "zero_out": input projection(s) cloned from the dense FFN, output projection exactly zero. The
#               model stays exactly dense-equivalent, and the output projection gets a full-size
#               gradient (dL/dy ⊗ act(h)) from step one.
SHARED_INITS = ("noise", "zero_out")
# How the routers start (Law 3 is "random"; the others read `calibration_inputs` given to moeify()).
ROUTER_INITS = ("random", "prompts", "kmeans")
# With experts_from: the non-FFN weights from the base model, or averaged over the sources.
EXPERTS_FROM_REST = ("base", "average")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A real number, not a bool, not NaN or infinite (an infinite loss weight or std is no recipe)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_pattern_list(name: str, value: Any) -> str | tuple[str, ...] | None:
    """peft's convention: a str is a regex matched against the full module name, a list holds
    names matched exactly or as a dotted suffix."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{name}={value!r} is not a valid regular expression: {error}") from None
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        _check(len(value) > 0, f"{name} is an empty list; pass None to select every FFN")
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise ValueError(f"{name} must be a regex string or a list of module names, got {type(value).__name__}: {value!r}")


@dataclass(frozen=True)
class MoeifyConfig:
    """How to turn each dense FFN into router + routed experts + shared experts.

    Args:
        num_experts: routed experts per converted FFN (each an exact clone of it, Law 1).
        top_k: experts each token is sent to (token-choice top-k).
        num_shared_experts: experts every token goes through; zero at conversion (Law 2).
        shared_expert_init: training init of shared experts after the identity check, one of
            `SHARED_INITS` ("noise" as in the paper, or the function-preserving "zero_out").
        shared_noise_std: standard deviation of the "noise" init.
        router: "linear", "mlp" (one hidden layer) or "cross_attention" (tokens attend to the
            model's conditioning, e.g. `encoder_hidden_states`).
        router_hidden_size: hidden width of the mlp router / attention width of the
            cross-attention router (default: min(256, hidden size)).
        router_num_heads: attention heads of the cross-attention router.
        router_init_std: standard deviation of the random router weights (Law 3).
        router_temperature: logits are divided by it before the softmax (or sigmoid).
        router_score: "softmax" (scores sum to 1 over experts) or "sigmoid" (each expert's own
            affinity, DeepSeek-V3). Either way the chosen experts' scores are renormalised to
            sum to 1, so the clones reproduce the dense FFN (moeify.layers.scoring).
        balance_bias_rate: auxiliary-loss-free load balancing (DeepSeek-V3): after each optimizer
            step every expert's selection bias moves by this much, up if the expert got fewer
            than its share of the step's tokens, down if more. The bias changes which experts
            are chosen, never their weights; it starts at zero (the identity check holds). 0 = off.
            Needs an optimizer hooked: `moeify.set_routing(model, optimizer=optimizer)`.
        balance_loss_weight: Switch/GShard load-balancing loss weight.
        z_loss_weight: ST-MoE router z-loss weight.
        entropy_loss_weight: weight of the per-token routing entropy bonus (positive spreads
            tokens; the loss term is -weight * mean normalised entropy).
        aux_loss_in_output: in training mode, add the router losses to the `loss` a model's
            forward returns (and put them in `output.aux_loss`), so a plain `Trainer` trains
            the routers; False: add `moeify.aux_loss(model)` to the loss yourself.
        target_modules: which FFNs to convert (regex string, or list of names/suffixes). A
            pattern that matches no FFN moeify found names modules to convert anyway, by deep
            copy (the generic path; modules without a projection are refused).
        exclude_modules: FFNs to leave dense (same syntax).
        layers: block indices to convert (the first integer in a site's name: 3 in
            `model.layers.3.mlp`), None for all.
        conditioning_dim: feature size of the conditioning a cross-attention router attends
            to, when the architecture does not say it.
        verify: run the identity check (dense FFN vs MoE layer) on every converted layer.
        verify_tolerance: allowed max |dense - moe| relative to the dense output scale.
        seed: makes the random parts of the conversion (routers, shared noise) reproducible.
        granularity: fine-grained experts: each routed expert is a 1/granularity slice of the
            FFN's intermediate dimension, so `num_experts` counts slices (a multiple of it), and
            so does `top_k`. 1: whole-FFN clones.
        normalize_topk: renormalise the chosen experts' weights to sum to 1 (what keeps clones
            equal to the dense FFN); False: the raw scores, as some MoE families do.
        router_init: "random" (Law 3), "prompts" (each expert's router row from the mean hidden
            state of its calibration prompts) or "kmeans" (router rows = k-means centroids of
            the FFN inputs of a calibration batch); the latter two need `calibration_inputs`.
        reinit_fraction: Drop-Upcycling: for every routed expert, this fraction of its
            intermediate neurons is re-initialised from the FFN's weight statistics (a different
            random subset per expert). Breaks Law 1 by design: the deviation from dense is
            measured and reported instead of checked. 0 = off.
        experts_from: where each routed expert's weights came from when `moeify(...,
            experts_from=[...])` took them from several checkpoints (their names, recorded for
            the model card and the saved recipe); None: clones of the model's own FFN. Routed
            expert i comes from source i % len(experts_from): num_experts is a multiple of it.
        experts_from_rest: with experts_from, where everything outside the converted FFNs comes
            from: "base" (the model converted, as mergekit-moe does) or "average" (the mean over
            the sources, as Branch-Train-MiX does).
    """

    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 1
    shared_expert_init: str = "noise"
    shared_noise_std: float = 1e-4
    router: str = "linear"
    router_hidden_size: int | None = None
    router_num_heads: int = 4
    router_init_std: float = 0.02
    router_temperature: float = 1.0
    router_score: str = "softmax"
    balance_bias_rate: float = 0.0
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    entropy_loss_weight: float = 0.0
    aux_loss_in_output: bool = True
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    conditioning_dim: int | None = None
    verify: bool = True
    verify_tolerance: float = 1e-5
    seed: int = 0
    granularity: int = 1
    normalize_topk: bool = True
    router_init: str = "random"
    reinit_fraction: float = 0.0
    experts_from: tuple[str, ...] | None = None
    experts_from_rest: str = "base"
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "num_shared_experts", "router_num_heads", "seed"):
            value = getattr(self, name)
            _check(_is_int(value), f"{name} must be an int, got {value!r}")
        # Each site's routers are seeded with seed * 1_000_003 + its index: that must fit in int64.
        _check(0 <= self.seed < MAX_SEED, f"seed must be an int in [0, 2**43), got {self.seed!r}")
        _check(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        _check(
            1 <= self.top_k <= self.num_experts,
            f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}",
        )
        _check(self.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        _check(
            self.shared_expert_init in SHARED_INITS,
            f"shared_expert_init must be one of {SHARED_INITS}, got {self.shared_expert_init!r}",
        )
        # The registry, not ROUTER_KINDS: a kind added with `register_router` is a valid choice.
        _check(self.router in router_kinds(), f"router must be one of {router_kinds()}, got {self.router!r}")
        _check(self.router_num_heads >= 1, f"router_num_heads must be >= 1, got {self.router_num_heads}")
        if self.router_hidden_size is not None:
            _check(
                _is_int(self.router_hidden_size) and self.router_hidden_size >= 1,
                f"router_hidden_size must be a positive int or None, got {self.router_hidden_size!r}",
            )
        if self.conditioning_dim is not None:
            _check(
                _is_int(self.conditioning_dim) and self.conditioning_dim >= 1,
                f"conditioning_dim must be a positive int or None, got {self.conditioning_dim!r}",
            )
        for name in ("shared_noise_std", "router_init_std", "router_temperature", "verify_tolerance"):
            value = getattr(self, name)
            _check(
                _is_finite(value) and value > 0,
                f"{name} must be a positive finite number, got {value!r}",
            )
        _check(self.router_score in SCORES, f"router_score must be one of {SCORES}, got {self.router_score!r}")
        for name in ("balance_loss_weight", "z_loss_weight", "entropy_loss_weight", "balance_bias_rate"):
            value = getattr(self, name)
            _check(
                _is_finite(value) and value >= 0,
                f"{name} must be a finite number >= 0, got {value!r}",
            )
        _check(
            _is_int(self.granularity) and self.granularity >= 1,
            f"granularity must be an int >= 1, got {self.granularity!r}",
        )
        _check(
            self.num_experts % self.granularity == 0 and self.top_k % self.granularity == 0,
            f"granularity={self.granularity}: num_experts ({self.num_experts}) and top_k ({self.top_k}) must be "
            "multiples of it (each copy of the FFN is cut into granularity experts, and a token takes whole copies "
            f"at conversion), e.g. num_experts={self.granularity * max(1, self.num_experts // self.granularity)}, "
            f"top_k={self.granularity * max(1, self.top_k // self.granularity)}",
        )
        _check(self.router_init in ROUTER_INITS, f"router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        _check(
            _is_finite(self.reinit_fraction) and 0 <= self.reinit_fraction < 1,
            f"reinit_fraction must be a number in [0, 1), got {self.reinit_fraction!r}",
        )
        if self.experts_from is not None:
            names = self.experts_from
            _check(
                isinstance(names, (list, tuple)) and len(names) >= 1 and all(isinstance(n, str) for n in names),
                f"experts_from must be None or a non-empty list of source names, got {names!r}",
            )
            object.__setattr__(self, "experts_from", tuple(names))
            _check(
                self.num_experts % len(names) == 0,
                f"num_experts={self.num_experts} must be a multiple of the {len(names)} experts_from sources "
                f"(routed expert i comes from source i % {len(names)}), e.g. num_experts={len(names)}",
            )
        _check(
            self.experts_from_rest in EXPERTS_FROM_REST,
            f"experts_from_rest must be one of {EXPERTS_FROM_REST}, got {self.experts_from_rest!r}",
        )
        _check(
            self.experts_from_rest == "base" or self.experts_from is not None,
            f"experts_from_rest={self.experts_from_rest!r} averages the sources of experts_from, and none are given",
        )
        for name in ("verify", "aux_loss_in_output", "normalize_topk"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "target_modules", _as_pattern_list("target_modules", self.target_modules))
        object.__setattr__(self, "exclude_modules", _as_pattern_list("exclude_modules", self.exclude_modules))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else self.layers
            _check(
                isinstance(layers, (list, tuple))
                and len(layers) > 0
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers),
                f"layers must be None (all) or a non-empty list of block indices >= 0, got {self.layers!r}",
            )
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        _check(_is_int(self.version) and self.version >= 1, f"version must be an int >= 1, got {self.version!r}")
        _check(
            self.version <= CONFIG_VERSION,
            f"this config has version {self.version}, written by a newer moeify; this moeify reads versions "
            f"up to {CONFIG_VERSION}: upgrade it (pip install -U moeify)",
        )

    @property
    def preserves_function(self) -> bool:
        """Whether the converted model reproduces the dense one (checked at conversion), or the
        recipe departs from it by design (measured and reported instead)."""
        # Raw top-k scores (normalize_topk=False) scale clones by the chosen scores' sum, which
        # varies per token; only softmax scores all taken (top_k == num_experts) sum to 1.
        raw_scores_sum_to_one = self.router_score == "softmax" and self.top_k == self.num_experts
        return (
            self.reinit_fraction == 0 and self.experts_from is None and (self.normalize_topk or raw_scores_sum_to_one)
        )

    def replace(self, **overrides: Any) -> MoeifyConfig:
        """A copy with some fields changed (validated again); unknown names are refused."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"unknown MoeifyConfig option(s) {unknown}; known options: "
                f"{sorted(f.name for f in dataclasses.fields(self) if f.name != 'version')}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("target_modules", "exclude_modules", "layers", "experts_from"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoeifyConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a MoeifyConfig is read from a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MoeifyConfig key(s) {unknown}: written by a newer moeify, or not a moeify config"
            )
        if "version" not in data:
            raise ValueError("this JSON has no 'version' field: it is not a moeify config")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MoeifyConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON: {error}") from None
        return cls.from_dict(data)


def recipe(config: MoeifyConfig | None, overrides: dict[str, Any], caller: str) -> MoeifyConfig:
    """The config a call works with: `config` (default: MoeifyConfig()) with `overrides` applied.
    Anything but a MoeifyConfig or None is refused with the way to pass it."""
    if config is None:
        config = MoeifyConfig()
    elif not isinstance(config, MoeifyConfig):
        hint = (
            f"pass its entries as keywords ({caller}(model, **recipe)) or build one (MoeifyConfig(**recipe))"
            if isinstance(config, dict)
            else "pass options as keywords, e.g. num_experts=8"
        )
        raise TypeError(
            f"{caller}: config must be a MoeifyConfig or None, got {type(config).__name__} {config!r}; {hint}"
        )
    return config.replace(**overrides) if overrides else config
