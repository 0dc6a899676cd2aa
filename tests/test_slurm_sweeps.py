"""Sweeps on the local SLURM cluster through the slurm launcher: own run directories and W&B runs per job,
preemption by a higher-priority job with requeue and an exact resume, and 2-task DDP jobs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, ROOT, TINY, results, run_lab
from slurm_support import (  # noqa: F401  (slurm_cluster is a fixture)
    cancel_all, node_cpus, release_requeued, sbatch, slurm_cluster, wait_for_job_state,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

SLURM = ["hydra/launcher=slurm", "hydra.launcher.name=labtest-sweep", "hydra.launcher.timeout_min=15"]
DETERMINISTIC = ["method.alpha=0", "method.noise_scale_start=0", "method.noise_scale_end=0"]


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    yield
    cancel_all()


def first_job_id(sweep_dir: Path, timeout: float = 60) -> str:
    """The SLURM id of the first job of a sweep, from submitit's folder SWEEP_DIR/.submitit/<id>
    (`<id>` is `N_0` for an array job, `N` when the sweep has one job)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = sorted(p.name for p in (sweep_dir / ".submitit").glob("*") if p.is_dir())
        if ids:
            return ids[0]
        time.sleep(0.2)
    raise TimeoutError(f"no submitit job folder appeared under {sweep_dir / '.submitit'} in {timeout} s")


def test_two_job_sweep_own_dirs_wandb(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_lab("-m", "experiment=skipgpt_stage1", *SLURM, *TINY, "trainer.max_steps=2", "logger=wandb",
                     "logger.wandb.mode=offline", "method.target_sparsity=0.25,0.4", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [sweep / "0", sweep / "1"]
    assert [results(job)["metrics"]["target_sparsity"] for job in jobs] == [0.25, 0.4]
    slurm_ids = [json.loads((job / "provenance.0.json").read_text())["slurm_job_id"] for job in jobs]
    assert None not in slurm_ids
    assert slurm_ids[0] != slurm_ids[1]  # each ran as its own SLURM job
    run_ids = [(job / "wandb_run_id").read_text().strip() for job in jobs]
    assert run_ids[0] != run_ids[1]
    for job, run_id in zip(jobs, run_ids):
        (offline_run,) = (job / "wandb").glob("offline-run-*")
        assert offline_run.name.endswith(run_id)


def test_preempted_job_resumes_exactly(tmp_path):
    common = ["experiment=skipgpt_stage1", *TINY, "trainer.max_steps=200", "trainer.val_check_interval=100",
              "callbacks.model_checkpoint.every_n_train_steps=10"]
    reference = run_lab(*common, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    sweep = tmp_path / "sweep"
    env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR), "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-m", *common, *SLURM, f"hydra.sweep.dir={sweep}"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id = first_job_id(sweep)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.1)
    assert last.exists(), "the job wrote no checkpoint"
    # A job in the higher-priority partition that needs every CPU preempts ours. The cluster sends the job's
    # own signal at preemption (submitit's USR2, as before a time-out); lab checkpoints, submitit requeues.
    urgent = sbatch("-p", "urgent", "-n", str(node_cpus()), "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 1",
                    name="urgent")

    wait_for_job_state(job_id, {"PENDING", "REQUEUED", "REQUEUE_HOLD"}, timeout=120)
    wait_for_job_state(urgent, "COMPLETED", timeout=120)
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    release_requeued(job_id)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-3000:]

    run_dir = sweep / "0"
    assert 10 < stopped_at < 200, "the checkpoint was not written at the signal"
    assert f"at step {stopped_at} after SIGUSR2" in (run_dir / "run.log").read_text()
    provenance = sorted(run_dir.glob("provenance.*.json"))
    assert len(provenance) == 2  # the same run directory, started twice
    assert results(run_dir)["global_step"] == 200
    assert results(run_dir)["metrics"] == results(tmp_path / "reference")["metrics"]
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert len(steps) == len(set(steps))  # no step trained (and logged) twice


def test_ddp_two_tasks_per_job(tmp_path):
    common = ["experiment=skipgpt_stage1", *TINY, *DETERMINISTIC, "trainer.max_steps=4"]
    reference = run_lab(*common, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    sweep = tmp_path / "sweep"
    result = run_lab("-m", *common, *SLURM, "trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=2",
                     "data.batch_size=4", "method.target_sparsity=0.25,0.4", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".") and p.is_dir()) == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "sweep"]  # no stray run directories
    expected = results(tmp_path / "reference")["metrics"]["loss"]
    for job in ("0", "1"):
        assert results(sweep / job)["global_step"] == 4
        assert results(sweep / job)["metrics"]["loss"] == pytest.approx(expected, rel=1e-5)
        assert not (sweep / job / ".ddp").exists()  # SLURM started the ranks, not lab
