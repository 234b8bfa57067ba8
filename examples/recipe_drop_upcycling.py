"""Drop-Upcycling: every routed expert starts as the dense FFN with a fraction of its neurons re-initialised.

    python examples/recipe_drop_upcycling.py                # a tiny Llama built from a config (seconds)
    python examples/recipe_drop_upcycling.py --fraction 0.5

`moeify(model, reinit_fraction=r)` re-initialises a different random r-fraction of each routed
expert's intermediate neurons (their gate/up rows and down column) from the normal with the mean
and standard deviation of the matrix they belong to, seeded by the recipe's seed and the layer, so
the experts differ from step one. The converted model no longer equals the dense one: moeify
reports by how much (`model.moeify_state.deviation`) instead of failing its identity check.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeify


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.5, help="share of each expert's neurons re-initialised")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gate_dense = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    moeify.moeify(
        model,
        reinit_fraction=args.fraction,
        num_experts=args.num_experts,
        top_k=2,
        seed=args.seed,
        example_inputs={"input_ids": ids},
    )
    experts = model.model.layers[0].mlp.experts
    changed = [int((experts.w_in[e, :128] != gate_dense).any(1).sum()) for e in range(experts.num_experts)]
    print(f"layer 0: neurons re-initialised per expert: {changed} of 128")
    deviation = model.moeify_state.deviation
    for name, value in deviation["layers"].items():
        print(f"  {name}: max |moe - dense FFN| = {value:.3g} of scale")
    print(f"whole model vs dense: {deviation['model']:.3g} of scale")


if __name__ == "__main__":
    main()
