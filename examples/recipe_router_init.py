"""Routers initialised from data: k-means centroids of the FFN inputs, or each expert's prompts.

    python examples/recipe_router_init.py              # a tiny Llama built from a config (seconds)
    python examples/recipe_router_init.py --model PATH # a local transformers causal LM

router_init="kmeans" clusters the FFN inputs of a calibration batch into one centroid per routed
expert (LLaMA-MoE v2); router_init="prompts" points expert e's router row at the mean FFN input of
its own prompts (mergekit-moe's "hidden" gates). Both keep the identity check (the experts are
still clones); both need `calibration_inputs` only at conversion, never for loading.

Here two "domains" of prompts (each drawn from its own small set of token ids: a random model
has no semantics, so a domain is its vocabulary) get one expert each; the printed agreement is the share of held-out tokens of each domain whose top-1
expert at initialisation is its own, averaged over the MoE layers, against a random router.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeify


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local transformers causal LM directory; default: a tiny Llama")
    p.add_argument("--num-experts", type=int, default=4, help="routed experts of the k-means conversion")
    p.add_argument("--prompts", type=int, default=8, help="prompts per domain (and as many held out)")
    p.add_argument("--seq", type=int, default=16, help="tokens per prompt")
    p.add_argument("--domain-vocab", type=int, default=16, help="distinct token ids of each domain")
    return p.parse_args(argv)


def build(path: str | None) -> torch.nn.Module:
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def domain(vocab: int, size: int, which: int, count: int, seq: int, seed: int) -> torch.Tensor:
    """Prompts of random token ids from domain `which`'s ids: domain 0 from 3 on (0-2 are special),
    domain 1 from the middle of the vocabulary on."""
    low = 3 if which == 0 else vocab // 2
    return torch.randint(low, low + size, (count, seq), generator=torch.Generator().manual_seed(seed))


def agreement(model: torch.nn.Module, held_out: list[torch.Tensor]) -> float:
    """Share of domain d's tokens whose top-1 expert is expert d, averaged over layers and domains."""
    layers = [layer for _, layer in moeify.moe_layers(model)]
    shares = []
    for expert, ids in enumerate(held_out):
        chosen: list[torch.Tensor] = []
        handles = [
            layer.router.register_forward_hook(
                lambda m, args, logits_TE, chosen=chosen: chosen.append(logits_TE.argmax(dim=-1))
            )
            for layer in layers
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for handle in handles:
            handle.remove()
        shares += [(top1_T == expert).float().mean().item() for top1_T in chosen]
    return sum(shares) / len(shares)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dense = build(args.model)
    vocab = dense.config.vocab_size
    size = min(args.domain_vocab, vocab // 2 - 3)
    probe = {"input_ids": domain(vocab, size, 0, 2, args.seq, seed=99)}

    # k-means: one calibration batch of random tokens, clustered into num_experts centroids per layer.
    calibration = {
        "input_ids": torch.randint(3, vocab, (args.prompts, args.seq), generator=torch.Generator().manual_seed(1))
    }
    kmeans = moeify.moeify(
        copy.deepcopy(dense), num_experts=args.num_experts, top_k=2, router_init="kmeans",
        calibration_inputs=calibration, example_inputs=probe,
    )  # fmt: skip
    for name, site in kmeans.moeify_state.router_init["sites"].items():
        print(
            f"kmeans {name}: {site['tokens']} tokens -> {args.num_experts} centroids in {site['iterations']} Lloyd steps "
            f"(converged: {site['converged']}), row norm {site['scale']:.4f}"
        )
    print("kmeans: identity check passed on example_inputs (the experts are still clones)")

    # prompts: expert 0 gets domain A's prompts, expert 1 domain B's; agreement on held-out prompts.
    prompts = [{"input_ids": domain(vocab, size, d, args.prompts, args.seq, seed=10 + d)} for d in (0, 1)]
    held_out = [domain(vocab, size, d, args.prompts, args.seq, seed=20 + d) for d in (0, 1)]
    recipe = dict(num_experts=2, top_k=1, example_inputs=probe)
    from_prompts = moeify.moeify(copy.deepcopy(dense), router_init="prompts", calibration_inputs=prompts, **recipe)
    random_init = moeify.moeify(copy.deepcopy(dense), **recipe)
    print(
        f"routing agreement with the domains at init: prompts {agreement(from_prompts, held_out):.3f}, "
        f"random {agreement(random_init, held_out):.3f} (chance 0.5)"
    )


if __name__ == "__main__":
    main()
