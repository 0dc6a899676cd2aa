# lab: `make run` runs the SkipGPT pipeline, `make test` runs the test suite.
# Both create .venv on first use. LAB_DATA_DIR names the data root (see README.md).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export LAB_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv run test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: dense baseline, stage 1 (routers), stage 2 (LoRA), speed measurement, summary table.
run: venv
	$(PY) -m lab.methods.skipgpt.pipeline

test: venv
	$(PY) -m pytest -q

# Mechanism tests only: no end-to-end training runs.
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) benchmarks/skipgpt_speed.py
	$(PY) benchmarks/overhead.py

clean:
	rm -rf logs outputs multirun wandb .pytest_cache

# A one-node SLURM cluster on localhost for the slurm tests (root; installs slurm-wlm and munge with apt).
.PHONY: slurm-up slurm-down
slurm-up:
	bash scripts/slurm_local.sh up

slurm-down:
	bash scripts/slurm_local.sh down
