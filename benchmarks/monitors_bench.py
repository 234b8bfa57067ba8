"""Monitor overhead: a whole training step of a converted small model with the default monitors
attached ÷ the same step without, in one process (issue 5's budget: <= 1.02).

Steps alternate between the two settings (ABBA order) on the same model and batch, so drift and
background load hit both; the ratio is the median of per-pair ratios. The monitors' cost is
their on-device accumulation in every forward plus one read (`runner.step()`) per optimizer step.

    python benchmarks/monitors_bench.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeify import aux_loss, moeify
from moeify.monitors import attach_monitors


def build(hidden: int, layers: int, experts: int):
    config = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=1000,
    )
    torch.manual_seed(0)
    return moeify(AutoModelForCausalLM.from_config(config), num_experts=experts, top_k=2)


def timed_step(model, optimizer, ids, runner) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss + aux_loss(model)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if runner is not None:
        runner.step()
    return time.perf_counter() - start


def measure(quick: bool) -> dict:
    torch.set_num_threads(2)
    hidden, layers, experts, batch, seq = (128, 2, 8, 4, 64) if quick else (256, 4, 8, 8, 256)
    pairs = 5 if quick else 15
    model = build(hidden, layers, experts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    runner = attach_monitors(model)  # the default monitors
    names = [m.name for m in runner.monitors]
    for _ in range(2):  # warm up both paths
        timed_step(model, optimizer, ids, runner)
    ratios, on, off = [], [], []
    runner_layers = [layer for _, layer in runner.layers]

    def step(monitored: bool) -> float:
        for layer in runner_layers:
            layer.collect_stats = monitored
        return timed_step(model, optimizer, ids, runner if monitored else None)

    for i in range(pairs):
        # ABBA: alternate which setting runs first, so order effects cancel.
        if i % 2:
            t_on, t_off = step(True), step(False)
        else:
            t_off, t_on = step(False), step(True)
        on.append(t_on)
        off.append(t_off)
        ratios.append(t_on / t_off)
    runner.close()
    return {
        "benchmark": "training step with default monitors / without",
        "monitors": names,
        "shape": {"hidden": hidden, "layers": layers, "experts": experts, "top_k": 2, "tokens": batch * seq},
        "pairs": pairs,
        "ratio_median": statistics.median(ratios),
        "ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2] if len(ratios) >= 4 else None,
        "step_ms_on": 1000 * statistics.median(on),
        "step_ms_off": 1000 * statistics.median(off),
        "target": 1.02,
        "met": statistics.median(ratios) <= 1.02,
        "loadavg": list(__import__("os").getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few pairs (smoke run)")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.quick)
    print(
        f"monitors on / off: {result['ratio_median']:.3f} (target <= {result['target']}; "
        f"{result['step_ms_on']:.1f} ms vs {result['step_ms_off']:.1f} ms per step, "
        f"{result['shape']['tokens']} tokens, {len(result['monitors'])} monitors)"
    )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
