# Two entry points (see README): `make bench` (the main job) and `make test`. Both create .venv on first use.
#
# .venv is the users' stack: torch with torchvision (HF video processors need it; on x86_64 pip takes both
# from this machine's wheel store). `make test` installs the newest releases pyproject.toml allows (what a
# fresh `pip install vtprune` gets); `make bench` installs the exact versions of constraints-bench.txt, the ones
# the committed results in eval/results/ were made with. `make test-oldest` runs the suite at the oldest
# supported releases, without torchvision (the image-only install); CI (.ci/run) runs both.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,eval,ray,notebook,video
# extra requirements of the test install (the oldest-versions run pins transformers here)
PIN ?=
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3
BENCH_CONSTRAINTS ?= constraints-bench.txt
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH_SPEC ?= torch==2.13.0
OLDEST_PIN ?= transformers==5.23.0
BIN := $(VENV)/bin

.PHONY: bench demo test test-fast test-oldest setup setup-bench lint

# a venv with torch (and torchvision) only; torch stays fixed by a constraints file in every later install
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	printf '%s\n' $(TORCH_SPEC) > $(VENV)/torch-constraints.txt
	touch $@

# newest releases pyproject.toml allows; lmms-eval without its declared dependencies (pyproject, extra "eval")
$(VENV)/.tested: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -c $(VENV)/torch-constraints.txt -e ".[$(EXTRAS)]" $(PIN)
	$(BIN)/pip install -q -c $(VENV)/torch-constraints.txt --no-deps "$(LMMS_EVAL_SPEC)"
	$(BIN)/python -c "import torch, transformers; print('test stack: torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

# the exact versions the committed bench results were made with
$(VENV)/.bench: $(VENV)/.torch pyproject.toml $(BENCH_CONSTRAINTS)
	$(BIN)/pip install -q -c $(BENCH_CONSTRAINTS) -e ".[eval,notebook,video]"
	$(BIN)/pip install -q -c $(BENCH_CONSTRAINTS) --no-deps "$(LMMS_EVAL_SPEC)"
	touch $@

setup: $(VENV)/.tested

setup-bench: $(VENV)/.bench

bench: setup-bench
	HF_HUB_OFFLINE=1 $(BIN)/vtprune bench

demo: setup-bench
	HF_HUB_OFFLINE=1 $(BIN)/vtprune run --method divprune --budget 16

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

# the whole suite at the oldest supported releases, without torchvision
test-oldest:
	$(MAKE) test VENV=$(OLDEST_VENV) TORCH_SPEC="$(OLDEST_TORCH_SPEC)" EXTRAS=dev,eval,ray,notebook PIN="$(OLDEST_PIN)"

lint: setup
	$(BIN)/ruff check vtprune tests eval models
