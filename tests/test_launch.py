"""Launching on one machine: failed-job isolation, sweep summary, run directories, launcher geometry, DDP under
Hydra, preemption signals, W&B per job, and checkpoints of every experiment loading with weights_only=True."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, ROOT, TINY, results, run_lab

pytestmark = pytest.mark.slow

# Stage 1 without Gumbel noise and without the sparsity term: the loss is a plain per-token mean, so
# 2-process DDP with half the batch per rank must match 1 process with the whole batch.
DETERMINISTIC = ["method.alpha=0", "method.noise_scale_start=0", "method.noise_scale_end=0"]


def status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def train_steps(run_dir: Path) -> list[int]:
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]


def test_failed_job_does_not_stop_sweep(tmp_path):
    result = run_lab("-m", "experiment=skipgpt_stage1", *TINY, "trainer.max_steps=2",
                     "trainer.precision=32-true,not-a-precision,32-true", f"paths.log_dir={tmp_path}")
    assert result.returncode == 1
    (sweep,) = tmp_path.glob("skipgpt_stage1/multiruns/*")
    assert [status(sweep / str(job))["status"] for job in range(3)] == ["finished", "failed", "finished"]
    assert "Traceback" in status(sweep / "1")["error"]
    assert "Traceback" in (sweep / "1" / "run.log").read_text()
    assert "1 of 3 jobs did not finish" in result.stderr
    assert "job 1 (trainer.precision=not-a-precision): failed" in result.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [row["status"] for row in rows] == ["finished", "failed", "finished"]
    assert rows[0]["loss"] and not rows[1]["loss"]


def test_sweep_relaunch_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    command = ["-m", "experiment=skipgpt_stage1", *TINY, "trainer.max_steps=2", "method.target_sparsity=0.25,0.4",
               f"hydra.sweep.dir={sweep}"]
    first = run_lab(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    table = first.stdout.split("sweep summary", 1)[1]
    assert "method.target_sparsity=0.25" in table
    assert "method.target_sparsity=0.4" in table

    again = run_lab(*command)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "job already finished" in again.stderr + (sweep / "0" / "run.log").read_text()
    assert len(list((sweep / "0").glob("provenance.*.json"))) == 1  # not started again
    assert len(list((sweep / "1").glob("provenance.*.json"))) == 1


def test_same_second_launches_get_own_dirs(tmp_path):
    env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR)}
    command = [sys.executable, str(ROOT / "run.py"), "experiment=skipgpt_stage1", *TINY, "debug=fast_dev_run",
               f"paths.log_dir={tmp_path}"]
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    run_dirs = sorted(tmp_path.glob("debug/runs/*"))
    assert len(run_dirs) == 2
    assert run_dirs[0].name[:19] == run_dirs[1].name[:19]  # started in the same second ...
    assert all(status(d)["status"] == "finished" for d in run_dirs)  # ... and neither wrote into the other


def test_launcher_geometry_mismatch_rejected(tmp_path):
    started = time.time()
    result = run_lab("-m", "experiment=skipgpt_stage1", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2",
                     "hydra.launcher.tasks_per_node=1", f"paths.log_dir={tmp_path}")
    assert result.returncode != 0
    assert "hydra.launcher.tasks_per_node=1 but trainer.devices=2" in result.stderr
    assert time.time() - started < 60
    assert not list(tmp_path.glob("**/.submitit"))  # nothing was submitted


def test_local_launcher_rejects_several_tasks(tmp_path):
    result = run_lab("-m", "experiment=skipgpt_stage1", "hydra/launcher=submitit_local",
                     "hydra.launcher.tasks_per_node=2", f"paths.log_dir={tmp_path}")
    assert result.returncode != 0
    assert "hydra.launcher.tasks_per_node=2 with the local submitit launcher" in result.stderr


def test_submitit_local_sweep_runs_jobs(tmp_path):
    result = run_lab("-m", "experiment=skipgpt_stage1", "hydra/launcher=submitit_local", *TINY,
                     "trainer.max_steps=2", "method.target_sparsity=0.25,0.4", f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = tmp_path.glob("skipgpt_stage1/multiruns/*")
    assert [results(sweep / job)["metrics"]["target_sparsity"] for job in ("0", "1")] == [0.25, 0.4]
    assert list((sweep / ".submitit").iterdir())


def test_ddp_two_processes_match_one(tmp_path):
    common = ["experiment=skipgpt_stage1", *TINY, *DETERMINISTIC, "trainer.max_steps=6", f"paths.log_dir={tmp_path}"]
    one = run_lab(*common, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}")
    two = run_lab(*common, "trainer=ddp", "trainer.devices=2", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "started DDP ranks 1..1" in (tmp_path / "two" / "run.log").read_text()
    assert results(tmp_path / "two")["global_step"] == 6
    assert results(tmp_path / "two")["metrics"]["loss"] == pytest.approx(results(tmp_path / "one")["metrics"]["loss"], rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray run directories


def test_ddp_inside_multirun_makes_only_job_dirs(tmp_path):
    result = run_lab("-m", "experiment=skipgpt_stage1", *TINY, *DETERMINISTIC, "trainer.max_steps=3", "trainer=ddp",
                     "trainer.devices=2", "data.batch_size=4", "method.target_sparsity=0.25,0.4",
                     f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    sweeps = list(tmp_path.glob("*/multiruns/*"))
    assert len(sweeps) == 1  # the DDP ranks did not start sweeps of their own
    assert list(tmp_path.glob("*/runs")) == []
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    assert [status(sweeps[0] / job)["status"] for job in ("0", "1")] == ["finished", "finished"]


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    common = ["experiment=skipgpt_stage1", *TINY, "trainer.max_steps=80", "trainer.val_check_interval=40",
              "callbacks.model_checkpoint.every_n_train_steps=10"]
    reference = run_lab(*common, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "preempted"
    env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR)}
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *common, f"hydra.run.dir={run_dir}"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(0.3)  # a few steps past the periodic checkpoint
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 10 < stopped_at < 80, "the checkpoint was not written at the signal"
    assert status(run_dir)["status"] == "interrupted"
    assert f"at step {stopped_at} after SIGTERM" in (run_dir / "run.log").read_text()

    resumed = run_lab(*common, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert results(run_dir)["metrics"] == results(tmp_path / "reference")["metrics"]
    steps = train_steps(run_dir)
    assert len(steps) == len(set(steps))  # no step was trained (and logged) twice


def test_wandb_mode_follows_each_job(tmp_path):
    # Job 0 runs offline; job 1 sets no mode, so it must follow WANDB_MODE=disabled from the environment.
    # Lightning's own logger with offline=True would have set WANDB_MODE for the rest of the process.
    result = run_lab("-m", "experiment=skipgpt_stage1", *TINY, "trainer.max_steps=2", "logger=wandb",
                     "logger.wandb.mode=offline,null", f"paths.log_dir={tmp_path}", env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = tmp_path.glob("skipgpt_stage1/multiruns/*")
    offline_runs = list((sweep / "0" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert offline_runs[0].name.endswith((sweep / "0" / "wandb_run_id").read_text().strip())
    assert not list((sweep / "1").glob("wandb/offline-run-*"))


def test_wandb_run_id_kept_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = ["experiment=skipgpt_stage1", *TINY, "logger=wandb", "logger.wandb.mode=offline",
              f"hydra.run.dir={run_dir}"]
    first = run_lab(*common, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (run_dir / "status.json").write_text(json.dumps({"status": "interrupted"}))  # as if preempted after the last step
    again = run_lab(*common, "trainer.max_steps=4")
    assert again.returncode == 0, again.stderr[-2000:]
    run_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    assert all(d.name.endswith(run_id) for d in run_dirs)


def test_every_experiment_checkpoint_loads_weights_only(tmp_path):
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    runs = {}
    for experiment in experiments:
        extra = [f"stage1_run={runs['skipgpt_stage1']}"] if experiment == "skipgpt_stage2" else []
        run_dir = tmp_path / experiment
        result = run_lab(f"experiment={experiment}", *experiment_tiny(experiment), "trainer.max_steps=2", *extra,
                         f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, f"{experiment}: {result.stderr[-2000:]}"
        runs[experiment] = run_dir
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 2, experiment


def experiment_tiny(experiment: str) -> list[str]:
    """TINY overrides that apply to an experiment's data module (token-budgeted ones set batch_tokens)."""
    if experiment.startswith("scaling_law"):
        return ["data.seq_len=64", "data.batch_tokens=512", "data.max_train_tokens=32768", "data.max_val_tokens=4096",
                "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.d_model=32", "model.n_layer=2"]
    return TINY
