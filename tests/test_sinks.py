"""Sinks: the run directory round-trips, the console prints a table, accelerate trackers and the
transformers Trainer receive the routing numbers."""

from __future__ import annotations

import io
import json

import pytest
import torch
from core_helpers import llama_config
from transformers import AutoModelForCausalLM

from moeify import moeify
from moeify.monitors import attach_monitors
from moeify.sinks import AccelerateSink, ConsoleSink, JsonlSink, read_run


def _model():
    cfg = llama_config()
    torch.manual_seed(0)
    return moeify(AutoModelForCausalLM.from_config(cfg), num_experts=4)


def _train(model, runner, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runner.attach_optimizer(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 100, (2, 10), generator=gen)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_jsonl_run_directory_round_trips(tmp_path):
    model = _model()
    runner = attach_monitors(model, sinks=[JsonlSink(tmp_path / "run")])
    _train(model, runner, steps=3)
    summary = runner.close()
    run = read_run(tmp_path / "run")
    assert [r["step"] for r in run["history"]] == [1, 2, 3]
    assert run["summary"] == json.loads(json.dumps(summary))
    shares = [
        v
        for k, v in run["history"][-1]["monitors"]["expert_load"]["model.layers.0.mlp"].items()
        if k.startswith("share_")
    ]
    assert sum(shares) == pytest.approx(1.0)


def test_read_run_refuses_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a moeify run directory"):
        read_run(tmp_path)


def test_console_prints_a_table_per_layer():
    model = _model()
    stream = io.StringIO()
    runner = attach_monitors(model, sinks=[ConsoleSink(every=2, stream=stream)])
    _train(model, runner, steps=4)
    runner.close()
    text = stream.getvalue()
    headers = [line for line in text.splitlines() if line.startswith("step ")]
    assert len(headers) == 2  # a table every 2nd of 4 records
    assert "model.layers.1.mlp" in text and "load cv" in text
    assert "monitoring closed after 4 steps" in text


def test_accelerate_trackers_receive_flattened_scalars():
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    recorder = Recorder()
    accelerator = Accelerator(cpu=True, log_with=[recorder])
    accelerator.init_trackers("moeify-test")
    model = _model()
    runner = attach_monitors(model, sinks=[AccelerateSink(accelerator)])
    _train(model, runner, steps=2)
    runner.close()
    assert [step for step, _ in recorder.logged] == [1, 2]
    keys = recorder.logged[-1][1]
    assert "moeify/expert_load/model.layers.0.mlp/cv" in keys
    assert all(isinstance(v, float) for v in keys.values())


def test_trainer_callback_steps_runner_once_per_optimizer_step(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from moeify.sinks import MoeifyCallback

    class Tokens(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.arange(i, i + 10) % 100
            return {"input_ids": ids, "labels": ids}

    class Reporter(TrainerCallback):  # stands in for a report_to backend
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

    model = _model()
    runner = attach_monitors(model)
    reporter = Reporter()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[reporter])
    MoeifyCallback(runner).install(trainer)
    trainer.train()
    assert runner.steps == 2  # optimizer steps, not micro-batches
    assert [r["step"] for r in runner.history] == [1, 2]
    # 2 micro-batches x 2 samples x 10 tokens x top-2 assignments per optimizer step.
    counts = [
        v
        for k, v in runner.history[0]["monitors"]["expert_load"]["model.layers.0.mlp"].items()
        if k.startswith("share_")
    ]
    assert sum(counts) == pytest.approx(1.0)
    logged = [entry for entry in trainer.state.log_history if "moeify/load_cv_mean" in entry]
    assert logged, "routing scalars reach the Trainer's log_history"
    assert any("moeify/load_cv_mean" in entry for entry in reporter.seen), "and the reporting callbacks"
    assert all(not layer.collect_stats for _, layer in runner.layers)  # closed at train end
