"""Run directories: provenance on start, a status marker, and resume from `checkpoints/last.ckpt`.

A run directory is the Hydra output directory of one job. It contains the composed config (`.hydra/`),
the command and git state of every start (`provenance.N.json`), `checkpoints/last.ckpt`, the logs,
`results.json` and `status.json`. Rerunning into a directory that has `last.ckpt` resumes from it; a directory whose run
finished is rejected, because writing into it would mix two runs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import traceback
from pathlib import Path

from lab.core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """Commit hash and whether the work tree differs from it; 'unknown' outside a git checkout."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        diff = git("diff", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "unknown", "dirty": None, "diff": ""}
    return {"commit": commit, "dirty": bool(diff), "diff": diff}


def is_rank_zero() -> bool:
    """True in the process that owns the run directory: rank 0, or the only process."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


class RunDir:
    """One job's output directory and the rules for reusing it.

    Only rank 0 writes the status and provenance files; other ranks of a multi-process run share the directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.last_checkpoint = self.checkpoints / "last.ckpt"
        self.status_file = self.path / "status.json"

    def status(self) -> str | None:
        if not self.status_file.exists():
            return None
        return json.loads(self.status_file.read_text()).get("status")

    def start(self) -> None:
        """Mark the run as running and save the command and git state; reject a finished run."""
        if self.status() == "finished":
            raise ConfigError(
                f"run directory {self.path} contains a finished run (see its results.json); "
                "start a new run directory instead of writing into it."
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if not is_rank_zero():
            return
        git = git_state()
        provenance = {
            "command": [sys.executable, *sys.argv],
            "cwd": os.getcwd(),
            "git_commit": git["commit"],
            "git_dirty": git["dirty"],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        attempt = 0
        while (self.path / f"provenance.{attempt}.json").exists():
            attempt += 1  # a resumed run keeps the record of every start
        (self.path / f"provenance.{attempt}.json").write_text(json.dumps(provenance, indent=2))
        if git["diff"]:
            (self.path / f"git.{attempt}.diff").write_text(git["diff"])
        self._write_status("running")

    def finish(self, ok: bool, error: BaseException | None = None, status: str = "failed") -> None:
        """Record the end of the run: `finished`, or `status` (failed, interrupted) with the traceback."""
        if not is_rank_zero():
            return
        extra = {}
        if error is not None:
            extra["error"] = "".join(traceback.format_exception(error)).strip()
        self._write_status("finished" if ok else status, **extra)

    def _write_status(self, status: str, **extra) -> None:
        record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.status_file)

    def wandb_run_id(self) -> str:
        """The W&B run id of this run directory, created on first use, so a resumed or requeued run
        continues the same W&B run instead of starting a new one."""
        path = self.path / "wandb_run_id"
        if path.exists():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        if is_rank_zero():
            self.path.mkdir(parents=True, exist_ok=True)
            path.write_text(run_id + "\n")
        return run_id

    def resolve_checkpoint(self, ckpt_path: str | None) -> str | None:
        """Checkpoint to resume from: `None` resumes from last.ckpt when present, `last` requires it."""
        if ckpt_path is None:
            return str(self.last_checkpoint) if self.last_checkpoint.exists() else None
        if ckpt_path == "last":
            if not self.last_checkpoint.exists():
                raise ConfigError(
                    f"ckpt_path=last but {self.last_checkpoint} does not exist; pass hydra.run.dir=RUN_DIR "
                    "of the run to resume, or drop ckpt_path to start a new run."
                )
            return str(self.last_checkpoint)
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path {ckpt_path} does not exist; pass the path of a .ckpt file or 'last'.")
        return ckpt_path


def write_json(path: Path, record: dict) -> None:
    """Write JSON atomically, so a crash never leaves a half-written results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
