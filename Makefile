# avatarl — `make help` lists the targets. Settings come from .env / the environment.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help venv test test-fast lint train-local config docs

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/avatarl: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

venv: $(BIN)/avatarl ## create .venv with the project and its dev tools

test: $(BIN)/avatarl ## run the test suite (CPU)
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/avatarl ## the suite without the end-to-end tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/avatarl ## ruff
	$(BIN)/ruff check avatarl tests train_generic.py scripts

config: $(BIN)/avatarl ## print the resolved settings and their sources
	$(BIN)/avatarl config

train-local: $(BIN)/avatarl ## train on this machine with the RL method that learns most from its reward
	@echo "Method: teacher-forced GRPO credited by log E[reward] (--preset grpo-log-reward, K = V/4 draws), the RL method that learns most from its reward in docs/learning.md; K_FRACTION=0.5 at twice the LR reaches supervised there at twice the draws"
	@if $(BIN)/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(BIN)/avatarl train --preset grpo-log-reward; \
	else \
		echo "No CUDA GPU: the small CPU setting (--preset cpu-small: avatarl/presets/cpu-small.env, same method)"; \
		$(BIN)/avatarl train --preset cpu-small; \
	fi

-include docker/make.mk

docs: $(BIN)/avatarl ## regenerate .env.example and the README settings table from the config docs
	$(BIN)/avatarl config --env-example > .env.example
	$(BIN)/python scripts/update_readme.py
