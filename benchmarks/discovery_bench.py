"""How long FFN discovery takes on a real-sized model: `find_ffns` on 30-layer models of
SmolLM2-135M's shape (random weights from configs, no download), through the registry (llama) and
through dataflow tracing (olmo, stablelm: classes no registry entry knows), on real weights and on
the meta device (how `moeify.from_pretrained` rebuilds a model). Each time is also given as a
ratio to one forward of the same model on 8 tokens, measured in the same process.

    python benchmarks/discovery_bench.py [--output benchmarks/discovery_results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cpu_description

HERE = Path(__file__).resolve().parent
SMOLLM2 = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}
MODEL_TYPES = {"llama": "registry", "olmo": "dataflow", "stablelm": "dataflow"}


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(model_type: str, repeats: int) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import moeify

    config = AutoConfig.for_model(model_type, **SMOLLM2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward = best_of(repeats, lambda: model(input_ids=ids))
    report = moeify.find_ffns(model)
    find = best_of(repeats, lambda: moeify.find_ffns(model))
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    meta_sites = len(moeify.find_ffns(meta).sites)
    find_meta = best_of(repeats, lambda: moeify.find_ffns(meta))
    return {
        "model_type": model_type,
        "path": sorted({s.source for s in report.sites}),
        "sites": len(report.sites),
        "sites_on_meta": meta_sites,
        "find_seconds": round(find, 4),
        "find_meta_seconds": round(find_meta, 4),
        "forward_8_tokens_seconds": round(forward, 4),
        "find_over_forward": round(find / forward, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=HERE / "discovery_results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(model_type, args.repeats) for model_type in MODEL_TYPES]
    for row in rows:
        print(
            f"{row['model_type']:>9} ({'/'.join(row['path'])}): {row['sites']} sites, find_ffns {row['find_seconds']:.3f} s "
            f"({row['find_over_forward']:.2f}x one 8-token forward), on meta {row['find_meta_seconds']:.3f} s"
        )
    meta = {"cpu": cpu_description(), "threads": args.threads, "torch": torch.__version__, "shape": SMOLLM2}
    args.output.write_text(json.dumps({"machine": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
