"""Upcycle a causal LM into a sparse MoE: verify, train with the router loss, generate, save, reload.

    python examples/upcycle_llm.py                         # a tiny Llama built from a config (seconds)
    python examples/upcycle_llm.py --model PATH --steps 50 # a local transformers checkpoint
    python examples/upcycle_llm.py --steps 2               # the smoke test's quick run

moeify(..., example_inputs=batch) checks the whole converted model against the dense one on
`batch` (and undoes everything if it differs); the training loop adds `moeify.aux_loss(model)`;
`moeify.save_pretrained` / `moeify.from_pretrained` round-trip the MoE model bit for bit.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import moeify

TEXT = "the quick brown fox jumps over the lazy dog. " * 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local transformers causal LM directory; default: a tiny Llama")
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", help="where to save the MoE model (default: a temporary directory)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(args.model)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), None  # bytes as tokens: no tokenizer needed


def encode(text: str, tokenizer: PreTrainedTokenizerBase | None) -> torch.Tensor:
    if tokenizer is None:
        return torch.tensor([list(text.encode())])
    return tokenizer(text, return_tensors="pt").input_ids


def decode(ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase | None) -> str:
    if tokenizer is None:
        return bytes(i for i in ids.tolist() if 32 <= i < 127).decode()
    return tokenizer.decode(ids, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = build(args)
    ids = encode(TEXT, tokenizer)
    print(moeify.find_ffns(model))

    # 1. Convert, checking the whole model against the dense one on a real batch.
    moeify.moeify(
        model,
        num_experts=args.num_experts,
        top_k=args.top_k,
        shared_expert_init="zero_out",
        example_inputs={"input_ids": ids},
    )
    print(f"converted {len(moeify.moe_layers(model))} FFNs into {args.num_experts} experts each (verified)")

    # 2. Train a few steps: task loss + router losses.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for step in range(args.steps):
        out = model(input_ids=ids, labels=ids)  # in training mode out.loss includes the router losses
        aux = out.aux_loss
        task = out.loss - aux.detach()
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0 or (step + 1) % 5 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}: loss {task.item():.4f}  aux {aux.item():.4f}")

    # 3. Generate (greedy) from the first words.
    model.eval()
    prompt = ids[:, :10]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=model.config.pad_token_id)
    print(f"generated: {decode(generated[0, prompt.shape[1] :], tokenizer)!r}")

    # 4. Save and reload; the reloaded model must compute exactly the same logits.
    with tempfile.TemporaryDirectory() as tmp:
        directory = moeify.save_pretrained(model, args.out or tmp)
        reloaded = moeify.from_pretrained(directory)
        with torch.no_grad():
            same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    print(f"reload identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
