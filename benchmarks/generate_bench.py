"""Whole-model inference: greedy `generate()` of a moeify-converted causal LM against transformers'
native Qwen2-MoE holding the same weights (`moeify.export` → `AutoModelForCausalLM.from_pretrained`),
the moeify model loaded as users load it (`moeify.from_pretrained`).

For each (batch, prompt) cell: time to first token (the prefill) and time per decode step, eager
(dynamic cache) and compiled (static cache + torch.compile through transformers' own
`compile_config` route), paired round by round in one process; peak memory of one generate() per
model in a fresh process; and a profile of one decode step by component, with the limit of
reading each hit expert's weights once.

    python benchmarks/generate_bench.py --quick           # `make bench` on CPU (reduced grid, see PRESETS)
    python benchmarks/generate_bench.py                   # every cell, 30 / 22 layers (a GPU's job)
    python benchmarks/generate_bench.py --model wide --layers 2 --cells 1x128 --modes eager

Shapes: SmolLM2-135M (random weights from its config, no download) and a wide model (TinyLlama-1.1B's
hidden 2048 / intermediate 5632) where expert weight reads dominate; 8 experts, top-2, 1 shared.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, whatever the cwd

import generate_profile
from model_bench import _memory_mb, _reset_peak, run_child
from results import Row, finish, start
from timing import loadavg, quartiles

NUM_EXPERTS, TOP_K, NUM_SHARED = 8, 2, 1
NATIVE = "transformers qwen2_moe"
CONTENDERS = ("moeify", NATIVE)
MODES = ("eager", "compiled")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # max |logits diff| / max |logits|
TARGET_SPEED, TARGET_MEMORY, TARGET_LIMIT = 1.0, 1.0, 1.5
SHAPES = {  # LlamaConfig fields; SmolLM2-135M's (HuggingFaceTB/SmolLM2-135M) and TinyLlama-1.1B's
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "wide": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
}  # fmt: skip


@dataclass(frozen=True)
class Spec:
    model: str  # a key of SHAPES
    layers: int
    cells: tuple[tuple[int, int], ...]  # (batch, prompt tokens), eager
    compiled_cells: tuple[tuple[int, int], ...]
    new_tokens: int = 32
    repeats: int = 5  # timed rounds per cell
    threads: int = 2
    modes: tuple[str, ...] = MODES

    @property
    def label(self) -> str:
        return f"{self.model} {self.layers}L"


ALL_CELLS = tuple((b, p) for p in (128, 1024) for b in (1, 8, 32))
# On 2 CPU cores a 32 x 1024 prefill of the 4-layer SmolLM2 alone is ~1 min per call; the quick
# presets keep the cells a CPU answers in minutes, compiled fewer still (every cell recompiles).
PRESETS = {
    "full": [Spec("smollm2", 30, ALL_CELLS, ALL_CELLS), Spec("wide", 22, ALL_CELLS, ALL_CELLS)],
    "quick": [
        Spec("smollm2", 4, ((1, 128), (8, 128), (32, 128), (1, 1024), (8, 1024)), ((1, 128), (8, 128)), 16),
        Spec("wide", 2, ((1, 128), (8, 128)), ((1, 128),), 16),
    ],
}


def config(spec: Spec):  # a LlamaConfig (transformers imported lazily)
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=spec.layers, max_position_embeddings=8192, rms_norm_eps=1e-5, **SHAPES[spec.model]
    )


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls crawl on CPU


def prepare(spec: Spec, directory: Path, device: torch.device) -> dict:
    """Random dense weights, converted, experts given independent noise (exact clones would hide a
    routing mismatch); saved by moeify and exported; both reloaded and compared."""
    from transformers import LlamaForCausalLM

    import moeify

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(spec))
    moeify.moeify(model, num_experts=NUM_EXPERTS, top_k=TOP_K, num_shared_experts=NUM_SHARED, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in moeify.moe_layers(model):
            for weight in (layer.experts.w_in, layer.experts.w_out):
                weight.add_(0.01 * torch.randn(weight.shape, generator=generator))
    model.eval()
    moeify.save_pretrained(model, directory / "moeify")
    moeify.export(model, directory / "native", "qwen2_moe")
    del model
    models = load(directory, device)
    ids = prompt_ids(spec, 1, 128, device)
    with torch.no_grad():
        logits = {name: m(input_ids=ids).logits.float() for name, m in models.items()}
    error = ((logits[NATIVE] - logits["moeify"]).abs().max() / logits["moeify"].abs().max()).item()
    dtype = str(dtype_for(device)).removeprefix("torch.")
    if not error <= TOLERANCE[dtype]:
        raise RuntimeError(f"the native model's logits differ from moeify's by {error:.2e} of their scale")
    texts = {name: generate(m, ids, spec.new_tokens, compiled=False) for name, m in models.items()}
    return {"logits_max_relative_error": error, "same_tokens": bool(torch.equal(*texts.values()))}


def load(directory: Path, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    import moeify

    dtype = dtype_for(device)
    ours = moeify.from_pretrained(directory / "moeify", device=device).to(dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(directory / "native", dtype=dtype).to(device).eval()
    return {"moeify": ours, NATIVE: theirs}


def prompt_ids(spec: Spec, batch: int, prompt: int, device: torch.device) -> torch.Tensor:
    vocab = SHAPES[spec.model]["vocab_size"]
    return torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2)).to(device)


@dataclass
class Clock:
    """A logits processor: generate() calls it once per new token, right after that token's
    forward, so its first stamp ends the prefill. On CUDA it waits for the device first."""

    sync: bool
    start: float = 0.0
    end: float = 0.0
    stamps: list[float] = field(default_factory=list)
    on_first: Callable[[], None] | None = None  # called once the prefill is done

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(self.now())
        if len(self.stamps) == 1 and self.on_first is not None:
            self.on_first()
        return scores

    def ttft(self) -> float:
        return self.stamps[0] - self.start

    def per_decode_step(self) -> float:
        """(end - first token) / (tokens - 1): each later token costs one decode forward."""
        return (self.end - self.stamps[0]) / max(len(self.stamps) - 1, 1)


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, *, compiled: bool, clock: Clock | None = None):
    """Greedy generate() of exactly `new_tokens` (tokens [B, prompt + new]), timed by `clock`."""
    from transformers import CompileConfig, LogitsProcessorList

    clock = clock or Clock(sync=ids.device.type == "cuda")
    kwargs: dict = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:  # transformers compiles the decode forward itself; on CPU only when told to
        compile_config = CompileConfig(mode="default", fullgraph=True)
        compile_config._compile_all_devices = True
        kwargs |= dict(cache_implementation="static", compile_config=compile_config)
    clock.start = clock.now()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([clock]), **kwargs
        )
    clock.end = clock.now()
    return out


def time_cells(spec: Spec, mode: str, models: dict, device: torch.device, log) -> dict:
    """{cell: {name: {"ttft_s": [...], "decode_s": [...], "warmup_s": [...]}}}: the contenders in
    rotating order, round by round, so that drift hits both alike."""
    compiled, results = mode == "compiled", {}
    for batch, prompt in spec.compiled_cells if compiled else spec.cells:
        ids, cell, t0 = prompt_ids(spec, batch, prompt, device), f"{batch}x{prompt}", time.perf_counter()
        record = results[cell] = {name: {"ttft_s": [], "decode_s": [], "warmup_s": []} for name in models}
        for name, model in models.items():  # compiled: the first calls compile (prefill and decode shapes)
            for _ in range(2 if compiled else 1):
                clock = Clock(device.type == "cuda")
                generate(model, ids, spec.new_tokens, compiled=compiled, clock=clock)
                record[name]["warmup_s"].append(clock.end - clock.start)
        names = list(models)
        for r in range(spec.repeats):
            for name in names[r % 2 :] + names[: r % 2]:
                clock = Clock(device.type == "cuda")
                generate(models[name], ids, spec.new_tokens, compiled=compiled, clock=clock)
                record[name]["ttft_s"].append(clock.ttft())
                record[name]["decode_s"].append(clock.per_decode_step())
        log(f"[generate {spec.label} {mode} {cell}: {time.perf_counter() - t0:.0f} s, load {loadavg()}]", flush=True)
    return results


def spec_of(fields: dict) -> Spec:
    """A Spec back from JSON (lists become the tuples it holds)."""
    cells = {key: tuple(map(tuple, fields[key])) for key in ("cells", "compiled_cells")}
    return Spec(**fields | cells | {"modes": tuple(fields["modes"])})


def child(job: dict) -> dict:
    """One job of `measure`, in a fresh process: prepare, time (one mode), memory (one model) or profile."""
    from transformers.utils import logging

    spec, device = spec_of(job["spec"]), torch.device(job["device"])
    torch.set_num_threads(spec.threads)
    logging.disable_progress_bar()
    directory = Path(job["directory"])
    if job["kind"] == "prepare":
        return prepare(spec, directory, device)
    if job["kind"] == "memory":
        return {"peak_mb": peak_memory(spec, directory, device, job["name"], tuple(job["cell"]))}
    models = load(directory, device)
    if job["kind"] == "time":
        return time_cells(spec, job["mode"], models, device, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    ids = prompt_ids(spec, 1, 128, device)
    run = {
        name: (lambda clock, m=m: generate(m, ids, spec.new_tokens, compiled=False, clock=clock))
        for name, m in models.items()
    }
    generate(models["moeify"], ids, spec.new_tokens, compiled=False)  # warm
    parts = {
        name: generate_profile.breakdown(m, "moeify" if name == "moeify" else "native", run[name], Clock)
        for name, m in models.items()
    }
    inputs = generate_profile.capture(models["moeify"], run["moeify"], Clock)
    return {
        "breakdown": parts,
        "replay": generate_profile.replay(models["moeify"], models[NATIVE], inputs, 3 * spec.repeats),
    }


def peak_memory(spec: Spec, directory: Path, device: torch.device, name: str, cell: tuple[int, int]) -> float:
    """MB that one eager generate() of `cell` adds above the loaded model, in a fresh process. A
    short generate() first: every weight page is touched (mmapped checkpoints) before the baseline."""
    model = load(directory, device)[name]
    generate(model, prompt_ids(spec, 1, 8, device), 2, compiled=False)
    gc.collect()
    _reset_peak(device)
    start = _memory_mb(device, peak=False)
    generate(model, prompt_ids(spec, *cell, device), spec.new_tokens, compiled=False)
    # At least 0: the resident set can shrink during a call (the allocator hands memory back).
    return max(_memory_mb(device, peak=True) - start, 0.0)


def measure(spec: Spec, device: torch.device, log=print) -> tuple[list[Row], dict]:
    info: dict = {"spec": asdict(spec), "label": spec.label, "device": device.type, "failures": []}
    with tempfile.TemporaryDirectory(prefix="moeify-generate-bench-") as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
        base = {"spec": asdict(spec), "device": device.type, "directory": tmp}
        t0 = time.perf_counter()
        try:
            info["check"] = run_child(base | {"kind": "prepare"}, env, __file__)
        except RuntimeError as error:
            info["failures"].append({"mode": "prepare", "error": str(error)})
            return [], info
        log(
            f"[generate {spec.label}: built, saved, exported, logits agree ({time.perf_counter() - t0:.0f} s)]",
            flush=True,
        )
        for mode in spec.modes:
            try:
                info[mode] = run_child(base | {"kind": "time", "mode": mode}, env, __file__)
            except RuntimeError as error:
                info["failures"].append({"mode": mode, "error": str(error)})
        cell = max(spec.cells, key=lambda c: c[0] * c[1])
        info["memory"] = {"cell": f"{cell[0]}x{cell[1]}"}
        for name in CONTENDERS:
            try:
                info["memory"][name] = run_child(base | {"kind": "memory", "name": name, "cell": cell}, env, __file__)[
                    "peak_mb"
                ]
            except RuntimeError as error:
                info["failures"].append({"mode": f"memory {name}", "error": str(error)})
        try:
            info["profile"] = run_child(base | {"kind": "profile"}, env, __file__)
        except RuntimeError as error:
            info["failures"].append({"mode": "profile", "error": str(error)})
        log(f"[generate {spec.label}: {time.perf_counter() - t0:.0f} s, load {loadavg()}]", flush=True)
    return rows(spec, info), info


def _ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float, float]:
    """(median, q1, q3) of the per-round ratios, and fastest ÷ fastest."""
    q1, median, q3 = quartiles([a / b for a, b in zip(ours, theirs)])
    return median, q1, q3, min(ours) / min(theirs)


def rows(spec: Spec, info: dict) -> list[Row]:
    out = []
    for mode in spec.modes:
        for cell, record in info.get(mode, {}).items():
            ours, theirs = record["moeify"], record[NATIVE]
            batch = int(cell.split("x")[0])
            for phase, key in (("prefill", "ttft_s"), ("decode", "decode_s")):
                median, q1, q3, fastest = _ratio(ours[key], theirs[key])
                ms = [1e3 * statistics.median(r[key]) for r in (ours, theirs)]
                note = (
                    f"tokens/s {1e3 * batch / ms[0]:.1f} vs {1e3 * batch / ms[1]:.1f}"
                    if phase == "decode"
                    else "time to first token"
                )
                if mode == "compiled":
                    note += f"; first call {ours['warmup_s'][0]:.0f} / {theirs['warmup_s'][0]:.0f} s"
                out.append(Row("generate", spec.label, f"{phase} {mode} {cell}", "moeify", NATIVE, median, q1, q3,
                               ms[0], ms[1], TARGET_SPEED, note, fastest))  # fmt: skip
    memory = info.get("memory", {})
    if memory.get("moeify") is not None and memory.get(NATIVE):
        ratio = memory["moeify"] / memory[NATIVE]
        note = f"{memory['moeify']:.0f} / {memory[NATIVE]:.0f} MB above the loaded model"
        out.append(Row("generate", spec.label, f"peak memory eager {memory['cell']}", "moeify", NATIVE, ratio, ratio,
                       ratio, None, None, TARGET_MEMORY, note))  # fmt: skip
    replay = info.get("profile", {}).get("replay")
    if replay:
        ratio, ms = replay["ratios"]["moeify ÷ limit"], replay["ms"]
        note = f"MoE blocks of one decode step, {replay['experts_read_per_layer']:.1f} experts read per layer"
        out.append(Row("generate", spec.label, "decode moe blocks 1x128", "moeify", "limit (hit experts read once)",
                       ratio, ratio, ratio, ms["moeify"], ms["limit"], TARGET_LIMIT, note))  # fmt: skip
    return out


def summary(found: list[Row], infos: list[dict]) -> list[dict]:
    """The issue's targets: moeify ÷ native time <= 1 in every cell (prefill and decode, eager and
    compiled), peak memory <= 1, a decode step's MoE blocks <= 1.5x their limit. A failure misses."""
    verdicts = []
    groups = {
        "time (prefill and decode) <= 1.0, every cell, eager": lambda r: r.mode.startswith(
            ("prefill eager", "decode eager")
        ),
        "time (prefill and decode) <= 1.0, every cell, compiled": lambda r: " compiled " in r.mode,
        "peak memory of generate() <= 1.0": lambda r: r.mode.startswith("peak memory"),
        "decode MoE blocks ÷ reading each hit expert once <= 1.5": lambda r: r.mode.startswith("decode moe"),
    }
    failures = [f"{info['label']} {f['mode']}: {f['error']}" for info in infos for f in info.get("failures", [])]
    for question, picks in groups.items():
        picked = [r for r in found if r.section == "generate" and picks(r)]
        if not picked and not failures:
            continue
        worst = max(picked, key=lambda r: r.ratio / r.target, default=None)
        verdicts.append({
            "question": f"generate(): moeify ÷ transformers' native MoE {question}",
            "target": worst.target if worst else None,
            "worst_ratio": None if worst is None else round(worst.ratio, 3),
            "met": worst is not None and all(r.met for r in picked) and not failures,
            "where": f"{worst.shape} {worst.mode}" if worst else failures[0],
        })  # fmt: skip
    return verdicts


def format_table(found: list[Row], info: dict) -> str:
    """One line per cell: time ratios (<= 1: moeify faster) and tokens/s; then memory, the limit,
    and the decode-step profile."""
    lines = [f"generate(), {info['label']}, {info['device']}, check: {info.get('check')}"]
    lines.append(
        f"{'phase / mode / cell':<28} {'moeify ÷ native':>15} {'IQR':>10} {'min÷min':>7}  ms (moeify / native)  note"
    )
    for r in found:
        ms = "" if r.candidate_ms is None else f"{r.candidate_ms:.1f} / {r.baseline_ms:.1f}"
        spread = f"{r.ratio_q1:.2f}–{r.ratio_q3:.2f}"
        fastest = "" if r.min_ratio is None else f"{r.min_ratio:.3f}"
        lines.append(f"{r.mode:<28} {r.ratio:>15.3f} {spread:>10} {fastest:>7}  {ms:<20}  {r.note}")
    for name, parts in info.get("profile", {}).get("breakdown", {}).items():
        lines.append(f"decode step (1x128), {name}, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    replay = info.get("profile", {}).get("replay")
    if replay:
        ms, ratios = replay["ms"], replay["ratios"]
        lines.append(
            f"decode step (1x128), MoE blocks replayed, ms: moeify {ms['moeify']:.2f}, native {ms['native']:.2f}, "
            f"limit {ms['limit']:.2f} (moeify ÷ native {ratios['moeify ÷ native']:.3f})"
        )
    lines += [f"FAILED {f['mode']}: {f['error']}" for f in info.get("failures", [])]
    return "\n".join(lines)


def specs_from(args: argparse.Namespace) -> list[Spec]:
    specs = PRESETS["quick" if args.quick else "full"]
    if args.model:
        specs = [s for s in specs if s.model == args.model]
    changes: dict = {k: getattr(args, k) for k in ("layers", "new_tokens", "repeats", "threads") if getattr(args, k)}
    if args.cells:
        cells = tuple(tuple(int(n) for n in c.split("x")) for c in args.cells.split(","))
        changes |= {"cells": cells, "compiled_cells": cells}
    if args.modes:
        changes["modes"] = tuple(args.modes.split(","))
    return [replace(s, **changes) for s in specs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CPU presets (4 / 2 layers, a reduced grid)")
    parser.add_argument("--model", choices=tuple(SHAPES), help="one model only")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--cells", help="batch x prompt cells, e.g. 1x128,8x1024 (eager and compiled)")
    parser.add_argument("--modes", help="eager,compiled (default both)")
    parser.add_argument("--new-tokens", type=int, dest="new_tokens")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    parser.add_argument("--output", type=Path, help="also write the rows and details as JSON there")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    begun = start(args.child, child)
    if begun is None:
        return 0
    device, started, machine = begun
    print(
        f"generate() benchmark on {machine}, {str(dtype_for(device)).removeprefix('torch.')}, load {loadavg()}",
        flush=True,
    )
    found, infos = [], []
    for spec in specs_from(args):
        spec_rows, info = measure(spec, device)
        print(format_table(spec_rows, info), flush=True)
        found, infos = found + spec_rows, infos + [info]
    verdicts = summary(found, infos)
    finish(verdicts, found, infos, machine, started, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
