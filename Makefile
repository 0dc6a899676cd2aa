# lab: `make run` runs the SkipGPT pipeline, `make test` runs the test suite.
# Both create .venv on first use. LAB_DATA_DIR names the data root (see README.md).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export LAB_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv run test test-fast bench bench-cluster scaling-law clean

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

# Mechanism tests only: no end-to-end training runs and no SLURM jobs.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not slurm"

bench: venv
	$(PY) benchmarks/skipgpt_speed.py
	$(PY) benchmarks/overhead.py

# Start-up, submitit overhead and preemption cost on the local SLURM cluster (needs make slurm-up).
bench-cluster: venv
	$(PY) benchmarks/cluster.py

# The scaling-law ladder, batch sweep and fit (about 30 minutes on 2 CPU cores); see experiments/scaling_law/.
scaling-law: venv
	bash benchmarks/scaling_law.sh

clean:
	rm -rf logs outputs multirun wandb .pytest_cache

# A one-node SLURM cluster on localhost for the slurm tests (root; installs slurm-wlm and munge with apt).
.PHONY: slurm-up slurm-down
slurm-up:
	bash scripts/slurm_local.sh up

slurm-down:
	bash scripts/slurm_local.sh down
