"""Fine-grained experts: each routed expert is a 1/G slice of the dense FFN (Qwen1.5-MoE style).

    python examples/recipe_fine_grained.py             # a tiny Llama built from a config (seconds)
    python examples/recipe_fine_grained.py --steps 2   # the smoke test's quick run

`moeify(model, granularity=4, num_experts=8, top_k=4)` cuts each of 2 copies of every FFN into 4
experts along its intermediate dimension (the same rows of gate and up, the matching columns of
down, scaled by 4). The router starts in virtual groups: the 4 slices of a copy share one router
row, so a token's top-4 are the 4 slices of one copy and the converted model equals the dense one
(checked here on example inputs). Training then unties the slices. A token runs through 4 slices,
one FFN's worth of parameters, as in the dense model.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify.convert import parameter_counts
from moeify.surgery.compare import relative_error


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--granularity", type=int, default=4)
    p.add_argument("--copies", type=int, default=2, help="copies of each FFN (num_experts = copies x granularity)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
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
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    dense_params = sum(p.numel() for p in model.parameters())

    g = args.granularity
    moeify.moeify(
        model,
        granularity=g,
        num_experts=args.copies * g,
        top_k=g,
        num_shared_experts=0,
        example_inputs={"input_ids": ids},  # the whole model is checked against the dense one
    )
    experts = model.model.layers[0].mlp.experts
    print(f"layer 0: {experts.num_experts} experts of width {experts.w_out.shape[-1]} (the FFN's: 128), top-{g}")
    with torch.no_grad():
        error = relative_error(model(input_ids=ids).logits, dense_logits)
    print(f"identity at conversion: max |moe - dense| = {error:.3g} of the logit scale")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss  # the router losses are added to it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"trained {args.steps} steps on CPU: loss {loss.item():.3f}")
    rows = model.model.layers[0].mlp.router.gate.weight.detach().unflatten(0, (args.copies, g))
    untied = int((rows != rows[:, :1]).any(-1).sum())
    print(f"router rows no longer tied to their group's first: {untied} of {args.copies * (g - 1)}")

    counts = parameter_counts(model)
    print(
        f"parameters: dense {dense_params:,}, MoE total {counts['total']:,}, "
        f"active per token {counts['active_per_token']:,} (dense as counted by moeify: {counts['dense']:,})"
    )


if __name__ == "__main__":
    main()
