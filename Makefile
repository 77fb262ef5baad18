# The two set-up commands: `make run` and `make test`. Both create .venv and install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
export OMP_NUM_THREADS ?= 2

.PHONY: run test test-fast lint format typecheck bench default-model clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/cmamba serve --host 0.0.0.0 --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/scan.py

# Rebuild the embedded default checkpoint from ../shared/data/sentiment-snippets (docs/TRAINING.md).
default-model: $(STAMP)
	$(BIN)/python scripts/build_default_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
