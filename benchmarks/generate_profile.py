"""Where a decode step's time goes, for generate_bench.py.

`breakdown`: forward hooks time each decoder layer's attention, its MoE block and the block's
parts (router, routed experts, shared experts) during the decode steps of one generate(), per step.
The hooks add their own time; the parts are for reading proportions, the ratios come from
generate_bench's unhooked runs.

`replay`: the MoE blocks of one decode step, replayed on the inputs they got (captured from the
moeify model at its third decode step): moeify's layers, the native blocks on the same inputs, and
the limit, which reads each hit expert's weights once — for each expert the routing hit, the dense
SwiGLU FFN (gate, up, down) on that expert's tokens, gathered beforehand, plus the shared expert on
every token — as the layer benchmark's decode row does for one layer.

Shape legend: T tokens, D model dim, I expert intermediate dim, E experts.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The parts of a MoE block, by attribute: moeify's MoeLayer and transformers' Qwen2MoeSparseMoeBlock.
PARTS = {
    "moeify": {"router": ("router",), "routed experts": ("experts",), "shared experts": ("shared_experts",)},
    "native": {
        "router": ("gate",),
        "routed experts": ("experts",),
        "shared experts": ("shared_expert", "shared_expert_gate"),
    },
}
CAPTURE_STEP = 3  # the decode step whose MoE inputs are replayed (the first ones warm caches)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


class _Timer:
    """Pre/post forward hooks adding each module's time to `seconds[part]` while `active`."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.active, self.seconds, self.started = sync, False, defaultdict(float), {}

    def attach(self, module: nn.Module, part: str) -> list:
        def before(mod: nn.Module, args: tuple) -> None:
            self.sync()
            self.started[id(mod)] = time.perf_counter()

        def after(mod: nn.Module, args: tuple, out: object) -> None:
            if self.active:
                self.sync()
                self.seconds[part] += time.perf_counter() - self.started[id(mod)]

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def breakdown(model: nn.Module, kind: str, run: Callable, clock_type: type) -> dict[str, float]:
    """ms per decode step: attention, the MoE block and its parts, and the rest (embeddings, norms,
    LM head, sampling, generate's own loop). `run(clock)` runs one generate() with that clock."""
    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else (lambda: None)
    timer, handles = _Timer(sync), []
    for layer in _decoder_layers(model):
        handles += timer.attach(layer.self_attn, "attention")
        handles += timer.attach(layer.mlp, "moe block")
        for part, names in PARTS[kind].items():
            for name in names:
                handles += timer.attach(getattr(layer.mlp, name), part)
    clock = clock_type(sync=sync is torch.cuda.synchronize)
    clock.on_first = lambda: setattr(timer, "active", True)  # decode steps only
    try:
        run(clock)
    finally:
        for handle in handles:
            handle.remove()
    steps = max(len(clock.stamps) - 1, 1)
    per_step = {part: 1e3 * s / steps for part, s in timer.seconds.items()}
    total = 1e3 * clock.per_decode_step()
    per_step["moe block: the rest"] = per_step["moe block"] - sum(per_step.get(p, 0.0) for p in PARTS[kind])
    per_step["outside attention and moe"] = total - per_step["attention"] - per_step["moe block"]
    per_step["decode step (hooked)"] = total
    return {part: round(ms, 3) for part, ms in per_step.items()}


def capture(model: nn.Module, run: Callable, clock_type: type) -> list[Tensor]:
    """Each MoE block's input at decode step CAPTURE_STEP of one generate() (cloned)."""
    inputs: list[Tensor] = []
    clock = clock_type(sync=False)

    def keep(mod: nn.Module, args: tuple) -> None:
        if len(clock.stamps) == CAPTURE_STEP:
            inputs.append(args[0].detach().clone())

    handles = [layer.mlp.register_forward_pre_hook(keep) for layer in _decoder_layers(model)]
    try:
        run(clock)
    finally:
        for handle in handles:
            handle.remove()
    if not inputs:
        raise ValueError(
            f"the profile replays decode step {CAPTURE_STEP}: generate at least {CAPTURE_STEP + 1} new tokens"
        )
    return inputs


class _Limit:
    """For one MoE layer and its captured input: each hit expert's dense FFN on its tokens (views
    of the layer's own expert weights: the same bytes from the same pages), and the shared expert."""

    def __init__(self, layer: nn.Module, x: Tensor) -> None:
        x_TD = x.reshape(-1, x.shape[-1])
        with torch.inference_mode():
            expert_idx_TK = layer.route(x_TD, x.shape[:-1])[3]
        experts = layer.experts
        self.work = [
            (x_TD[(expert_idx_TK == e).any(-1)], experts.w_in[e], experts.w_out[e])
            for e in range(layer.num_experts)
            if (expert_idx_TK == e).any()
        ]
        shared = layer.shared_experts
        self.work += [(x_TD, shared.w_in[s], shared.w_out[s]) for s in range(shared.num_experts)] if shared else []
        self.hit = len(self.work)

    def __call__(self) -> None:
        for x_nD, w_in_HD, w_out_DI in self.work:
            gate_ID, up_ID = w_in_HD.chunk(2)
            F.linear(F.silu(F.linear(x_nD, gate_ID)) * F.linear(x_nD, up_ID), w_out_DI)


def replay(ours: nn.Module, theirs: nn.Module, inputs: list[Tensor], repeats: int) -> dict:
    """ms of one decode step's MoE blocks: moeify's, the native ones, the limit; medians over
    `repeats` rounds in rotating order."""
    ours_mlp = [layer.mlp for layer in _decoder_layers(ours)]
    theirs_mlp = [layer.mlp for layer in _decoder_layers(theirs)]
    limits = [_Limit(layer, x) for layer, x in zip(ours_mlp, inputs)]
    sync = torch.cuda.synchronize if inputs[0].device.type == "cuda" else (lambda: None)
    contenders = {
        "moeify": lambda: [mlp(x) for mlp, x in zip(ours_mlp, inputs)],
        "native": lambda: [mlp(x) for mlp, x in zip(theirs_mlp, inputs)],
        "limit": lambda: [limit() for limit in limits],
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    with torch.inference_mode():
        for r in range(repeats + 2):  # two warm-up rounds
            for name in names[r % 3 :] + names[: r % 3]:
                sync()
                start = time.perf_counter()
                contenders[name]()
                sync()
                if r >= 2:
                    seconds[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(values) for name, values in seconds.items()}
    ratios = {
        "moeify ÷ limit": statistics.median(a / b for a, b in zip(seconds["moeify"], seconds["limit"])),
        "moeify ÷ native": statistics.median(a / b for a, b in zip(seconds["moeify"], seconds["native"])),
    }
    hit = statistics.mean(limit.hit for limit in limits)
    return {"ms": ms, "ratios": ratios, "experts_read_per_layer": hit, "tokens": inputs[0].shape[:-1].numel()}
