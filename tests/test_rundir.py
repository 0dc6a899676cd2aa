"""Run directories: which checkpoint a run resumes from, and which directories it may not reuse."""

from __future__ import annotations

import json

import pytest

from lab.core.errors import ConfigError
from lab.core.rundir import RunDir


def test_fresh_dir_starts_without_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.start()
    assert run.resolve_checkpoint(None) is None
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "running"
    assert json.loads((tmp_path / "provenance.0.json").read_text())["git_commit"]


def test_existing_last_checkpoint_is_resumed(tmp_path):
    run = RunDir(tmp_path)
    run.start()
    run.last_checkpoint.write_bytes(b"x")
    assert run.resolve_checkpoint(None) == str(run.last_checkpoint)
    assert run.resolve_checkpoint("last") == str(run.last_checkpoint)


def test_ckpt_path_last_requires_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=last but .*last.ckpt does not exist"):
        run.resolve_checkpoint("last")


def test_missing_ckpt_path_message(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path .*nope.ckpt does not exist"):
        RunDir(tmp_path).resolve_checkpoint(str(tmp_path / "nope.ckpt"))


def test_finished_run_rejects_restart(tmp_path):
    run = RunDir(tmp_path)
    run.start()
    run.finish(ok=True)
    with pytest.raises(ConfigError, match="contains a finished run"):
        RunDir(tmp_path).start()


def test_failed_run_records_traceback_and_restarts(tmp_path):
    run = RunDir(tmp_path)
    run.start()
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        run.finish(ok=False, error=err)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed"
    assert "RuntimeError: boom" in status["error"]
    RunDir(tmp_path).start()
    assert (tmp_path / "provenance.1.json").is_file()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    RunDir(tmp_path).start()
    assert not (tmp_path / "status.json").exists()
