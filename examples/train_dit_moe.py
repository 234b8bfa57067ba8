"""Upcycle a class-conditional DiT (diffusers) into a sparse MoE and train it as a denoiser with
accelerate: bf16, routing monitors, checkpoint and resume. Defaults: a tiny DiT, synthetic latents.

    python examples/train_dit_moe.py --max-steps 20 --mixed-precision no      # one CPU process
    ACCELERATE_USE_CPU=1 accelerate launch --config_file integrations/accelerate/cpu_2proc.yaml \\
        examples/train_dit_moe.py --max-steps 20                               # two gloo ranks
    accelerate launch --config_file integrations/accelerate/multi_gpu_ddp_bf16.yaml \\
        examples/train_dit_moe.py --layers 12 --heads 6 --head-dim 64 --sample-size 32 --batch-size 32
    ... --resume                                    # continue from OUT/checkpoint (saved at --save-at)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, DiTTransformer2DModel

import moeify
from moeify.integrations.accelerate import fsdp2_plugin, prepare, register_state
from moeify.monitors import attach_monitors
from moeify.sinks import AccelerateSink, JsonlSink

CHANNELS = 4  # latent channels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a DiTTransformer2DModel (local path or Hub id, e.g. facebook/DiT-XL-2-256)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--sample-size", type=int, default=8, help="latent side")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="linear", choices=["linear", "mlp"])
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--save-at", type=int, help="optimizer step of the checkpoint (default: max-steps // 2)")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"], help="storage dtype of the weights")
    p.add_argument("--guard", default="fp32_master", help="bf16 weights: moeify.guard_bf16 method, or none")
    p.add_argument("--log-with", help="accelerate tracker: tensorboard, wandb, trackio, ...")
    p.add_argument("--out", type=Path, default=Path("runs/dit_moe"))
    p.add_argument("--resume", action="store_true", help="load OUT/checkpoint and continue")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> DiTTransformer2DModel:
    if args.model:  # fp32 master weights: accelerate's bf16 is autocast (../NOTES: bf16)
        return DiTTransformer2DModel.from_pretrained(args.model, subfolder="transformer", torch_dtype=torch.float32)
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=CHANNELS,
        num_layers=args.layers,
        sample_size=args.sample_size,
        patch_size=2,
        num_embeds_ada_norm=args.num_classes,
        norm_num_groups=1,
    )


def batch(
    args: argparse.Namespace, step: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic latents: one fixed random pattern per class plus a little noise; the noise and
    timesteps of the denoising loss. Seeded by (step, rank): a resumed run sees the same batches."""
    side = args.sample_size
    classes = torch.randn(args.num_classes, CHANNELS, side, side, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
    latents = classes[labels] + 0.1 * torch.randn(args.batch_size, CHANNELS, side, side, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=gen)
    return latents, noise, timesteps, labels


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    save_at = args.save_at or max(1, args.max_steps // 2)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, fsdp_plugin=fsdp2_plugin(), log_with=args.log_with, project_dir=args.out
    )
    model = moeify.moeify(build_model(args), num_experts=args.num_experts, top_k=args.top_k, router=args.router)
    model.to(torch.bfloat16 if args.weights == "bf16" else torch.float32)  # routers, routing stats stay fp32
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.weights == "bf16":  # half the memory, but small updates round away unless guarded (issue 4)
        accelerator.print(moeify.check_bf16(optimizer, model=model))
        optimizer = moeify.guard_bf16(model, optimizer, method=args.guard) if args.guard != "none" else optimizer
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    # On every rank: runner.step() all-reduces the routing statistics; sinks write on rank 0 only.
    runner = attach_monitors(model, sinks=[AccelerateSink(accelerator)])
    register_state(accelerator, model, runner)
    model, optimizer = prepare(accelerator, model, optimizer)
    if args.log_with:
        accelerator.init_trackers("moeify_dit", config={k: str(v) for k, v in vars(args).items()})
    if args.resume:
        accelerator.load_state(str(args.out / "checkpoint"))
    start = runner.steps  # restored by load_state
    runner.sinks.append(JsonlSink(args.out / ("run" if start == 0 else f"run_resumed_at_{start}")))
    accelerator.print(f"world_size={accelerator.num_processes} start_step={start} device={accelerator.device}")
    model.train()
    loss = torch.zeros(())
    for step in range(start, args.max_steps):
        latents, noise, timesteps, labels = (
            t.to(accelerator.device) for t in batch(args, step, accelerator.process_index)
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # DiT predicts noise and (learned) variance: the first CHANNELS output channels are the noise.
        prediction = model(hidden_states=noisy, timestep=timesteps, class_labels=labels).sample[:, :CHANNELS]
        loss = F.mse_loss(prediction.float(), noise)
        accelerator.backward(loss + moeify.aux_loss(model))
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
        if (step + 1) % 5 == 0 or step + 1 == args.max_steps:
            accelerator.print(f"step {step + 1} loss {loss.item():.4f}")
        if step + 1 == save_at:
            accelerator.save_state(str(args.out / "checkpoint"))
    runner.close()
    accelerator.print(f"final_loss={loss.item():.8f} steps={runner.steps} events={len(runner.events)}")
    accelerator.wait_for_everyone()  # no rank tears gloo down while another still talks
    accelerator.end_training()
    return loss.item()


if __name__ == "__main__":
    main()
