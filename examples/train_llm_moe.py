"""Upcycle a Llama-family model into a sparse MoE and train it with accelerate: bf16, routing
monitors, checkpoint and resume. Defaults: a tiny Llama built from a config, synthetic text.

    python examples/train_llm_moe.py --max-steps 20 --mixed-precision no     # one CPU process
    ACCELERATE_USE_CPU=1 accelerate launch --config_file integrations/accelerate/cpu_2proc.yaml \\
        examples/train_llm_moe.py --max-steps 20                              # two gloo ranks
    accelerate launch --config_file integrations/accelerate/multi_gpu_ddp_bf16.yaml \\
        examples/train_llm_moe.py --model PATH --seq-len 1024 --lr 1e-5       # a real checkpoint
    ... --resume                                    # continue from OUT/checkpoint (saved at --save-at)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM

import moeify
from moeify.integrations.accelerate import (
    expert_parallel,
    fsdp2_plugin,
    load_state,
    prepare,
    register_state,
    save_state,
)
from moeify.monitors import attach_monitors
from moeify.sinks import AccelerateSink, JsonlSink


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a transformers causal LM (local path or Hub id); default: a tiny Llama")
    p.add_argument("--hidden-size", type=int, default=64, help="tiny model only")
    p.add_argument("--layers", type=int, default=2, help="tiny model only")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep-size", type=int, help="expert parallelism: the experts over this many processes (all of them)")
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--save-at", type=int, help="optimizer step of the checkpoint (default: max-steps // 2)")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"], help="storage dtype of the weights")
    p.add_argument("--guard", default="fp32_master", help="bf16 weights: moeify.guard_bf16 method, or none")
    p.add_argument("--log-with", help="accelerate tracker: tensorboard, wandb, trackio, ...")
    p.add_argument("--out", type=Path, default=Path("runs/llm_moe"))
    p.add_argument("--resume", action="store_true", help="load OUT/checkpoint and continue")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model:  # fp32 master weights: accelerate's bf16 is autocast (../NOTES: bf16)
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=max(64, args.seq_len),
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def batch(args: argparse.Namespace, vocab: int, step: int, rank: int) -> torch.Tensor:
    """Synthetic text: each row repeats a random 4-token pattern. Seeded by (step, rank), so a
    resumed run sees exactly the batches the interrupted one would have."""
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    pattern = torch.randint(3, vocab, (args.batch_size, 4), generator=gen)
    return pattern.repeat(1, args.seq_len // 4 + 1)[:, : args.seq_len]


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    save_at = args.save_at or max(1, args.max_steps // 2)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, fsdp_plugin=fsdp2_plugin(), log_with=args.log_with, project_dir=args.out
    )
    model = moeify.moeify(build_model(args), num_experts=args.num_experts, top_k=args.top_k)
    model.to(torch.bfloat16 if args.weights == "bf16" else torch.float32)  # routers, routing stats stay fp32
    if args.ep_size:  # before the optimizer (and its bf16 guard) sees the parameters: the experts become DTensors
        expert_parallel(accelerator, model, args.ep_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.weights == "bf16":  # half the memory, but small updates round away unless guarded (issue 4)
        accelerator.print(moeify.check_bf16(optimizer, model=model))
        optimizer = moeify.guard_bf16(model, optimizer, method=args.guard) if args.guard != "none" else optimizer
    # On every rank: runner.step() all-reduces the routing statistics; sinks write on rank 0 only.
    runner = attach_monitors(model, sinks=[AccelerateSink(accelerator)])
    register_state(accelerator, model, runner)
    model, optimizer = prepare(accelerator, model, optimizer)
    if args.log_with:
        accelerator.init_trackers("moeify_llm", config={k: str(v) for k, v in vars(args).items()})
    if args.resume:
        load_state(accelerator, args.out / "checkpoint")  # accelerator.load_state, expert-parallel shards too
    start = runner.steps  # restored by load_state
    runner.sinks.append(JsonlSink(args.out / ("run" if start == 0 else f"run_resumed_at_{start}")))
    accelerator.print(f"world_size={accelerator.num_processes} start_step={start} device={accelerator.device}")
    vocab = accelerator.unwrap_model(model).config.vocab_size
    model.train()
    loss = torch.zeros(())
    for step in range(start, args.max_steps):
        ids = batch(args, vocab, step, accelerator.process_index).to(accelerator.device)
        out = model(input_ids=ids, labels=ids)  # out.loss includes the router losses (out.aux_loss)
        loss = out.loss - out.aux_loss.detach()  # the task loss, for the log
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
        if (step + 1) % 5 == 0 or step + 1 == args.max_steps:
            accelerator.print(f"step {step + 1} loss {loss.item():.4f}")
        if step + 1 == save_at:
            save_state(accelerator, args.out / "checkpoint")  # crash-safe accelerator.save_state
    runner.close()
    accelerator.print(f"final_loss={loss.item():.8f} steps={runner.steps} events={len(runner.events)}")
    accelerator.wait_for_everyone()  # no rank tears gloo down while another still talks
    accelerator.end_training()
    return loss.item()


if __name__ == "__main__":
    main()
