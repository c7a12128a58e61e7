# retrofit: `make demo`, `make test`, `make bench`, `make lint`.
# Each creates .venv when missing and re-installs only when pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline data (CIFAR-10 shards, Tiny Darknet weights): ../shared/data when it exists.
RETROFIT_DATA_DIR ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export RETROFIT_DATA_DIR
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch / torchvision first: the pinned builds (a CUDA build that also runs on CPU)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/retrofit demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	@set -e; for b in benchmarks/[!_]*.py; do echo "# $$b" >&2; $(PY) $$b; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
