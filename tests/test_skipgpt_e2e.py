"""End-to-end SkipGPT runs through `run.py` and the `make run` pipeline, on the real model and text."""

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

# Stage-1 settings that reach the target sparsity in a short CPU run; see experiments/skipgpt/README.md.
STAGE1_STEPS = 300


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """`make run`'s pipeline on the real data root: full stage 1, a short stage 2."""
    out = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR)}
    result = subprocess.run(
        [sys.executable, "-m", "lab.methods.skipgpt.pipeline", f"--stage1-steps={STAGE1_STEPS}", "--stage2-steps=30",
         f"--out={out}", "data.batch_size=8", "data.seq_len=128", "data.max_val_tokens=32768"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_pipeline_prints_summary_table(pipeline):
    out, stdout = pipeline
    assert "SkipGPT pipeline summary" in stdout
    for row in ["dense perplexity", "stage-1 perplexity", "stage-2 perplexity", "target sparsity",
                "achieved attention sparsity", "achieved MLP sparsity", "measured prefill speedup"]:
        assert row in stdout
    assert (out / "summary.md").is_file()


def test_stage1_reaches_target_sparsity(pipeline):
    metrics = results(pipeline[0] / "stage1")["metrics"]
    assert metrics["sparsity_module"] == pytest.approx(metrics["target_sparsity"], abs=0.03)
    assert len(metrics["sparsity_attn_per_layer"]) == 5


def test_results_record_provenance(pipeline):
    record = results(pipeline[0] / "stage1")
    assert record["data"] == "real"
    assert len(record["config_hash"]) == 64
    assert record["git_commit"]
    assert record["global_step"] == STAGE1_STEPS
    assert all("train" in Path(p).name for p in record["data_detail"]["train_files"])


def test_dense_baseline_same_in_both_stages(pipeline):
    m1 = results(pipeline[0] / "stage1")["metrics"]
    m2 = results(pipeline[0] / "stage2")["metrics"]
    assert m2["dense_ppl"] == pytest.approx(m1["dense_ppl"], rel=1e-6)  # LoRA is off for the dense baseline


def test_stage2_lowers_perplexity(pipeline):
    m1 = results(pipeline[0] / "stage1")["metrics"]
    m2 = results(pipeline[0] / "stage2")["metrics"]
    assert m2["ppl"] < m1["ppl"]


def test_checkpoints_load_weights_only(pipeline):
    for stage in ("stage1", "stage2"):
        checkpoint = torch.load(pipeline[0] / stage / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] > 0
        assert checkpoint["state_dict"]
    routers = torch.load(pipeline[0] / "stage1" / "routers.pt", weights_only=True)
    assert routers["router_type"] == "linear"


def test_run_dir_holds_config_and_command(pipeline):
    run_dir = pipeline[0] / "stage1"
    assert len(list(run_dir.glob(".hydra/*/config.yaml"))) == 1
    provenance = json.loads((run_dir / "provenance.0.json").read_text())
    assert "experiment=skipgpt_stage1" in provenance["command"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert (run_dir / "csv" / "metrics.csv").is_file()


def test_pipeline_synthetic_when_data_missing(tmp_path):
    env = {**os.environ, "LAB_DATA_DIR": str(tmp_path / "absent")}
    result = subprocess.run(
        [sys.executable, "-m", "lab.methods.skipgpt.pipeline", "--stage1-steps=20", "--stage2-steps=5",
         "--synthetic-pretrain-steps=40",
         f"--out={tmp_path / 'out'}", "data.max_val_tokens=4096", "trainer.val_check_interval=10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NO REAL DATA" in result.stderr
    assert "DATA: SYNTHETIC" in result.stdout
    assert results(tmp_path / "out" / "stage2")["data"] == "synthetic"


def tiny_run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_lab("experiment=skipgpt_stage1", f"hydra.run.dir={run_dir}", *TINY, *extra)


def test_seed_zero_reproducible(tmp_path):
    first = tiny_run(tmp_path / "a", "trainer.max_steps=15", "seed=0")
    second = tiny_run(tmp_path / "b", "trainer.max_steps=15", "seed=0")
    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    assert results(tmp_path / "a")["metrics"] == results(tmp_path / "b")["metrics"]
    assert results(tmp_path / "a")["config_hash"] == results(tmp_path / "b")["config_hash"]


def test_resume_after_crash_continues_step_count(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["experiment=skipgpt_stage1", f"hydra.run.dir={run_dir}", *TINY, "trainer.max_steps=60",
                 "callbacks.model_checkpoint.every_n_train_steps=10"]
    env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR)}
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # a crash: no handler runs
    process.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    crashed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < crashed_at < 60

    result = run_lab(*overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr + (run_dir / "run.log").read_text()
    assert results(run_dir)["global_step"] == 60
    steps = [int(row["step"]) for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if row.get("train/loss")]
    assert min(steps) < crashed_at  # rows from before the crash are kept
    assert max(steps) == 59
    assert len(steps) == len(set(steps))  # and no step is logged twice
    assert len(list(run_dir.glob("provenance.*.json"))) == 2
    assert len(list(run_dir.glob(".hydra/*/config.yaml"))) == 2


def test_finished_run_dir_is_rejected(tmp_path):
    first = tiny_run(tmp_path / "run", "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    (first_config,) = (tmp_path / "run").glob(".hydra/*/config.yaml")
    saved = first_config.read_text()
    again = tiny_run(tmp_path / "run", "trainer.max_steps=2", "method.target_sparsity=0.5")
    assert again.returncode == 2
    assert "contains a finished run" in again.stderr
    assert first_config.read_text() == saved


def test_bad_data_file_fails_before_model(tmp_path):
    root = tmp_path / "data"
    (root / "text" / "tinystories").mkdir(parents=True)
    (root / "text" / "tinystories" / "x_train.txt").write_bytes(b"fine text\n\xfe\n")
    (root / "text" / "tinystories" / "tinystories_val.txt").write_text("ok\n")
    result = run_lab("experiment=skipgpt_stage1", f"paths.data_dir={root}", f"paths.log_dir={tmp_path / 'logs'}")
    assert result.returncode == 2
    assert "x_train.txt line 2 is not valid UTF-8" in result.stderr


def test_missing_data_root_fails_clearly(tmp_path):
    result = run_lab("experiment=skipgpt_stage1", f"paths.log_dir={tmp_path}", env={"LAB_DATA_DIR": ""})
    assert result.returncode == 2
    assert "the data root is not set: export LAB_DATA_DIR" in result.stderr


def test_wandb_offline_run_finishes(tmp_path):
    result = tiny_run(tmp_path / "run", "trainer.max_steps=3", "logger=wandb", "logger.wandb.mode=offline")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


def test_multirun_jobs_get_own_dirs_and_wandb_runs(tmp_path):
    result = run_lab("-m", "experiment=skipgpt_stage1", *TINY, "trainer.max_steps=2", "logger=wandb",
                     "method.target_sparsity=0.25,0.4", f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(tmp_path.glob("skipgpt_stage1/multiruns/*/[0-9]"))
    assert [job.name for job in jobs] == ["0", "1"]
    assert [results(job)["metrics"]["target_sparsity"] for job in jobs] == [0.25, 0.4]
    run_ids = [run.name.rsplit("-", 1)[-1] for job in jobs for run in (job / "wandb").glob("offline-run-*")]
    assert len(run_ids) == 2
    assert run_ids[0] != run_ids[1]


def test_debug_fast_dev_run(tmp_path):
    result = run_lab("experiment=skipgpt_stage1", "debug=fast_dev_run", *TINY, f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = tmp_path.glob("debug/runs/*")
    assert results(run_dir)["global_step"] == 1


def test_tensorboard_logger_writes_events(tmp_path):
    result = tiny_run(tmp_path / "run", "trainer.max_steps=3", "logger=tensorboard")
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_ctrl_c_marks_run_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "LAB_DATA_DIR": str(DATA_DIR)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "experiment=skipgpt_stage1", f"hydra.run.dir={run_dir}", *TINY,
         "trainer.max_steps=500", "callbacks.model_checkpoint.every_n_train_steps=5"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # A shell starts background jobs with SIGINT ignored, and Python keeps that; a terminal's Ctrl-C does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert "Detected KeyboardInterrupt" in stderr
    assert f"rerun with hydra.run.dir={run_dir} to resume" in (run_dir / "run.log").read_text()
