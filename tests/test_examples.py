"""Smoke tests: every script in examples/ runs to the end in its quick mode and prints its key line.

Scripts are discovered, so a new example fails `test_every_example_has_quick_args` until it gets a
row in QUICK: the arguments of a run of a few seconds, and a regex its output must match. Each
runs in its own process (the venv's python, one thread, offline, in a temporary working
directory), two at a time (the CI machine has two cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OUT = "{out}"  # replaced by a fresh temporary directory

# script -> (quick arguments, regex the output must match)
QUICK: dict[str, tuple[list[str], str]] = {
    "upcycle_llm.py": (["--steps", "2", "--out", OUT], r"reload identical: True"),
    "custom_monitor.py": (["--steps", "2", "--out", OUT], r"monitored 2 steps, \d+ events"),
    "upcycle_minilm.py": (["--steps", "2", "--experts", "4"], r"verified: max \|moe - dense\| = \S+ \(\S+ of scale\)"),
    "train_dit_moe.py": (["--max-steps", "2", "--out", OUT], r"final_loss=[0-9.]+ steps=2 "),
    "train_llm_moe.py": (["--max-steps", "2", "--out", OUT], r"final_loss=[0-9.]+ steps=2 "),
    "lora_experts.py": (["--steps", "2", "--out", OUT], r"\[full\] reloaded adapter: max \|diff\| 0 "),
    "publish.py": (["--steps", "2", "--out", OUT], r"no token or endpoint: wrote the \d+ files a push would commit"),
    "recipe_router_init.py": ([], r"routing agreement with the domains at init: prompts [0-9.]+, random [0-9.]+"),
    "recipe_experts_from.py": ([], r"whole model vs source demo/code: \S+ of scale\nreload identical: True"),
    "recipe_drop_upcycling.py": ([], r"neurons re-initialised per expert: \[64, 64, 64, 64\] of 128"),
    "recipe_fine_grained.py": (
        ["--steps", "2"],
        r"identity at conversion: max \|moe - dense\| = \S+ of the logit scale\n.*\n.*"
        r"\nparameters: dense 106,816, MoE total 156,992, active per token 107,840",
    ),
}
# Examples planned but not written yet: skipped while absent; once a script exists it needs a QUICK row.
PLANNED: dict[str, str] = {}
TIMEOUT_S = 180
WORKERS = 2


def scripts() -> list[str]:
    return sorted(path.name for path in EXAMPLES.glob("*.py"))


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    args, _ = QUICK[script]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, str(EXAMPLES / script), *(str(out / "out") if a == OUT else a for a in args)]
    return subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Future]:
    """Start every selected example at once, WORKERS at a time; each test waits for its own."""
    selected = {
        item.callspec.params["script"]
        for item in request.session.items
        if item.originalname == "test_example_runs" and hasattr(item, "callspec")
    }
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {
        script: pool.submit(_run, script, tmp_path_factory.mktemp(script.removesuffix(".py")))
        for script in sorted(selected)
        if script in QUICK and (EXAMPLES / script).exists()
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_every_example_has_quick_args():
    missing = [s for s in scripts() if s not in QUICK]
    assert not missing, f"add a row to QUICK in {Path(__file__).name} (quick args, key output line) for: {missing}"
    assert not set(QUICK) & set(PLANNED), "a script in QUICK is still listed as PLANNED: remove it from PLANNED"


@pytest.mark.parametrize("script", sorted(set(scripts()) | set(QUICK) | set(PLANNED)))
def test_example_runs(script, runs):
    if not (EXAMPLES / script).exists():
        pytest.skip(f"examples/{script} does not exist yet ({PLANNED.get(script, 'listed in QUICK')})")
    if script not in QUICK:
        pytest.fail(f"examples/{script} has no QUICK row")
    result = runs[script].result()
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"examples/{script} exited with {result.returncode}:\n{output[-4000:]}"
    assert re.search(QUICK[script][1], output), (
        f"examples/{script}: no line matching {QUICK[script][1]!r}:\n{output[-4000:]}"
    )
