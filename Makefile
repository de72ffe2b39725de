# Every target sets up .venv on first use. The CPU build of torch is pinned so pip never pulls a
# multi-GB CUDA build on a CPU machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

quickstart: $(STAMP)
	$(BIN)/visualrwkv quickstart

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_wkv.py

clean:
	rm -rf $(VENV) *.egg-info
