# Two entry points: `make test` and `make demo`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nitpicky (-n): every cross-reference must resolve; -W: any warning fails the build.
SPHINX := $(BIN)/sphinx-build -n -W --keep-going -q -b html docs docs/_build/html

.PHONY: test test-floor gpu-check gpu-study gpu-study-optims demo docs browser-check lint format install clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check spheretorch tests benchmarks
	$(BIN)/ruff format --check spheretorch tests benchmarks
	$(BIN)/python -m pytest -q -n 2 tests
	$(BIN)/python benchmarks/gpu_check.py --device cpu --quick --out build/gpu_check_cpu_quick.md
	$(SPHINX)

# The suite on the oldest torch pyproject.toml declares (torch>=2.11): its own venv, the same
# tests (no lint, no docs). The CUDA wheel installs and runs on a CPU-only machine too.
FLOOR_TORCH ?= 2.11.0
FLOOR_VENV ?= .venv-floor
$(FLOOR_VENV)/.installed: pyproject.toml
	test -x $(FLOOR_VENV)/bin/python || $(PY) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q torch==$(FLOOR_TORCH)
	$(FLOOR_VENV)/bin/python -m pip install -q -e .[dev,notebooks]
	touch $(FLOOR_VENV)/.installed

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('$(FLOOR_TORCH)'), torch.__version__"
	$(FLOOR_VENV)/bin/python -m pytest -q -n 2 tests

# On a GPU machine: environment, the CUDA test lane, compiled-vs-eager gradients, optimizer
# steps, training throughput and a convergence check in one Markdown report (<= 8 min on one
# H200); GPU_CHECK_ARGS="--device cpu --quick" runs every part at toy sizes on a CPU.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# glibc allocator thresholds keep CPU step times steady (docs/quickstart.md, "Environment")
demo: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
		$(BIN)/python -m spheretorch compare --preset cpu-small --out runs/demo

# The one-call GPU study (docs/results.md): CUDA by default, at most ~8 minutes on one H200.
gpu-study: $(STAMP)
	$(BIN)/python benchmarks/gpu_study.py

# The GPU study's optimizer study (nGPT with six optimizers), a call of its own (<= ~8 min).
gpu-study-optims: $(STAMP)
	$(BIN)/python benchmarks/gpu_study.py --studies optims --out runs/gpu_study_optims

docs: $(STAMP)
	$(SPHINX)

# The built site in headless Chromium, offline (installs Debian's chromium when missing);
# screenshots of every page in docs/_build/browser-check/.
browser-check: docs
	$(BIN)/python docs/check_site.py

lint: $(STAMP)
	$(BIN)/ruff check spheretorch tests benchmarks
	$(BIN)/ruff format --check spheretorch tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format spheretorch tests benchmarks
	$(BIN)/ruff check --fix spheretorch tests benchmarks

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .ruff_cache .hypothesis
