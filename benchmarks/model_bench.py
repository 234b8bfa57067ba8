"""Whole-model training step (zero_grad, forward with labels, backward, AdamW step; float32): a
moeify-converted SmolLM2-135M-shaped Llama against transformers' native Qwen2-MoE with the same
weights (`moeify.export` → `AutoModelForCausalLM.from_pretrained`), eager and `torch.compile`d.

    python benchmarks/model_bench.py --quick     # 4 layers, batch 4 x 256 (`make bench` on CPU)
    python benchmarks/model_bench.py             # the full shape: 30 layers, batch 4 x 512
    python benchmarks/model_bench.py --layers 8 --batch 2 --seq 128 --steps 3

Children do the work (`--child JSON`): both models in one for paired timing when they fit in
memory, and a fresh one per (model, mode) for peak memory.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, whatever the cwd

from models import perturb_experts
from results import Row, finish, start
from timing import Timings, interleaved, loadavg

NUM_EXPERTS, TOP_K, NUM_SHARED = 8, 2, 1
# Qwen2-MoE's router_aux_loss_coef. Its balance loss pools all layers and counts top-k
# assignments (≈ TOP_K when balanced); moeify's is per layer, summed (≈ 1 per layer when
# balanced). moeify's weight COEF*TOP_K/layers makes both add ≈ COEF*TOP_K at balance (and
# exactly the same with one layer).
COEF = 0.01
TWINS = ("transformers grouped_mm", "transformers eager")  # experts implementations; the first is the default
CONTENDERS = ("moeify", *TWINS)
TOLERANCE = 1e-4  # max |logits diff| / max |logits| before any timing counts


@dataclass(frozen=True)
class Spec:
    layers: int
    batch: int
    seq: int
    steps: int  # timed steps after warm-up
    threads: int = 2

    @property
    def label(self) -> str:
        return f"smollm2-135M {self.layers}L {self.batch}x{self.seq}"


PRESETS = {"full": Spec(layers=30, batch=4, seq=512, steps=3), "quick": Spec(layers=4, batch=4, seq=256, steps=5)}


def smollm2_config(layers: int):  # a LlamaConfig (transformers imported lazily)
    """SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json) with `layers` layers."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True,
    )  # fmt: skip


def build_moeify(spec: Spec) -> torch.nn.Module:
    """Random dense weights from the config, converted: deterministic, so every child builds the
    same model. The routed experts then get independent noise: exact clones would make the logits
    independent of routing, and the twin check could not catch a routing mismatch."""
    from transformers import LlamaForCausalLM

    import moeify

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(spec.layers))
    moeify.moeify(
        model, num_experts=NUM_EXPERTS, top_k=TOP_K, num_shared_experts=NUM_SHARED, seed=0,
        balance_loss_weight=COEF * TOP_K / spec.layers, z_loss_weight=0.0, entropy_loss_weight=0.0,
    )  # fmt: skip
    perturb_experts(model)
    return model


def load_twin(directory: str) -> torch.nn.Module:
    """The exported checkpoint, loaded by plain transformers, with its balance loss on."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, output_router_logits=True, router_aux_loss_coef=COEF)


def token_batch(spec: Spec, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 49152, (spec.batch, spec.seq), generator=torch.Generator().manual_seed(2)).to(device)


def losses(name: str, model: torch.nn.Module, out) -> tuple[torch.Tensor, float, float]:
    """(the loss to train on = CE + weighted balance loss, CE, weighted balance loss)."""
    if name != "moeify":  # Qwen2-MoE's loss already holds router_aux_loss_coef * aux_loss
        return out.loss, (out.loss - COEF * out.aux_loss).item(), COEF * out.aux_loss.item()
    import moeify

    aux = getattr(out, "aux_loss", None)
    if aux is not None and model.training:  # moeify's output hook added it (MoeifyConfig.aux_loss_in_output)
        return out.loss, (out.loss - aux).item(), aux.item()
    aux = moeify.aux_loss(model) if aux is None else aux
    return out.loss + aux, out.loss.item(), aux.item()


def set_implementation(model: torch.nn.Module, name: str) -> None:
    """transformers' `@use_experts_implementation` reads the config on every call."""
    if name != "moeify":
        model.config._experts_implementation = name.removeprefix("transformers ")


def _memory_mb(device: torch.device, peak: bool) -> float:
    """CUDA: allocated memory (peak since the last reset); CPU: the resident set (VmHWM: peak)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**20
    field = "VmHWM:" if peak else "VmRSS:"
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _compile_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def prepare(spec: Spec, directory: str, device: torch.device) -> dict:
    """Build, export as qwen2_moe to `directory`, reload with plain transformers, compare logits and losses."""
    import moeify

    model = build_moeify(spec).to(device).eval()
    moeify.export(model, directory, "qwen2_moe")
    twin = load_twin(directory).to(device).eval()
    ids = token_batch(spec, device)
    info: dict = {
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in (("moeify", model), ("twin", twin))}
    }
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        info["moeify"] = dict(zip(("ce", "weighted_aux"), losses("moeify", model, out)[1:]))
        for name in TWINS:
            set_implementation(twin, name)
            out_twin = twin(input_ids=ids, labels=ids)
            error = (out_twin.logits - out.logits).abs().max().item() / out.logits.abs().max().item()
            ce, aux = losses(name, twin, out_twin)[1:]
            info[name] = {"logits_max_relative_error": error, "ce": ce, "weighted_aux": aux}
            if not error <= TOLERANCE:
                raise RuntimeError(f"{name}'s logits differ from moeify's by {error:.2e} of their scale")
    return info


def _train_step(name: str, model: torch.nn.Module, runner: torch.nn.Module, ids: torch.Tensor, record: dict):
    def step() -> None:
        set_implementation(model, name)
        model.optimizer.zero_grad(set_to_none=True)
        loss, ce, aux = losses(name, model, runner(input_ids=ids, labels=ids))
        loss.backward()
        model.optimizer.step()
        record.setdefault("first_step_ce_aux", (ce, aux))

    return step


def child(job: dict) -> dict:
    """Train `job["names"]` (interleaved rounds when several); one name: also its peak memory."""
    spec, device, compiled = Spec(**job["spec"]), torch.device(job["device"]), job["mode"] == "compiled"
    torch.set_num_threads(spec.threads)
    if job["names"] == ["prepare"]:
        return prepare(spec, job["directory"], device)
    importlib.import_module("transformers.utils.logging").disable_progress_bar()
    if compiled:  # imported before the baseline: inductor's own memory is not the model's
        importlib.import_module("torch._inductor.compile_fx")
    gc.collect()
    start_mb = _memory_mb(device, peak=False)
    models: dict[str, torch.nn.Module] = {}  # the transformers implementations share one model and optimizer
    for key in dict.fromkeys("moeify" if name == "moeify" else "twin" for name in job["names"]):
        models[key] = (build_moeify(spec) if key == "moeify" else load_twin(job["directory"])).to(device).train()
        models[key].optimizer = torch.optim.AdamW(models[key].parameters(), lr=1e-4)
    ids = token_batch(spec, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    records, steps = {}, {}
    for name in job["names"]:
        model = models["moeify" if name == "moeify" else "twin"]
        records[name] = record = {"warmup_s": []}
        step = _train_step(name, model, torch.compile(model) if compiled else model, ids, record)
        counts = _compile_counts()
        try:
            for _ in range(job["warmup"]):  # the first compiled steps compile (and may recompile)
                t0 = time.perf_counter()
                step()
                sync()
                record["warmup_s"].append(time.perf_counter() - t0)
        except Exception as error:  # a failed compile is a result, not a crash
            record["failed"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300]
            continue
        record["graph_breaks"], record["graphs"] = (b - a for a, b in zip(counts, _compile_counts()))
        steps[name] = step
    gc.collect()
    _reset_peak(device)  # after warm-up: compile's transient memory is not a step's
    timings = interleaved(steps, repeats=spec.steps, warmup=0, sync=sync) if steps else Timings()
    result: dict = {"names": records}
    if len(job["names"]) == 1 and steps:
        result["peak_mb"] = _memory_mb(device, peak=True) - start_mb
    for name, seconds in timings.seconds.items():
        warm = records[name]["warmup_s"]
        records[name] |= {"step_s": seconds, "compile_s": sum(warm) - len(warm) * statistics.median(seconds)}
    return result


def run_child(job: dict, env: dict, script: str = __file__) -> dict:
    """Run `script --child JOB` (a fresh process: its peak memory is its own) and return its JSON."""
    command = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [""])[-1]
        why = "killed (out of memory?)" if done.returncode in (-9, 137) else tail
        what = " ".join(str(job[k]) for k in ("names", "kind", "name", "mode") if k in job)
        raise RuntimeError(f"child {what} exited {done.returncode}: {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fits_twice(spec: Spec, device: torch.device) -> bool:
    """Two models' training steps in 60% of the free memory (fp32 weights, grads, 2 AdamW moments, activations)?"""
    params = spec.layers * ((NUM_EXPERTS + NUM_SHARED) * 3 * 576 * 1536 + 576 * 2 * (576 + 192)) + 49152 * 576
    need = 2 * (16 * params + 4 * spec.batch * spec.seq * (spec.layers * 576 * 120 + 49152 * 4))
    if device.type == "cuda":
        return need < 0.6 * torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return need < 0.6 * 1024 * next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))


def measure(spec: Spec, device: torch.device, log=print) -> tuple[list[Row], dict]:
    """Rows (step time and peak memory, moeify ÷ each transformers implementation) and details."""
    info: dict = {"spec": asdict(spec), "label": spec.label, "device": device.type, "failures": []}
    paired = fits_twice(spec, device)
    info["timing"] = "paired rounds in one process" if paired else "one process per model (unpaired)"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="moeify-model-bench-") as tmp:
        # A fresh inductor cache per run: the first compile is cold (its time is honest); the
        # memory children compile again from it.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
        base = {"spec": asdict(spec), "device": device.type, "directory": str(Path(tmp) / "qwen2_moe")}
        t0 = time.perf_counter()
        try:  # a failed export or logits check ends this section, not the whole run
            info["check"] = run_child(base | {"names": ["prepare"], "mode": "eager"}, env)
        except RuntimeError as error:
            info["failures"] = [{"mode": mode, "name": "moeify", "error": str(error)} for mode in ("eager", "compiled")]
            return rows, info
        log(f"[model: built, exported, logits agree ({time.perf_counter() - t0:.0f} s)]", flush=True)
        for mode in ("eager", "compiled"):
            info[mode] = _measure_mode(spec, mode, base, env, paired, log)
            rows += _rows(spec, mode, info[mode], paired, info["failures"])
    return rows, info


def _measure_mode(spec: Spec, mode: str, base: dict, env: dict, paired: bool, log) -> dict:
    """{contender: record} of one mode: step times (in one child when `paired`) and, from a fresh
    child per contender, peak memory."""
    warmup = 2 if mode == "compiled" else 1
    timed: dict = {}
    if paired:
        t0 = time.perf_counter()
        try:
            timed = run_child(base | {"names": list(CONTENDERS), "mode": mode, "warmup": warmup}, env)["names"]
        except RuntimeError as error:
            timed = {name: {"failed": str(error)} for name in CONTENDERS}
        log(f"[model {mode}: paired timing {time.perf_counter() - t0:.0f} s, load {loadavg()}]", flush=True)
    for name in CONTENDERS:
        if "failed" in timed.get(name, {}):  # the same failure again would only cost time
            continue
        job = base | {"names": [name], "mode": mode, "warmup": warmup}
        job["spec"] = asdict(replace(spec, steps=1) if paired else spec)
        t0 = time.perf_counter()
        try:
            got = run_child(job, env)
        except RuntimeError as error:
            got = {"names": {name: {"failed": str(error)}}}
        record = timed.setdefault(name, got["names"][name])
        record["peak_mb"] = got.get("peak_mb")
        if record is not got["names"][name] and "failed" in got["names"][name]:
            record["memory_failed"] = got["names"][name]["failed"]
        peak = "failed" if record["peak_mb"] is None else f"{record['peak_mb']:.0f} MB"
        log(f"[model {mode} {name}: peak {peak} ({time.perf_counter() - t0:.0f} s), load {loadavg()}]", flush=True)
    return timed


def _rows(spec: Spec, mode: str, timed: dict, paired: bool, failures: list) -> list[Row]:
    failures += [{"mode": mode, "name": name, "error": r["failed"]} for name, r in timed.items() if "failed" in r]
    ours, rows = timed.get("moeify", {}), []
    for name in TWINS:
        theirs = timed.get(name, {})
        if "step_s" not in ours or "step_s" not in theirs:
            continue
        timings = Timings({"moeify": ours["step_s"], name: theirs["step_s"]})
        q1, ratio, q3 = timings.ratio("moeify", name)
        if not paired:  # separate processes: the ratio of the medians
            ratio = q1 = q3 = timings.median_ms("moeify") / timings.median_ms(name)
        tokens_s = [spec.batch * spec.seq / statistics.median(r["step_s"]) for r in (ours, theirs)]
        note = f"ratio = step time; median tokens/s {tokens_s[0]:.0f} vs {tokens_s[1]:.0f}" + (
            "" if paired else ", unpaired"
        )
        note += f"; compile {ours['compile_s']:.0f} / {theirs['compile_s']:.0f} s" if mode == "compiled" else ""
        rows.append(
            Row("model", spec.label, f"train {mode}", "moeify", name, ratio, q1, q3, timings.median_ms("moeify"),
                timings.median_ms(name), 1.0, note, timings.min_ratio("moeify", name))
        )  # fmt: skip
        if ours.get("peak_mb") and theirs.get("peak_mb"):
            mem, note = ours["peak_mb"] / theirs["peak_mb"], f"peak {ours['peak_mb']:.0f} / {theirs['peak_mb']:.0f} MB"
            rows.append(
                Row("model", spec.label, f"peak memory {mode}", "moeify", name, mem, mem, mem, None, None, 1.0, note)
            )
    return rows


def summary(rows: list[Row], info: dict) -> list[dict]:
    """The issue's targets, eager and compiled: tokens/s >= 1.0x transformers' fastest experts
    implementation, peak memory <= 1.0x every implementation's. A failed moeify compile misses both."""
    verdicts = []
    for mode in ("eager", "compiled"):
        failed = [f["error"] for f in info.get("failures", []) if f["mode"] == mode and f["name"] == "moeify"]
        speed = min((r for r in rows if r.mode == f"train {mode}"), key=lambda r: r.baseline_ms, default=None)
        memory = max((r for r in rows if r.mode == f"peak memory {mode}"), key=lambda r: r.ratio, default=None)
        for question, worst in (("step time <= 1.0 (tokens/s >= 1.0)", speed), ("peak memory <= 1.0", memory)):
            if worst is not None or failed:
                verdicts.append({
                    "question": f"whole model, {mode}: moeify ÷ transformers {question}", "target": 1.0,
                    "worst_ratio": None if worst is None else round(worst.ratio, 3),
                    "met": not failed and worst is not None and worst.ratio <= 1.0,
                    "where": failed[0] if failed else f"{worst.shape} vs {worst.baseline}",
                })  # fmt: skip
    return verdicts


def format_model_table(rows: list[Row], info: dict) -> str:
    """tokens/s = 1 / the step-time ratio (>= 1: moeify faster); memory <= 1: moeify smaller."""
    lines = [
        f"whole-model training step, {info['label']}, {info['device']}, timing: {info['timing']}",
        f"{'mode':<9} {'moeify ÷':<24} {'tokens/s':>8} {'min÷min':>7} {'memory':>6}  details",
    ]
    for mode in ("eager", "compiled"):
        for name in TWINS:
            speed = next((r for r in rows if r.mode == f"train {mode}" and r.baseline == name), None)
            mem = next((r for r in rows if r.mode == f"peak memory {mode}" and r.baseline == name), None)
            if speed is None:
                why = [
                    f"{f['name']}: {f['error']}"
                    for f in info["failures"]
                    if f["mode"] == mode and f["name"] in ("moeify", name)
                ]
                lines.append(f"{mode:<9} {name:<24} {'failed':>8} {'':>7} {'':>6}  {'; '.join(why)}")
                continue
            memory, note = (f"{mem.ratio:.3f}", f"{speed.note}; {mem.note}") if mem else ("n/a", speed.note)
            lines.append(
                f"{mode:<9} {name:<24} {1 / speed.ratio:>8.3f} {1 / speed.min_ratio:>7.3f} {memory:>6}  {note}"
            )
    return "\n".join(lines)


def spec_from(args: argparse.Namespace, quick: bool) -> Spec:
    """The preset, with the --layers/--batch/--seq/--steps/--threads given."""
    changes = {k: getattr(args, k) for k in ("layers", "batch", "seq", "steps", "threads") if getattr(args, k, None)}
    return replace(PRESETS["quick" if quick else "full"], **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick preset: 4 layers, batch 4 x 256, 5 steps")
    for flag in ("layers", "batch", "seq", "steps"):
        parser.add_argument(
            f"--{flag}", type=int, help=f"override the preset's {flag} (full: {getattr(PRESETS['full'], flag)})"
        )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    parser.add_argument("--output", type=Path, help="also write the rows and details as JSON there")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    begun = start(args.child, child)
    if begun is None:
        return 0
    device, started, machine = begun
    spec = spec_from(args, args.quick)
    print(
        f"whole-model benchmark on {machine}, float32, {spec.label}, {spec.steps} steps, load {loadavg()}", flush=True
    )
    rows, info = measure(spec, device)
    verdicts = summary(rows, info)
    print(format_model_table(rows, info))
    finish(verdicts, rows, info, machine, started, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
