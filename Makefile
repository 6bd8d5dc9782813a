# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
# torch is installed first, pinned, so that nothing later pulls a different (e.g. CUDA) build:
# on this project's CPU machines torch==2.13.0 is the local CPU build. On a GPU machine use e.g.
# `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
B ?= sft

.PHONY: demo test test-fast bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/posttrain demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check posttrain tests benchmarks
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/$(B).py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check posttrain tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
