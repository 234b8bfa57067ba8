"""Conversion speed and memory.

Time: `moeify(model)` ÷ the floor, a plain `torch.empty(...).copy_()` of the same bytes as the
expert weights conversion creates (fresh memory, so both pay the same first-touch page faults).
Memory: the model's peak memory during conversion ÷ the final model size, measured in a fresh
child process per case (VmHWM of /proc/self/status, reset after the dense model is built;
tracemalloc does not see torch's allocations).

Run as a script with `--child JSON` it is that child: one conversion, one JSON line on stdout.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
from models import GeluMLP
from results import Row, ratio_rows
from timing import interleaved_with_setup
from torch import nn

from moeify import moeify

NUM_EXPERTS, TOP_K = 8, 2


class DitBlock(nn.Module):
    """The part of a DiT block conversion touches: a norm and the MLP."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = GeluMLP(hidden, intermediate)


def build(shape: str, layers: int) -> nn.Module:
    """A dense model: a real transformers Llama (registry path) or a DiT-like stack (probe path)."""
    torch.manual_seed(0)
    if shape == "llm":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=256,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
        return LlamaForCausalLM(config).eval()
    if shape == "dit":
        model = nn.Module()
        model.blocks = nn.ModuleList(DitBlock(1152, 4608) for _ in range(layers))
        return model.eval()
    raise ValueError(f"unknown shape {shape!r}")


def ffn_weights(model: nn.Module) -> list[torch.Tensor]:
    """The dense FFN parameters conversion clones E times."""
    return [p for name, p in model.named_parameters() if ".mlp." in name]


def convert(model: nn.Module, verify: bool) -> nn.Module:
    return moeify(model, num_experts=NUM_EXPERTS, top_k=TOP_K, num_shared_experts=0, verify=verify)


def memcpy(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The floor: fresh [E, ...] memory filled with E copies of each FFN parameter."""
    return [
        torch.empty(NUM_EXPERTS, *w.shape, dtype=w.dtype).copy_(w.detach().expand(NUM_EXPERTS, *w.shape))
        for w in weights
    ]


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def time_rows(shape: str, layers: int, repeats: int, warmup: int) -> list[Row]:
    cases = {
        "moeify verify=False": (lambda: build(shape, layers), lambda m: convert(m, verify=False)),
        "moeify (default, verify=True)": (lambda: build(shape, layers), lambda m: convert(m, verify=True)),
        "memcpy of expert bytes": (lambda: ffn_weights(build(shape, layers)), memcpy),
    }
    timings = interleaved_with_setup(cases, repeats=repeats, warmup=warmup)
    rows = []
    for candidate in ("moeify verify=False", "moeify (default, verify=True)"):
        rows += ratio_rows(
            timings,
            section="conversion",
            shape=shape,
            mode="time",
            candidate=candidate,
            baselines=["memcpy of expert bytes"],
            note=f"{layers} FFN layers, E={NUM_EXPERTS}",
        )
    return rows


# --- peak memory, one child process per case ---------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    torch.set_num_threads(2)
    gc.collect()
    rss_start = _status_kb("VmRSS")
    model = build(spec["shape"], spec["layers"])
    gc.collect()
    rss_dense, dense_bytes = _status_kb("VmRSS"), storage_bytes(model)
    reset = _reset_peak()
    convert(model, verify=spec["verify"])
    gc.collect()
    peak, rss_final, final_bytes = _status_kb("VmHWM"), _status_kb("VmRSS"), storage_bytes(model)
    mb = 1 / 1024
    return {
        **spec,
        "peak_reset": reset,
        "dense_model_mb": dense_bytes / 2**20,
        "final_model_mb": final_bytes / 2**20,
        "rss_dense_mb": (rss_dense - rss_start) * mb,
        "rss_peak_mb": (peak - rss_start) * mb,
        "rss_final_mb": (rss_final - rss_start) * mb,
        "transient_mb": (peak - rss_final) * mb,
    }


def memory_rows(shape: str, layers: int) -> tuple[list[Row], list[dict]]:
    rows, details = [], []
    for verify in (False, True):
        spec = {"shape": shape, "layers": layers, "verify": verify}
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        details.append(result)
        # The model's bytes at the worst moment: what it held before, plus what conversion added
        # to the resident set at its peak. (Building the dense model leaves non-model memory in the
        # process, e.g. init temporaries glibc keeps; counting from before conversion excludes it.)
        peak_model_mb = result["dense_model_mb"] + result["rss_peak_mb"] - result["rss_dense_mb"]
        result["peak_model_mb"] = peak_model_mb
        ratio = peak_model_mb / result["final_model_mb"]
        rows.append(
            Row(
                "conversion",
                shape,
                "peak memory",
                f"peak model memory, verify={verify}",
                "final model size",
                ratio,
                ratio,
                ratio,
                note=(
                    f"{layers} layers: dense {result['dense_model_mb']:.0f} MB -> final {result['final_model_mb']:.0f} MB, "
                    f"peak {peak_model_mb:.0f} MB; the resident set peaked {result['transient_mb']:.0f} MB above its final size"
                ),
            )
        )
    return rows, details


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        sys.exit("conversion_bench.py is run by benchmarks/run.py (or as its --child)")
