"""Convert a tiny Llama into a sparse MoE, train it a few steps with the routing monitors, and
publish it: the weights, a model card and the routing diagnostics, in one commit.

    python examples/publish.py                          # writes what would be pushed into OUT/repo
    python examples/publish.py --repo-id you/tiny-moe   # pushes (token: --token, HF_TOKEN or `hf auth login`)
    HF_ENDPOINT=http://127.0.0.1:PORT python examples/publish.py --repo-id you/tiny-moe   # another Hub

Then `moeify.from_pretrained("you/tiny-moe")` (or OUT/repo) pulls it back. Without a token or an
endpoint nothing leaves the machine: OUT/repo holds the README.md, diagnostics/ and checkpoint
files that the push would commit, and OUT/run the monitor run (`moeify card OUT/run --model ...`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify.monitors import attach_monitors
from moeify.sinks import JsonlSink


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/publish"), help="local output (the run, the staged repo)")
    p.add_argument("--repo-id", help="the Hub repo to push to, e.g. you/tiny-moe")
    p.add_argument("--token", help="a Hub write token (default: HF_TOKEN or the saved login)")
    p.add_argument("--endpoint", help="another Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    return p.parse_args(argv)


def tiny_llama() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def train(model: torch.nn.Module, steps: int, run_dir: Path) -> None:
    """AdamW on synthetic text (rows repeating a random 4-token pattern), every MoE layer
    watched by the default monitors, their records written to `run_dir`."""
    runner = attach_monitors(model, sinks=[JsonlSink(run_dir)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runner.attach_optimizer(optimizer)  # one monitor read per optimizer step
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        ids = torch.randint(3, 256, (4, 4), generator=generator).repeat(1, 8)
        loss = model(input_ids=ids, labels=ids).loss  # includes the router losses (training mode)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 5 == 0 or step + 1 == steps:
            print(f"step {step + 1} loss {loss.item():.4f}")
    summary = runner.close()
    model.eval()
    dead = summary["monitors"]["dead_experts"]["dead_now"]
    print(f"{runner.steps} steps, {len(runner.events)} routing events, {dead} dead experts; run in {run_dir}")


def can_push(args: argparse.Namespace) -> bool:
    if not args.repo_id:
        return False
    from huggingface_hub import get_token

    return bool(args.token or args.endpoint or os.environ.get("HF_ENDPOINT") or get_token())


def main(argv: list[str] | None = None) -> Path | str:
    args = parse_args(argv)
    model = moeify.moeify(tiny_llama(), num_experts=args.num_experts, top_k=args.top_k)
    run_dir = args.out / "run"
    train(model, args.steps, run_dir)
    if can_push(args):
        info = moeify.push_to_hub(
            model, args.repo_id, monitors=run_dir, private=args.private, token=args.token, endpoint=args.endpoint
        )
        print(f"pushed in one commit: {info}\npull it back with moeify.from_pretrained({args.repo_id!r})")
        return str(info)
    from moeify.hub.push import stage_folder

    repo = args.out / "repo"
    files = stage_folder(model, repo, monitors=run_dir, repo_id=args.repo_id)
    print(f"no token or endpoint: wrote the {len(files)} files a push would commit to {repo}:")
    print("\n".join(f"  {name}" for name in files))
    if not args.repo_id:
        print("push them with: python examples/publish.py --repo-id you/tiny-moe (and a token)")
    return repo


if __name__ == "__main__":
    main()
