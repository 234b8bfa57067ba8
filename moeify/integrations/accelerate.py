"""accelerate glue for converted models: what a training script needs beyond `Accelerator`.

    accelerator = Accelerator(mixed_precision="bf16", fsdp_plugin=fsdp2_plugin())
    model = moeify(model, num_experts=8)
    runner = attach_monitors(model, sinks=[AccelerateSink(accelerator), JsonlSink(out / "run")])
    register_state(accelerator, model, runner)         # before save_state / load_state
    model, optimizer = prepare(accelerator, model, optimizer)
    ...
    save_state(accelerator, out / "checkpoint")         # accelerator.save_state, crash-safe; load_state reads it

Monitor records reach accelerate's trackers through `moeify.sinks.AccelerateSink`. Attach the
runner on EVERY rank: `runner.step()` all-reduces the routing statistics (a collective), and the
sinks write on the main process only.

What was measured (tests/test_distributed.py, gloo, torch 2.13, accelerate 1.15):
- DDP needs no `find_unused_parameters`: packed experts hold one [E, ...] parameter per
  projection, so every expert is in every step's graph; generic-path experts (`ModuleExperts`)
  join an expert that got no tokens through an empty slice of its parameters (zero gradient, zero
  work).
- DDP (`broadcast_buffers=True`, its default) copies rank 0's buffers over every rank's at each
  forward, the routing-statistic accumulators included: with two forwards per observation window
  (gradient accumulation, `every_n_steps > 1`) rank 1's first counts are replaced by rank 0's and
  the all-reduced statistics are wrong. `prepare` tells DDP to leave the MoE layers'
  non-persistent buffers alone; plain `accelerator.prepare` does not.
- FSDP2 with `MixedPrecisionPolicy(param_dtype=torch.bfloat16)` casts the fp32 routers to bf16 for
  the forward, and the fp32 routing math then fails ("expected m1 and m2 to have the same dtype").
  Routers need their own FSDP unit with an fp32 policy (`shard_routers`).
- accelerate's FSDP2 config file cannot ask for fp32 gradient reduction: with
  `mixed_precision: bf16` it reduces in bf16. `fsdp2_plugin()` passes the policy explicitly.
- `accelerate launch --multi_gpu` on a CPU-only machine starts independent one-process runs unless
  `ACCELERATE_USE_CPU=1` is set: `check_launch` refuses that silent trap.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

try:
    import accelerate
    from accelerate.utils import DistributedType
except ImportError as error:  # pragma: no cover - accelerate is a core dependency
    raise ImportError("moeify.integrations.accelerate needs accelerate: pip install 'accelerate>=1.0'") from error

from moeify.atomic import as_directory, staged_for_ranks
from moeify.control.routing import routing_control
from moeify.distributed.data_parallel import keep_stats_local
from moeify.distributed.expert_parallel import is_expert_parallel
from moeify.layers.inventory import conversion_recipes, moe_layers
from moeify.precision.guards import Bf16Guard

STATE_FORMAT = 1


def check_launch(accelerator: accelerate.Accelerator) -> None:
    """Refuse a launch that started several processes that do not form one distributed run."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate sees "
            f"{accelerator.num_processes}: each process would train alone on its own data. On a machine "
            "without GPUs set ACCELERATE_USE_CPU=1, e.g. ACCELERATE_USE_CPU=1 accelerate launch "
            "--config_file integrations/accelerate/cpu_2proc.yaml train.py"
        )


def fsdp2_plugin(**kwargs: Any) -> accelerate.FullyShardedDataParallelPlugin | None:
    """An FSDP2 plugin that computes in bf16 and reduces gradients in fp32, when the script was
    launched with an FSDP config file (`fsdp2_bf16.yaml`); None otherwise, so
    `Accelerator(fsdp_plugin=fsdp2_plugin())` is right under every config. The config file's other
    `fsdp_*` settings still apply (the plugin reads them from the launcher's environment)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # accelerate would build MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16): gradient
    # sums in bf16 lose the small contributions of each rank (test_fsdp2_config_with_plugin_reduces_in_fp32).
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs.setdefault("fsdp_version", 2)
    return accelerate.FullyShardedDataParallelPlugin(mixed_precision_policy=policy, **kwargs)


def shard_routers(model: nn.Module, **fully_shard_kwargs: Any) -> int:
    """Give every router its own FSDP2 unit that keeps fp32 parameters in the forward, before the
    MoE layers and the root are sharded with a bf16 policy. Returns the number of routers sharded.
    `fully_shard_kwargs` (mesh, reshard_after_forward, ...) go to `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    routers = [layer.router for _, layer in moe_layers(model) if not isinstance(layer.router, FSDPModule)]
    for router in routers:
        fully_shard(router, mp_policy=fp32, **fully_shard_kwargs)
    return len(routers)


def _fsdp2_casts_params(accelerator: accelerate.Accelerator) -> bool:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != DistributedType.FSDP or plugin is None or plugin.fsdp_version != 2:
        return False
    policy = plugin.mixed_precision_policy
    return policy is not None and policy.param_dtype not in (None, torch.float32)


def expert_parallel(accelerator: accelerate.Accelerator, model: nn.Module, ep_size: int) -> DeviceMesh:
    """Shard every MoE layer's experts over the launch's processes (`ep_size` must be their
    number: every rank holds E / ep_size experts) with `moeify.distributed.apply_expert_parallel`,
    on a 1-D mesh moeify builds (accelerate's `ParallelismConfig` has no expert dimension). Under
    DDP the experts stay out of DDP; under FSDP2 out of `fully_shard` (accelerate's
    `ignored_modules`), which shards the rest over the same ranks. Call it before building the
    optimizer (or let `prepare(..., ep_size=N)` call it and remap a plain optimizer). Returns the mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.distributed import apply_expert_parallel, keep_experts_local

    where = "moeify.integrations.accelerate.expert_parallel"
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 2:
        raise ValueError(
            f"{where}: ep_size must be an int >= 2 (the processes to spread the experts over), got {ep_size!r}"
        )
    if ep_size != accelerator.num_processes:
        raise ValueError(
            f"{where}: ep_size={ep_size} with {accelerator.num_processes} processes; moeify spreads the experts over "
            f"all of them (ep_size = number of processes). With fewer, each expert shard would be replicated over "
            f"{accelerator.num_processes}/{ep_size} data-parallel groups whose gradients moeify does not average yet: "
            f"launch {ep_size} processes or pass ep_size={accelerator.num_processes}"
        )
    if accelerator.distributed_type not in _EP_TYPES:
        raise ValueError(
            f"{where}: expert parallelism composes with DDP (multi_cpu / multi_gpu) and FSDP2, "
            f"not {accelerator.distributed_type}"
        )
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(f"{where}: expert parallelism composes with FSDP2, not FSDP1: set fsdp_version: 2")
    mesh = init_device_mesh(accelerator.device.type, (ep_size,), mesh_dim_names=("ep",))
    apply_expert_parallel(model, mesh)
    keep_experts_local(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        experts = [layer.experts for _, layer in moe_layers(model)]
        plugin.ignored_modules = [*(plugin.ignored_modules or []), *experts]
    return mesh


_EP_TYPES = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP)


def _parallel_experts(accelerator: accelerate.Accelerator, model: nn.Module, objects: tuple, ep_size: int) -> None:
    """`expert_parallel`, then each optimizer in `objects` points at the new expert parameters
    (DTensors replace them; torch cannot swap a Parameter for a DTensor one in place)."""
    where = "moeify.integrations.accelerate.prepare"
    names = {id(p): name for name, p in model.named_parameters()}
    optimizers = [obj for obj in objects if isinstance(obj, torch.optim.Optimizer)]
    for optimizer in optimizers:
        foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in names]
        if isinstance(optimizer, Bf16Guard) or foreign or optimizer.state:
            why = (
                "is a bf16 guard (its shadows are the experts' old tensors)"
                if isinstance(optimizer, Bf16Guard)
                else "holds tensors that are not the model's parameters"
                if foreign
                else "has state (it stepped)"
            )
            raise ValueError(
                f"{where}(..., ep_size={ep_size}): the optimizer {why}, so it cannot be moved onto the sharded experts. "
                "Shard first, then build it: moeify.integrations.accelerate.expert_parallel(accelerator, model, "
                f"ep_size={ep_size}); optimizer = ...(model.parameters()); prepare(accelerator, model, optimizer)"
            )
    expert_parallel(accelerator, model, ep_size)
    now = dict(model.named_parameters())
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [now[names[id(p)]] for p in group["params"]]


def prepare(accelerator: accelerate.Accelerator, model: nn.Module, *objects: Any, ep_size: int | None = None) -> Any:
    """`accelerator.prepare(model, *objects)` for a converted model: `check_launch`, then
    `keep_stats_local` (DDP), and under FSDP2 with a low-precision param dtype the routers are
    first sharded with an fp32 policy. No DDP kwargs are needed (see the module docstring).
    Every optimizer prepared is hooked to the model's routing control (`moeify.set_routing`), so
    expert biases and routing schedules move once per real optimizer step (not per accumulated
    micro-batch). Returns what `accelerator.prepare` returns.

    `ep_size=N`: expert parallelism first (`expert_parallel`: the experts over the N processes,
    DDP or FSDP2 on the rest); a plain optimizer built before is moved onto the sharded experts.
    Clip gradients with `moeify.distributed.clip_grad_norm_` (torch's refuses DTensor experts
    beside plain parameters); save with this module's `save_state` / `load_state`."""
    check_launch(accelerator)
    if ep_size is not None and not is_expert_parallel(model):
        _parallel_experts(accelerator, model, objects, ep_size)
    keep_stats_local(model)
    if _fsdp2_casts_params(accelerator):
        plugin = accelerator.state.fsdp_plugin
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None and accelerator.parallelism_config is not None:
            mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        shard_routers(model, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)
    control = routing_control(model)
    prepared = accelerator.prepare(model, *objects)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        # accelerate's AcceleratedOptimizer skips the inner step while gradients accumulate.
        inner = getattr(obj, "optimizer", None)
        if isinstance(obj, torch.optim.Optimizer) and isinstance(inner, torch.optim.Optimizer):
            control.hook(inner)
    return prepared


class MoeifyCheckpoint:
    """moeify's non-parameter state, for `accelerator.register_for_checkpointing`: the conversion
    recipes (checked on load, so a checkpoint is not loaded into a differently converted model), the
    routing control's state (`moeify.set_routing`: live settings, schedules, steps counted; the
    expert biases are buffers, saved with the model), and a monitor runner's state (`MonitorRunner.state_dict`: step counter, events, and each monitor's
    streaks, windows and references), so a resumed run raises no event twice and ends with the
    summary of an uninterrupted one. Primitives only: accelerate unpickles custom state with
    `weights_only=False`.

    Not saved: the routing-statistic buffers. They hold one observation window and are reset by
    `runner.step()`; save at a window boundary (every step with `every_n_steps=1`). Nor the
    runner's `history`: its records are already in the sinks. Checkpoints written before the
    monitors' state was saved (steps and events only) still load; their monitors restart."""

    def __init__(self, model: nn.Module, runner: Any = None) -> None:
        self.model, self.runner = model, runner

    def _recipes(self) -> str:
        return json.dumps(conversion_recipes(self.model, "moeify.integrations.accelerate"), sort_keys=True)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"format": STATE_FORMAT, "recipes": self._recipes()}
        routing = getattr(self.model.moeify_state, "routing", None)
        if routing is not None:
            state["routing_state"] = json.dumps(routing.state_dict())
        if self.runner is not None:
            runner_state = self.runner.state_dict()
            # Events may carry a custom monitor's non-JSON extras (kept as strings); monitor states
            # must be JSON (`Monitor.state_dict`), so a violation fails at the save, not at the resume.
            events = json.dumps(runner_state["events"], default=str)
            state["monitor_state"] = json.dumps({**runner_state, "events": json.loads(events)})
            # Steps and events on their own as well, so that an older moeify still reads the checkpoint.
            state["monitor_steps"] = runner_state["steps"]
            state["monitor_events"] = events
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a moeify checkpoint state (format {STATE_FORMAT}): {type(state).__name__}")
        if state["recipes"] != self._recipes():
            raise ValueError(
                "this checkpoint was written for a model converted with other moeify recipes:\n"
                f"  checkpoint: {state['recipes']}\n  this model: {self._recipes()}\n"
                "convert the model with the checkpoint's recipe before accelerator.load_state"
            )
        if "routing_state" in state:
            routing_control(self.model).load_state_dict(json.loads(state["routing_state"]))
        if self.runner is not None and "monitor_state" in state:
            self.runner.load_state_dict(json.loads(state["monitor_state"]))
        elif self.runner is not None and "monitor_steps" in state:  # written before monitor_state existed
            self.runner.steps = state["monitor_steps"]
            self.runner.events[:] = json.loads(state["monitor_events"])


def register_state(accelerator: accelerate.Accelerator, model: nn.Module, runner: Any = None) -> MoeifyCheckpoint:
    """Make `accelerator.save_state` / `load_state` carry moeify's state (`MoeifyCheckpoint`).
    Call it in the same order relative to other `register_for_checkpointing` calls in the run that
    saves and in the run that loads (accelerate matches custom states by position)."""
    checkpoint = MoeifyCheckpoint(model, runner)
    accelerator.register_for_checkpointing(checkpoint)
    return checkpoint


# What `Accelerator.save_state` writes (accelerate.utils.constants, checkpointing.py, fsdp_utils.py):
# a stale one from an earlier save with more models or optimizers goes; anything else stays.
_ACCELERATE_FILE = re.compile(
    r"(model|pytorch_model|optimizer|scheduler|sampler|dl_state_dict|pytorch_model_fsdp)(_\d+)?"
    r"(-\d+-of-\d+)?(\.safetensors|\.bin)?(\.index\.json)?"
    r"|(random_states|custom_checkpoint)_\d+\.pkl|scaler\.pt"
)


def _written_by_accelerate(name: str) -> bool:
    return _ACCELERATE_FILE.fullmatch(name) is not None


def _written_by_save_state(name: str) -> bool:
    return _written_by_accelerate(name) or re.fullmatch(rf"{SHARDED}_\d+", name) is not None


SHARDED = "moeify_sharded"  # + _<i>: model i (and optimizer i) of an expert-parallel DDP run, DCP


@contextlib.contextmanager
def _sharded_by_moeify(accelerator: accelerate.Accelerator) -> Iterator[list[tuple[nn.Module, Any]]]:
    """Under DDP with expert-parallel models, accelerate would write the weights with safetensors
    (which refuses DTensors) and pickle the optimizer state of the main process only (its own
    shard of every expert). Those models and optimizers are then hidden from accelerate for the
    call, and saved / loaded by moeify with torch.distributed.checkpoint instead (each rank its
    shards); everything else (RNG, schedulers, samplers, custom states) stays accelerate's.
    Under FSDP2 accelerate's own sharded state dict already goes through DCP: nothing to do."""
    models, optimizers = accelerator._models, accelerator._optimizers
    if accelerator.distributed_type == DistributedType.FSDP or not any(is_expert_parallel(m) for m in models):
        yield []
        return
    if len(optimizers) > len(models):
        raise ValueError(
            f"moeify: {len(optimizers)} optimizers for {len(models)} models; expert-parallel checkpoints pair "
            "optimizer i with model i (accelerate's order of prepare)"
        )
    pairs = [(model, getattr(opt, "optimizer", opt)) for model, opt in zip(models, optimizers + [None] * len(models))]
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield pairs
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def save_state(accelerator: accelerate.Accelerator, output_dir: str | os.PathLike) -> Path:
    """`accelerator.save_state(output_dir)`, crash-safe (moeify.atomic): every process writes into
    one staging directory beside `output_dir`; once all are done, the main process swaps it in
    whole. A save that fails or is killed leaves the checkpoint that was at `output_dir` for
    `load_state`; files there that accelerate does not write are kept. Call it on every process,
    as `save_state` itself. Expert-parallel models under DDP are saved sharded (`_sharded_by_moeify`)."""
    from moeify.distributed import save_sharded

    target = as_directory(output_dir, "moeify.integrations.accelerate.save_state")
    with staged_for_ranks(
        target,
        is_main=accelerator.is_main_process,
        barrier=accelerator.wait_for_everyone,
        tag="accelerate",
        owned=_written_by_save_state,
    ) as staging:
        with _sharded_by_moeify(accelerator) as pairs:
            accelerator.save_state(str(staging))
        for i, (model, optimizer) in enumerate(pairs):
            save_sharded(staging / f"{SHARDED}_{i}", model, optimizer)
    return target


def load_state(accelerator: accelerate.Accelerator, input_dir: str | os.PathLike, **load_kwargs: Any) -> None:
    """`accelerator.load_state(input_dir, **load_kwargs)` for what `save_state` wrote, expert-parallel
    models included (loaded with `moeify.distributed.load_sharded`, whatever their ep_size was)."""
    from moeify.distributed import load_sharded

    source = as_directory(input_dir, "moeify.integrations.accelerate.load_state")
    with _sharded_by_moeify(accelerator) as pairs:
        accelerator.load_state(str(source), **load_kwargs)
    for i, (model, optimizer) in enumerate(pairs):
        load_sharded(source / f"{SHARDED}_{i}", model, optimizer)


__all__ = [
    "MoeifyCheckpoint",
    "check_launch",
    "expert_parallel",
    "fsdp2_plugin",
    "keep_stats_local",
    "load_state",
    "prepare",
    "register_state",
    "save_state",
    "shard_routers",
]
