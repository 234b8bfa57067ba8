"""The study's training harness: pretrain a dense TinyDiT once per seed, convert it with moeify,
train it with monitors attached, and return plain numbers.

Every run is a `dict` job (picklable, JSON-able) handed to `train_run`, so that `run.py` can
spread runs over worker processes and reuse a run that two experiments share. Within one seed,
all arms of an experiment start from the same pretrained weights, the same router init (the
conversion seed is the run seed) and see the same stream of batches: arms differ only in the
factor under study.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from model import Shape, Task, TinyDiT, denoising_loss
from torch import nn

import moeify
from moeify.control import BreakDeadlock, ReviveDeadExperts, SharedWarmup
from moeify.monitors import (
    DeadExperts,
    Deadlock,
    Ecology,
    ExpertHomogenization,
    LostUpdates,
    MonitorRunner,
    RouterEntropy,
    SharedMaturity,
)

# Bump when pretraining changes; the disk cache is also keyed by model.py's source.
CACHE_VERSION = 1
MODEL_SOURCE = (Path(__file__).resolve().parent / "model.py").read_bytes()
TARGET = r"blocks\.\d+\.ff"  # the blocks' FFNs; the timestep MLP stays dense


@dataclass(frozen=True)
class Scale:
    """How big and how long. `full` is the study; `quick` the CI smoke run of the same code."""

    name: str
    shape: Shape
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    seeds: tuple[int, ...]
    steps: dict[str, int] = field(default_factory=dict)  # per experiment: MoE training steps

    def key(self, seed: int) -> str:
        blob = json.dumps([CACHE_VERSION, asdict(self.shape), self.batch, self.pretrain_steps, self.pretrain_lr, seed])
        return hashlib.sha256(blob.encode() + MODEL_SOURCE).hexdigest()[:16]


SCALES = {
    "full": Scale(
        "full",
        Shape(),
        batch=32,
        pretrain_steps=400,
        pretrain_lr=3e-3,
        seeds=(0, 1, 2),
        steps={"deadlock": 200, "bf16": 60, "revival_prefix": 200, "revival_branch": 100, "ecology": 200},
    ),
    "quick": Scale(
        "quick",
        Shape(depth=3, dim=16, ffn=64),
        batch=8,
        pretrain_steps=20,
        pretrain_lr=3e-3,
        seeds=(0, 1),
        steps={"deadlock": 12, "bf16": 8, "revival_prefix": 8, "revival_branch": 6, "ecology": 10},
    ),
}

_TASK = Task()
_PRETRAINED: dict[str, dict[str, torch.Tensor]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("MOEIFY_STUDY_CACHE", Path(tempfile.gettempdir()) / "moeify-routing-study"))


def data_stream(seed: int, phase: str) -> torch.Generator:
    """The batches of one phase of one seed: every arm of that seed draws the same ones."""
    tag = int(hashlib.sha256(f"{seed}/{phase}".encode()).hexdigest()[:12], 16)
    return torch.Generator().manual_seed(tag)


def batch(scale: Scale, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return _TASK.batch(scale.batch, generator)


def pretrain(scale_name: str, seed: int) -> dict[str, float]:
    """Train the dense model of `seed` and store it (memory and disk); returns its loss curve ends."""
    scale = SCALES[scale_name]
    path = cache_dir() / f"{scale.key(seed)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)["losses"]
    torch.manual_seed(seed)
    model = TinyDiT(scale.shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=scale.pretrain_lr, weight_decay=0.0)
    generator = data_stream(seed, "pretrain")
    losses = []
    for _ in range(scale.pretrain_steps):
        loss = denoising_loss(model, batch(scale, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    tail = max(1, len(losses) // 10)
    summary = {"first": losses[0], "last_tenth_mean": sum(losses[-tail:]) / tail}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state": model.state_dict(), "losses": summary}, partial)
    partial.replace(path)  # atomic: a worker never reads half a file
    return summary


def pretrain_job(job: dict) -> dict[str, float]:
    return pretrain(job["scale"], job["seed"])


def pretrained(scale: Scale, seed: int) -> TinyDiT:
    key = scale.key(seed)
    if key not in _PRETRAINED:
        path = cache_dir() / f"{key}.pt"
        if not path.exists():
            pretrain(scale.name, seed)
        _PRETRAINED[key] = torch.load(path, weights_only=True)["state"]
    model = TinyDiT(scale.shape)
    model.load_state_dict(_PRETRAINED[key])
    return model


def convert(model: nn.Module, scale: Scale, seed: int, **options: Any) -> nn.Module:
    """moeify with the study's defaults (8 experts, top-2, 1 shared expert, the paper's noise init),
    checked against the dense model on one batch."""
    inputs = batch(scale, torch.Generator().manual_seed(12345))
    inputs.pop("target")
    config = {"num_experts": 8, "top_k": 2, "num_shared_experts": 1, "conditioning_dim": 16, **options}
    return moeify.moeify(model, target_modules=TARGET, seed=seed, example_inputs=inputs, **config)


@torch.no_grad()
def premature_shared(model: nn.Module, share: float) -> None:
    """A shared expert that is mature from step 0, the model's function unchanged: the shared
    expert becomes the dense FFN scaled by `share`, every routed expert's output projection is
    scaled by 1 - share (the top-k weights sum to 1, so routed + shared = dense)."""
    for _, layer in moeify.moe_layers(model):
        routed, shared = layer.experts, layer.shared_experts
        shared.w_in.copy_(routed.w_in[:1])
        shared.b_in.copy_(routed.b_in[:1])
        shared.w_out.copy_(share * routed.w_out[:1])
        shared.b_out.copy_(share * routed.b_out[:1])
        routed.w_out.mul_(1.0 - share)
        routed.b_out.mul_(1.0 - share)


class CountsDeadlock(Deadlock):
    """The deadlock monitor under its own name, for a second criterion in the same run (the
    study runs moeify's counts-and-probability criterion and the counts-alone one side by side)."""

    name = "deadlock_counts"


class ShortDeadExperts(DeadExperts):
    """The dead-experts monitor under its own name, for a second definition in the same run."""

    name = "dead_experts_short"


def build_monitors(specs: list[list], model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """[[name, kwargs], ...] -> monitors; shared_maturity reads the deadlock monitor and ecology
    the dead-experts monitor listed before them."""
    built: dict[str, Any] = {}
    plain = {
        "deadlock": Deadlock,
        "deadlock_counts": CountsDeadlock,
        "dead_experts": DeadExperts,
        "dead_experts_short": ShortDeadExperts,
        "router_entropy": RouterEntropy,
        "expert_homogenization": ExpertHomogenization,
        "revive_dead_experts": ReviveDeadExperts,
        "break_deadlock": BreakDeadlock,
        "shared_warmup": SharedWarmup,
    }
    for name, spec_kwargs in specs:
        kwargs = dict(spec_kwargs)  # the job's spec stays as it was (a job may be run again)
        if name in plain:
            built[name] = plain[name](**kwargs)
        elif name == "shared_maturity":  # {"deadlock": name}: which deadlock monitor it reads
            source = kwargs.pop("deadlock", "deadlock")
            built[name] = SharedMaturity(deadlock=built[source], **kwargs)
        elif name == "ecology":
            built[name] = Ecology(dead=built.get("dead_experts"), **kwargs)
        elif name == "lost_updates":
            built[name] = LostUpdates(optimizer, model=model, **kwargs)
        else:
            raise ValueError(f"unknown monitor {name!r}")
    return list(built.values())


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay; group 0 holds the routed experts, group 1 everything else (so
    the lost-update monitor reports the experts on their own)."""
    experts = [p for _, layer in moeify.moe_layers(model) for p in layer.experts.parameters()]
    ids = {id(p) for p in experts}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": experts}, {"params": rest}], lr=lr, weight_decay=0.0)


def round_sig(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def series(history: list[dict], wanted: list[list[str]]) -> dict[str, Any]:
    """Per (monitor, metric): {"steps": [...], layer: [value per step]} over the steps where the
    monitor reported (the homogenization monitor reads on a stride)."""
    out: dict[str, Any] = {}
    for monitor, metric in wanted:
        rows = [(r["step"], r["monitors"].get(monitor, {})) for r in history]
        rows = [(step, m) for step, m in rows if m]
        layers = sorted({name for _, m in rows for name, values in m.items() if metric in values})
        entry: dict[str, Any] = {"steps": [step for step, _ in rows]}
        for name in layers:
            entry[name] = [round_sig(m.get(name, {}).get(metric), 3) for _, m in rows]
        out[f"{monitor}.{metric}"] = entry
    return out


@dataclass
class Session:
    """A converted model in training: model, optimizer, runner and its data stream."""

    scale: Scale
    seed: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    runner: MonitorRunner
    generator: torch.Generator
    losses: list[float] = field(default_factory=list)
    preflight: dict[str, Any] | None = None  # check_bf16's prediction (bf16 runs)

    def train(self, steps: int) -> None:
        for _ in range(steps):
            data = batch(self.scale, self.generator)
            loss = denoising_loss(self.model, data)
            (loss + moeify.aux_loss(self.model)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.runner.step()
            self.losses.append(loss.item())

    def branch(self, monitors: list[list], phase: str) -> Session:
        """An independent copy (model, optimizer state, monitor state) that continues on the
        batches of `phase`."""
        model, optimizer = copy.deepcopy((self.model, self.optimizer))
        runner = MonitorRunner(model, build_monitors(monitors, model, optimizer))
        runner.load_state_dict(self.runner.state_dict())
        generator = data_stream(self.seed, phase)
        return Session(self.scale, self.seed, model, optimizer, runner, generator, list(self.losses))


def start(job: dict) -> Session:
    scale, seed = SCALES[job["scale"]], job["seed"]
    torch.manual_seed(seed)
    model = convert(pretrained(scale, seed), scale, seed, **job.get("moeify", {}))
    if job.get("premature_share"):
        premature_shared(model, job["premature_share"])
    if job.get("dtype") == "bf16":
        model.to(torch.bfloat16)  # routers and routing statistics stay fp32
    optimizer = make_optimizer(model, job["lr"])
    preflight = None
    if job.get("dtype") == "bf16":  # predicted before training, as a user would check
        with warnings.catch_warnings():  # it warns that most updates will be lost: the point here
            warnings.simplefilter("ignore")
            report = moeify.check_bf16(optimizer, model=model)
        preflight = {"lost": report.lost, "groups": [g.lost for g in report.groups]}
    if job.get("guard"):
        optimizer = moeify.guard_bf16(model, optimizer, method=job["guard"], seed=seed)
    runner = MonitorRunner(model, build_monitors(job["monitors"], model, optimizer))
    return Session(scale, seed, model, optimizer, runner, data_stream(seed, "moe"), preflight=preflight)


def report(session: Session, wanted: list[list[str]], *, close: bool = True) -> dict[str, Any]:
    """The run's numbers: monitor summary and events, the wanted series, the loss. `close=False`
    leaves the runner attached (a prefix that branches later)."""
    summary = session.runner.close() if close else session.runner.summary()
    tail = max(1, len(session.losses) // 10)
    return {
        "summary": summary,
        "events": [{k: v for k, v in e.items() if k != "detail"} for e in session.runner.events],
        "series": series(session.runner.history, wanted),
        "loss_first": session.losses[0] if session.losses else None,
        "loss_last_tenth": sum(session.losses[-tail:]) / tail if session.losses else None,
        **({"preflight": session.preflight} if session.preflight else {}),
    }


def train_run(job: dict) -> dict[str, Any]:
    """One run: convert, train `job["steps"]` steps with the job's monitors, report."""
    session = start(job)
    session.train(job["steps"])
    return report(session, job.get("series", []))
