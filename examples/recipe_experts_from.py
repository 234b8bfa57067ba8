"""Branch-Train-MiX: routed experts from several checkpoints of one architecture, then save and reload.

    python examples/recipe_experts_from.py                  # three tiny Llamas built from a config (seconds)
    python examples/recipe_experts_from.py --rest average   # the rest of the model averaged over the sources
    python examples/recipe_experts_from.py --out DIR        # keep the saved checkpoint

`moeify(base, experts_from=[a, b, c])` makes routed expert i of every FFN a bit-for-bit copy of
source i % 3's FFN. The result is not the base model any more, so instead of failing the identity
check moeify measures how far it is from the base and from every source (on `example_inputs`) and
keeps the numbers in `model.moeify_state.deviation` (and on the model card). The saved checkpoint
reloads without the sources: the experts' weights are in the file.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeify


def tiny_llama(seed: int, name: str) -> torch.nn.Module:
    """A stand-in for a checkpoint fine-tuned on one domain: the same architecture, other weights."""
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
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config._name_or_path = name  # the name the recipe and the card record
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rest", choices=("base", "average"), default="base", help="where the non-FFN weights come from")
    p.add_argument("--num-experts", type=int, default=6, help="a multiple of the 3 sources")
    p.add_argument("--out", help="where to save the MoE model (default: a temporary directory)")
    args = p.parse_args(argv)

    base = tiny_llama(0, "demo/base")
    sources = [base, tiny_llama(1, "demo/math"), tiny_llama(2, "demo/code")]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    moeify.moeify(
        base,
        experts_from=sources,
        experts_from_rest=args.rest,
        num_experts=args.num_experts,
        top_k=2,
        example_inputs={"input_ids": ids},
    )
    deviation = base.moeify_state.deviation
    print(f"experts from: {', '.join(base.moeify_state.config.experts_from)} (rest: {args.rest})")
    for name, value in deviation["layers"].items():
        print(f"  {name}: max |moe - dense FFN| = {value:.3g} of scale")
    print(f"whole model vs the dense base: {deviation['model']:.3g} of scale")
    for name, value in deviation["sources"].items():
        print(f"whole model vs source {name}: {value:.3g} of scale")

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "btx")
        moeify.save_pretrained(base, out)
        loaded = moeify.from_pretrained(out)  # the sources are not needed: the experts are in the file
        with torch.no_grad():
            same = torch.equal(loaded(input_ids=ids).logits, base.eval()(input_ids=ids).logits)
    print(f"reload identical: {same}")


if __name__ == "__main__":
    main()
