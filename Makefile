# Two commands are all the set-up: `make demo` and `make test`.
# Each creates .venv when missing, installs torch==2.13.0 first (a CPU build is on
# the index here), then the package with the extras it needs, then runs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# --no-compile: Python compiles what it imports on first import, not all of torch at install (46 s against 90-117 s)
PIP     := $(BIN)/python -m pip install -q --disable-pip-version-check --no-compile
OUT     ?= out/demo
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint typecheck docs bench-step bench bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(PIP) torch==2.13.0
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[diffusers,metrics,plot]"
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(PIP) -e ".[dev,video]"
	touch $@

demo: $(VENV)/.demo
	HF_HUB_OFFLINE=1 $(BIN)/ertacache demo --model digits --out $(OUT)/digits
	HF_HUB_OFFLINE=1 $(BIN)/ertacache demo --model moving-digits --out $(OUT)/moving-digits

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests scripts training

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# the API reference from the docstrings (docs/api); any warning fails the build
docs: $(VENV)/.dev
	$(BIN)/python -m sphinx -W --keep-going -q -E -b html docs/api out/api

test: lint typecheck docs
	# two workers, one file each at a time (a file's module fixtures are made once); torch runs one thread per test;
	# the 20 slowest tests are listed at the end (the suite's budget: 15 minutes on 2 cores)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile --durations=20

bench-step: $(VENV)/.demo
	HF_HUB_OFFLINE=1 $(BIN)/ertacache step-cost

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
