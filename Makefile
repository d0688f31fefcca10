# Two entry points (see README): `make bench` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3
BIN := $(VENV)/bin

.PHONY: bench demo test test-fast setup lint

$(BIN)/vtprune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev,eval,ray,notebook]"
	# lmms-eval without its declared dependencies (see pyproject.toml, extra "eval")
	$(BIN)/pip install -q -c $(VENV)/constraints.txt --no-deps "$(LMMS_EVAL_SPEC)"
	touch $@

setup: $(BIN)/vtprune

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/vtprune bench

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/vtprune run --method divprune --budget 16

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check vtprune tests
