"""One rank of the distributed benchmark (launched by benchmarks/distributed.py through
`torchrun --standalone --nproc_per_node 2`): the same converted Llama trained three ways in the
same gloo processes, a full step each (zero_grad, forward, backward, AdamW), interleaved per round.

- replicated: `moeify.distributed.data_parallel(model)`, plain DDP; every rank holds every expert.
- fsdp2: `fully_shard` on every MoE layer, then on the root, over the 1-D mesh of all ranks (fp32).
- expert_parallel: `moeify.distributed.apply_expert_parallel(model, mesh)` + `data_parallel`.

Every model starts from the same seeded weights and each rank trains on its own fixed batch, so
the three compute the same first step; that is asserted before any timing. After the timed
rounds, a few steps with a barrier between phases time forward, backward and the optimizer step
apart, and expert parallelism's exchange within its forward. Rank 0 writes the measurements as
JSON to `--output`.

Shape legend: B sequences per rank, S tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # timing.py
sys.path.insert(0, str(HERE.parent))  # moeify, whatever the cwd
from models import perturb_experts  # noqa: E402
from timing import Timings, interleaved  # noqa: E402

import moeify  # noqa: E402
import moeify.distributed as md  # noqa: E402

# Experts dominate the parameters (full: 25.2M of 26.5M, 95%), as in the MoE models expert
# parallelism is for; 4 x 128 tokens per rank. Quick: the smoke run's tiny sizes.
SPECS = {
    "full": {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "kv_heads": 2, "vocab": 1024,
             "experts": 8, "top_k": 2, "batch": 4, "seq": 128, "rounds": 12, "phase_steps": 5},
    "quick": {"hidden": 64, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 256,
              "experts": 8, "top_k": 2, "batch": 2, "seq": 32, "rounds": 2, "phase_steps": 1},
}  # fmt: skip
MODES = ("replicated", "fsdp2", "expert_parallel")
# Relative agreement of the three modes' first-step losses (fp32). The expert products run on
# other row counts per rank under expert parallelism (each rank serves every rank's tokens for
# its experts), so their sums may differ in the last bits (fp32 eps 1.2e-7), nothing more.
LOSS_RTOL = 1e-5
LR = 1e-4


def build(spec: dict) -> nn.Module:
    """The converted model, identical on every rank and for every mode (seeded). The routed
    experts get independent noise: clones of one FFN would make the logits independent of the
    routing, and the first-step check could not tell a misrouted token."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        vocab_size=spec["vocab"], tie_word_embeddings=False,
    )  # fmt: skip
    model = moeify.moeify(
        AutoModelForCausalLM.from_config(config), num_experts=spec["experts"], top_k=spec["top_k"],
        num_shared_experts=0, seed=0,
    )  # fmt: skip
    perturb_experts(model)
    return model.train()


def wrap(mode: str, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """The model as `mode` trains it (the wrapper whose forward runs the step)."""
    if mode == "replicated":
        return md.data_parallel(model)
    if mode == "fsdp2":
        # fp32 end to end: no MixedPrecisionPolicy, so the routers need no units of their own.
        for _, layer in moeify.moe_layers(model):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if mode == "expert_parallel":
        md.apply_expert_parallel(model, mesh)
        return md.data_parallel(model)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


class Trainer:
    """One mode's model, optimizer and batch; `step()` is the timed work."""

    def __init__(self, mode: str, spec: dict, mesh: DeviceMesh, ids_BS: Tensor) -> None:
        self.model = build(spec)
        self.wrapped = wrap(mode, self.model, mesh)
        # After wrapping: expert parallelism and FSDP2 replace the parameters with DTensors.
        self.optimizer = torch.optim.AdamW(self.wrapped.parameters(), lr=LR)
        self.ids_BS = ids_BS

    def forward(self) -> tuple[Tensor, Tensor]:
        """(task loss, router losses) on this rank's batch."""
        logits_BSV = self.wrapped(input_ids=self.ids_BS).logits
        task = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1), self.ids_BS[:, 1:].flatten())
        return task, moeify.aux_loss(self.model)  # not in the output: no labels were given

    def step(self) -> tuple[Tensor, Tensor]:
        """zero_grad, forward, backward, AdamW step; (task loss, router losses), detached. The
        gradients stay until the next step (the memory count reads them)."""
        self.optimizer.zero_grad(set_to_none=True)
        task, aux = self.forward()
        (task + aux).backward()
        self.optimizer.step()
        return task.detach(), aux.detach()

    def phased_step(self) -> list[float]:
        """`step()` with a barrier after each phase: clock readings before forward (+ losses),
        backward and the optimizer step, and after it; each phase's time is the slower rank's."""
        self.optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        stamps = [time.perf_counter()]
        task, aux = self.forward()
        dist.barrier()
        stamps.append(time.perf_counter())
        (task + aux).backward()
        dist.barrier()
        stamps.append(time.perf_counter())
        self.optimizer.step()
        dist.barrier()
        return [*stamps, time.perf_counter()]


class ExchangeClock:
    """Stands in for a layer's TokenExchange during the phase pass: the seconds spent in its
    forward calls less the local experts' product it runs, i.e. the counts all-to-all, its host
    read, the permutations and the tokens' two all-to-alls (the backward's are not separable)."""

    def __init__(self, exchange: md.TokenExchange) -> None:
        self.exchange, self.seconds = exchange, 0.0

    def __getattr__(self, name: str) -> object:  # batch_group, local: the exchange's own
        return getattr(self.exchange, name)

    def __call__(self, x_AD: Tensor, counts_E: Tensor, run: Callable[..., Tensor]) -> Tensor:
        inside = 0.0

        def timed_run(*args: Tensor) -> Tensor:
            nonlocal inside
            start = time.perf_counter()
            y = run(*args)
            inside += time.perf_counter() - start
            return y

        start = time.perf_counter()
        y_AD = self.exchange(x_AD, counts_E, timed_run)
        self.seconds += time.perf_counter() - start - inside
        return y_AD


def stored_bytes(tensor: Tensor | None) -> int:
    """Bytes this rank holds of a tensor: a DTensor's local shard, a plain tensor whole."""
    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def memory(trainer: Trainer) -> dict[str, int]:
    """This rank's bytes after a step (gradients and AdamW moments present), counted tensor by
    tensor. Transient memory (FSDP2's all-gathered layers, DDP's gradient buckets, the exchange's
    buffers, activations) is not in it."""
    model, state = trainer.model, trainer.optimizer.state
    expert_ids = {id(p) for _, layer in moeify.moe_layers(model) for p in layer.experts.parameters()}

    def counts(params: list[nn.Parameter]) -> tuple[int, int, int]:
        weights = sum(stored_bytes(p) for p in params)
        grads = sum(stored_bytes(p.grad) for p in params)
        moments = sum(stored_bytes(t) for p in params for t in state.get(p, {}).values() if isinstance(t, Tensor))
        return weights, grads, moments

    params = list(model.parameters())
    experts = [p for p in params if id(p) in expert_ids]
    expert_w, expert_g, expert_s = counts(experts)
    all_w, all_g, all_s = counts(params)
    local, _ = md.local_expert_bytes(model)  # moeify's own count of the stored expert bytes
    if local != expert_w:
        raise AssertionError(f"moeify.distributed.local_expert_bytes says {local} bytes, the tensors hold {expert_w}")
    return {
        "expert_param_bytes": expert_w,
        "expert_param_bytes_full": sum(p.numel() * p.element_size() for p in experts),
        "expert_grad_bytes": expert_g,
        "expert_adamw_bytes": expert_s,
        "expert_state_bytes": expert_w + expert_g + expert_s,
        "model_param_bytes": all_w,
        "model_param_bytes_full": sum(p.numel() * p.element_size() for p in params),
        "model_state_bytes": all_w + all_g + all_s,
    }


def gather(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_losses(first: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The largest relative difference to replicated over the ranks, per mode and loss, after
    checking that the modes train the same objective on every rank: the task loss in all three,
    the total (task + router losses) in FSDP2. Expert parallelism's total is not the same by
    design: its balance loss pools every rank's routing into one global batch (a count
    all-reduce in moeify.layers.losses.balance_loss), DDP's and FSDP2's take each rank's batch
    alone; its difference is reported, not asserted. Raised on every rank alike (all hold the
    gathered losses), so no rank waits on a collective the others left."""
    asserted = {"fsdp2": ("task", "total"), "expert_parallel": ("task",)}
    differences = {}
    for mode in MODES[1:]:
        worst = {"task": 0.0, "aux": 0.0, "total": 0.0}
        for rank, (got, want) in enumerate(zip(first[mode], first["replicated"])):
            for key in worst:
                error = abs(got[key] - want[key]) / abs(want[key])
                worst[key] = max(worst[key], error)
                if key in asserted[mode] and error > LOSS_RTOL:
                    raise AssertionError(
                        f"rank {rank}: {mode}'s first-step {key} loss {got[key]!r} differs from replicated's "
                        f"{want[key]!r} by {error:.2e} (relative; allowed {LOSS_RTOL:.0e})"
                    )
        differences[mode] = worst
    return differences


def timed(trainers: dict[str, Trainer], rounds: int) -> Timings:
    """Interleaved, rotating rounds (benchmarks/timing.py); a barrier ends every step, so each
    rank's time is the slowest rank's step; the per-round maximum over ranks is kept."""
    steps: dict[str, Callable[[], object]] = {mode: trainer.step for mode, trainer in trainers.items()}
    local = interleaved(steps, repeats=rounds, warmup=1, sync=dist.barrier)
    per_rank = gather(local.seconds)
    return Timings({mode: [max(rank[mode][r] for rank in per_rank) for r in range(rounds)] for mode in trainers})


def phases(trainers: dict[str, Trainer], steps: int) -> dict[str, dict[str, float]]:
    """Median ms per phase and mode over `steps` phased steps (modes in turn), after the timed
    rounds: the barriers between phases add their latency, so these explain the step times
    rather than add up to them. Expert parallelism's also hold its exchange's forward time."""
    experts = [layer.experts for _, layer in moeify.moe_layers(trainers["expert_parallel"].model)]
    clocks = [ExchangeClock(e.exchange) for e in experts]
    for e, clock in zip(experts, clocks):
        e.exchange = clock
    names = ("forward", "backward", "optimizer")
    seconds: dict[str, dict[str, list[float]]] = {mode: {} for mode in trainers}
    for _ in range(steps):
        for mode, trainer in trainers.items():
            for clock in clocks:
                clock.seconds = 0.0
            stamps = trainer.phased_step()
            spans = {name: b - a for name, a, b in zip(names, stamps, stamps[1:])}
            if mode == "expert_parallel":
                spans["exchange_forward"] = sum(clock.seconds for clock in clocks)
            for name, value in spans.items():
                seconds[mode].setdefault(name, []).append(value)
    for e, clock in zip(experts, clocks):
        e.exchange = clock.exchange
    per_rank = gather(seconds)  # the slower rank's, step by step
    return {
        mode: {
            f"{name}_ms": 1e3 * statistics.median(max(rank[mode][name][i] for rank in per_rank) for i in range(steps))
            for name in seconds[mode]
        }
        for mode in trainers
    }


def summarize(timings: Timings) -> dict[str, dict]:
    out = {}
    for mode in MODES:
        q1, median, q3 = timings.ratio(mode, "replicated")
        out[mode] = {
            "step_ms_median": timings.median_ms(mode),
            "ratio_to_replicated": {"median": median, "q1": q1, "q3": q3},
            "min_ratio_to_replicated": timings.min_ratio(mode, "replicated"),
            "seconds": timings.seconds[mode],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=sorted(SPECS), default="full")
    parser.add_argument("--rounds", type=int, help="timed rounds (default: the spec's)")
    parser.add_argument("--output", type=Path, required=True, help="rank 0 writes the measurements here (JSON)")
    args = parser.parse_args()
    spec = dict(SPECS[args.spec], **({"rounds": args.rounds} if args.rounds else {}))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids_BS = torch.randint(
        0, spec["vocab"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1000 + rank)
    )
    trainers = {mode: Trainer(mode, spec, mesh, ids_BS) for mode in MODES}
    first, mem = {}, {}
    for mode, trainer in trainers.items():
        task, aux = trainer.step()
        first[mode] = gather({"task": task.item(), "aux": aux.item(), "total": (task + aux).item()})
        mem[mode] = gather(memory(trainer))
    agreement = check_losses(first)
    timings = timed(trainers, spec["rounds"])
    phase_ms = phases(trainers, spec["phase_steps"])
    if rank == 0:
        params = mem["replicated"][0]
        result = {
            "spec": spec,
            "world_size": world,
            "threads_per_rank": torch.get_num_threads(),
            "tokens_per_rank": spec["batch"] * spec["seq"],
            "expert_share_of_params": params["expert_param_bytes_full"] / params["model_param_bytes_full"],
            "first_step": {"losses": first, "rtol": LOSS_RTOL, "max_relative_difference": agreement},
            "modes": {
                mode: {**row, "phases": phase_ms[mode], "memory_per_rank": mem[mode]}
                for mode, row in summarize(timings).items()
            },
        }
        args.output.write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
