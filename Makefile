# The two set-up commands: `make run` and `make test`. Both create .venv and install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev
PORT ?= 8000
export OMP_NUM_THREADS ?= 2

.PHONY: run test test-fast system-deps lint format typecheck bench default-model clean

# `make run` installs the project's dependencies alone (what serving needs); everything else
# (`make test`, lint, bench...) the `dev` extra too, which holds the serving set.
$(SERVE_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	@touch $@

$(DEV_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@ $(SERVE_STAMP)

install: $(DEV_STAMP)

run: $(SERVE_STAMP)
	$(BIN)/cmamba serve --host 0.0.0.0 --port $(PORT)

# The Debian tools the integration tests use (Prometheus, Compose v1, HAProxy, Chromium):
# installed when missing as root; otherwise this stops first, printing the apt-get line.
system-deps:
	@bash scripts/system_deps.sh

test: system-deps
	@$(MAKE) --no-print-directory $(DEV_STAMP)
	$(BIN)/python -m pytest -q

# Without the slow tests and the integration tests (real processes and servers: cmamba serve,
# Ray, HAProxy, Prometheus, a browser, deployment tools); see the markers in pyproject.toml.
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(DEV_STAMP)
	$(BIN)/python bench/scan.py

# Rebuild the embedded default checkpoint (text, voice, face) from RAVDESS and FER2013 in
# $CMAMBA_DATA_DIR and the rated sentences in ../shared/data/sentiment-snippets; docs/TRAINING.md
# says where to get each. ABLATION=1 also runs the coupling ablation.
default-model: $(DEV_STAMP)
	$(BIN)/python scripts/build_default_model.py $(if $(ABLATION),--ablation,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
