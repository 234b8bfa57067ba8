"""peft on an upcycled model: the three recipes of `moeify.lora_config`, a few training steps
each, and the adapter saved with peft and reloaded over `moeify.from_pretrained`.

    python examples/lora_experts.py                 # a tiny Llama built from a config, CPU, seconds
    python examples/lora_experts.py --steps 20 --rank 8

Recipes: "routers+shared" (routers and shared experts trained in full), "routers+lora" (routers in
full, one LoRA adapter per routed expert plus LoRA on the shared experts), "full" ("routers+lora"
plus LoRA on attention). Everything else stays frozen, so the base saved once serves every adapter.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify.integrations.peft import RECIPES, format_summary, trainable_summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", type=Path, help="where the base and adapters go (default: a temporary directory)")
    return p.parse_args(argv)


def upcycled() -> torch.nn.Module:
    """A tiny Llama, upcycled. zero_out: the shared expert starts as an exact no-op whose output
    projection gets a full gradient, so a LoRA on it learns from step one (the "noise" init starts
    both projections near zero, and a LoRA on them barely moves)."""
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return moeify.moeify(model, num_experts=4, top_k=2, shared_expert_init="zero_out", seed=0)


def batch(step: int) -> torch.Tensor:
    """Synthetic text: rows repeating a random 4-token pattern."""
    generator = torch.Generator().manual_seed(step)
    return torch.randint(3, 100, (4, 4), generator=generator).repeat(1, 4)


def train(model: torch.nn.Module, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        ids = batch(step % 2)  # two batches, seen again and again: the loss must fall
        loss = model(input_ids=ids, labels=ids).loss  # router losses included (training mode)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_recipe(recipe: str, base_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    model = moeify.from_pretrained(base_dir)
    model = get_peft_model(model, moeify.lora_config(model, recipe, r=args.rank, lora_alpha=2 * args.rank))
    summary = trainable_summary(model)
    print(f"[{recipe}] {format_summary(summary)}")
    losses = train(model, args.steps, args.lr)
    print(f"[{recipe}] loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")

    model.eval()
    probe = batch(1000)
    with torch.no_grad():
        before = model(input_ids=probe).logits
    adapter = out / f"adapter_{recipe.replace('+', '_')}"
    model.save_pretrained(adapter)  # peft's files: the LoRA weights and the trained routers / shared experts
    reloaded = PeftModel.from_pretrained(moeify.from_pretrained(base_dir), adapter)
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits - before).abs().max().item()
    print(f"[{recipe}] reloaded adapter: max |diff| {diff:.3g} ({adapter})")
    return summary


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        base_dir = moeify.save_pretrained(upcycled(), out / "base")  # the frozen base, saved once
        return {recipe: run_recipe(recipe, base_dir, out, args) for recipe in args.recipes}


if __name__ == "__main__":
    main()
