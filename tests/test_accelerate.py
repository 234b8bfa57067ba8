"""moeify.integrations.accelerate in one process: the launch config files, the FSDP2 plugin with
fp32 reduction, the launch check, moeify's checkpoint state, and the examples end to end with
resume. Multi-process behaviour is in tests/test_distributed.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from core_helpers import llama_config
from transformers import AutoModelForCausalLM

import moeify
from moeify.integrations import accelerate as integration
from moeify.monitors import attach_monitors

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "integrations" / "accelerate"


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def launcher_env(name: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file NAME` would do, without starting anything."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, mixed_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return args, prepare_multi_gpu_env(args)
    return args, prepare_simple_launcher_cmd_env(args)[1]


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "name, launcher, processes",
    [
        ("single_gpu_bf16.yaml", "simple", 1),
        ("multi_gpu_ddp_bf16.yaml", "multi_gpu", 8),
        ("fsdp2_bf16.yaml", "use_fsdp", 8),
        ("deepspeed_zero2_bf16.yaml", "use_deepspeed", 8),
        ("cpu_2proc.yaml", "multi_gpu", 2),
    ],
)
def test_config_files_are_valid_launch_configs(name, launcher, processes):
    args, env = launcher_env(name)
    assert args.num_processes == processes and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    chosen = [flag for flag in ("multi_gpu", "use_fsdp", "use_deepspeed") if getattr(args, flag)]
    assert chosen == ([] if launcher == "simple" else [launcher])
    if launcher == "use_deepspeed":
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"


def test_fsdp2_config_with_plugin_reduces_in_fp32(monkeypatch):
    _, env = launcher_env("fsdp2_bf16.yaml")
    assert env["FSDP_VERSION"] == "2" and env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = integration.fsdp2_plugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    plugin.set_mixed_precision("bf16")  # what accelerate does with `mixed_precision: bf16`: keeps ours
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32


def test_fsdp2_plugin_is_none_without_an_fsdp_launch():
    assert integration.fsdp2_plugin() is None


def test_routers_are_sharded_apart_only_under_low_precision_fsdp2():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    def fake(kind, version, dtype):
        plugin = SimpleNamespace(fsdp_version=version, mixed_precision_policy=MixedPrecisionPolicy(param_dtype=dtype))
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=plugin))

    assert integration._fsdp2_casts_params(fake(DistributedType.FSDP, 2, torch.bfloat16))
    assert not integration._fsdp2_casts_params(fake(DistributedType.FSDP, 2, torch.float32))
    assert not integration._fsdp2_casts_params(fake(DistributedType.FSDP, 1, torch.bfloat16))
    assert not integration._fsdp2_casts_params(fake(DistributedType.MULTI_GPU, 2, torch.bfloat16))


# ---------------------------------------------------------------- launch check, DDP buffers


def test_check_launch_refuses_independent_workers(monkeypatch):
    accelerator = Accelerator(cpu=True)
    integration.check_launch(accelerator)  # a plain one-process run is fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1"):
        integration.check_launch(accelerator)


def _llama(**overrides) -> torch.nn.Module:
    config = llama_config()
    torch.manual_seed(0)
    return moeify.moeify(AutoModelForCausalLM.from_config(config), num_experts=4, **overrides)


def test_keep_stats_local_names_every_routing_accumulator():
    model = _llama()
    model._ddp_params_and_buffers_to_ignore = ["lm_head.weight"]
    names = integration.keep_stats_local(model)
    accumulators = ("bias_counts", "stat_prob_sum", "stat_sums", "tokens_per_expert")
    assert names == [f"model.layers.{i}.mlp.{b}" for i in range(2) for b in accumulators]
    assert model._ddp_params_and_buffers_to_ignore == ["lm_head.weight", *names]
    # bias_counts exists once a bias rate is set (even after DDP wrapped the model): named ahead.
    assert set(names) - {name for name, _ in model.named_buffers()} == {
        f"model.layers.{i}.mlp.bias_counts" for i in range(2)
    }
    biased = _llama(balance_bias_rate=1e-3)
    assert set(integration.keep_stats_local(biased)) <= {name for name, _ in biased.named_buffers()}


# ---------------------------------------------------------------- checkpoint state


def _run(tmp_path: Path, steps: int, *, save_at: int | None = None, resume: bool = False, **overrides):
    accelerator = Accelerator(cpu=True)
    model = _llama(**overrides)
    runner = attach_monitors(model, monitors=["expert_load", "dead_experts"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = integration.register_state(accelerator, model, runner)
    model, optimizer = integration.prepare(accelerator, model, optimizer)
    if resume:
        accelerator.load_state(str(tmp_path / "checkpoint"))
    resumed_at = runner.steps
    for step in range(runner.steps, steps):
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(step))
        accelerator.backward(model(ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
        runner.step()
        if step + 1 == save_at:
            accelerator.save_state(str(tmp_path / "checkpoint"))
    return model, runner, state, resumed_at


def test_save_state_resume_continues_exactly(tmp_path):
    full, full_runner, _, _ = _run(tmp_path, 4, save_at=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed, runner, state, resumed_at = _run(tmp_path, 4, resume=True)
    assert resumed_at == 2 and runner.steps == 4
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert [r["step"] for r in runner.history] == [3, 4]
    # moeify's custom state is plain data: loadable without unpickling code.
    saved = torch.load(tmp_path / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=True)
    assert saved["monitor_steps"] == 2 and saved["recipes"] == state.state_dict()["recipes"]
    assert moeify.MoeifyConfig.from_dict(__import__("json").loads(saved["recipes"])[0]).num_experts == 4


def test_crash_safe_save_state_keeps_the_old_checkpoint_when_a_save_fails(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    accelerator = Accelerator(cpu=True)
    model = _llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    integration.register_state(accelerator, model, attach_monitors(model, monitors=["expert_load"]))
    model, optimizer = integration.prepare(accelerator, model, optimizer)
    assert integration.save_state(accelerator, checkpoint) == checkpoint
    (checkpoint / "notes.txt").write_text("the user's")
    (checkpoint / "model_card.md").write_text("the user's too")  # near accelerate's names, not one of them
    (checkpoint / "optimizer_7.bin").write_bytes(b"stale: from a save with eight optimizers")
    first = sorted(path.name for path in checkpoint.iterdir())
    saved = {name: (checkpoint / name).read_bytes() for name in first}
    assert "custom_checkpoint_0.pkl" in first and "optimizer.bin" in first

    real_save = accelerator.save_state

    def dies_midway(output_dir):  # writes part of a checkpoint, then the disk fills up
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", dies_midway)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="No space"):
        integration.save_state(accelerator, checkpoint)
    assert {name: (checkpoint / name).read_bytes() for name in first} == saved
    assert sorted(path.name for path in checkpoint.iterdir()) == first
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint"]  # no staging left behind

    monkeypatch.setattr(accelerator, "save_state", real_save)
    integration.save_state(accelerator, checkpoint)  # a later save replaces what accelerate wrote
    assert (checkpoint / "model.safetensors").read_bytes() != saved["model.safetensors"]
    assert (checkpoint / "notes.txt").read_text() == "the user's"
    assert (checkpoint / "model_card.md").read_text() == "the user's too"
    assert not (checkpoint / "optimizer_7.bin").exists()
    with pytest.raises(TypeError, match="save_state"):
        integration.save_state(accelerator, 3)


def test_checkpoint_of_another_recipe_is_refused(tmp_path):
    _run(tmp_path, 1, save_at=1)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="other moeify recipes"):
        _run(tmp_path, 1, resume=True, top_k=1)


# ---------------------------------------------------------------- examples


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_dit_moe", "train_llm_moe"])
def test_example_trains_checkpoints_and_resumes(tmp_path, name):
    example = _example(name)
    args = ["--max-steps", "3", "--save-at", "2", "--out", str(tmp_path)]
    final = example.main(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert example.main([*args, "--resume"]) == final  # bf16 autocast, same batches: bit for bit
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "run_resumed_at_2" / "history.jsonl").read_text().splitlines()) == 1
