"""Shared fixtures: the data root, a loaded tiny model, and a way to run `run.py` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LAB_DATA_DIR") or ROOT.parent / "shared" / "data")
MODEL_DIR = DATA_DIR / "models" / "stories260K-hf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert MODEL_DIR.is_dir(), f"the tests need the data root; {MODEL_DIR} is missing (set LAB_DATA_DIR)"
    return DATA_DIR


@pytest.fixture(scope="session")
def model_dir(data_dir) -> Path:
    return MODEL_DIR


def run_lab(*overrides: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python run.py OVERRIDES` in a subprocess, as a user would, with the data root set."""
    full_env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR), "PYTHONPATH": str(ROOT)}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


# Small and fast settings for end-to-end runs on the real model and text.
TINY = [
    "data.seq_len=64",
    "data.batch_size=8",
    "data.max_train_tokens=32768",
    "data.max_val_tokens=4096",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=1",
    "eval.measure_speed=false",
]
