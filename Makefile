# Two entry points: `make test` and `make demo`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nitpicky (-n): every cross-reference must resolve; -W: any warning fails the build.
SPHINX := $(BIN)/sphinx-build -n -W --keep-going -q -b html docs docs/_build/html

.PHONY: test demo docs browser-check lint format install clean gpu-study

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
	$(SPHINX)

# glibc allocator thresholds keep CPU step times steady (docs/quickstart.md, "Environment")
demo: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
		$(BIN)/python -m spheretorch compare --preset cpu-small --out runs/demo

# The one-call GPU study (docs/results.md): CUDA by default, at most ~8 minutes on one H200.
gpu-study: $(STAMP)
	$(BIN)/python benchmarks/gpu_study.py

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
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
