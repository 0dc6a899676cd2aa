"""Helpers for tests that run jobs on the local SLURM cluster of `make slurm-up` (scripts/slurm_local.sh).

Tests import the `slurm_cluster` fixture and the helpers from here. Every job a test submits is named with
JOB_PREFIX, so `cancel_all()` cancels those and leaves other users' jobs on the shared cluster alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

JOB_PREFIX = "labtest-"
SKIP_MESSAGE = "no local SLURM cluster: run make slurm-up"
# Node states (sinfo %T) in which jobs can run; `planned` is an idle node that the backfill scheduler keeps
# for a pending job. sinfo appends a flag such as `*` (not responding) to a state when the node is unusable.
UP_STATES = {"idle", "mixed", "allocated", "completing", "planned"}
# Job states from which a job does not come back by itself.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def run_slurm(*args: str, timeout: float = 30) -> str:
    """Run a SLURM command and return its stdout; raise RuntimeError with its stderr when it fails."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def node_states() -> list[str]:
    """Return the state of each node as sinfo reports it (idle, mixed, drained, ...); [] when SLURM is absent or down."""
    if shutil.which("sinfo") is None:
        return []
    try:
        # sinfo takes about 9 s to give up on a stopped slurmctld; a running one responds in milliseconds.
        out = run_slurm("sinfo", "-h", "-N", "-o", "%T", timeout=5)
    except (RuntimeError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def partitions() -> list[str]:
    """Return the partition names, without the `*` that sinfo puts after the default one."""
    out = run_slurm("sinfo", "-h", "-o", "%P")
    return [line.strip().rstrip("*") for line in out.splitlines() if line.strip()]


def node_cpus() -> int:
    """Return the CPU count of the (first) node."""
    return int(run_slurm("sinfo", "-h", "-N", "-o", "%c").split()[0])


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip the test unless a SLURM node is up; with LAB_REQUIRE_SLURM=1 fail instead of skipping."""
    states = node_states()
    if any(state in UP_STATES for state in states):
        return
    if os.environ.get("LAB_REQUIRE_SLURM") == "1":
        pytest.fail(f"{SKIP_MESSAGE} (LAB_REQUIRE_SLURM=1; node states: {states or 'sinfo did not respond'})")
    pytest.skip(SKIP_MESSAGE)


def sbatch(*args: str, name: str) -> int:
    """Submit a batch job named JOB_PREFIX + name and return its job id."""
    out = run_slurm("sbatch", "--parsable", f"--job-name={JOB_PREFIX}{name}", *args)
    return int(out.strip().split(";")[0])


def job_state(job_id: int) -> str:
    """Return a job's state from scontrol (PENDING, RUNNING, COMPLETED, ...).

    scontrol shows a job until MinJobAge (300 s in slurm_local.sh's config) after it ended.
    """
    out = run_slurm("scontrol", "show", "job", "-o", str(job_id))
    for field in out.split():
        if field.startswith("JobState="):
            return field.removeprefix("JobState=")
    raise RuntimeError(f"scontrol show job {job_id} printed no JobState: {out.strip()}")


def job_field(job_id: int, key: str) -> str:
    """Return one field (`Restarts`, `Reason`, ...) of `scontrol show job`."""
    out = run_slurm("scontrol", "show", "job", "-o", str(job_id))
    for field in out.split():
        if field.startswith(f"{key}="):
            return field.removeprefix(f"{key}=")
    raise KeyError(f"scontrol show job {job_id} has no field {key}: {out.strip()}")


def wait_for_job_state(job_id: int, states: set[str] | str, timeout: float) -> str:
    """Poll the job every 0.5 s until its state is one of `states`; return that state.

    Raise TimeoutError with the last state seen after `timeout` seconds, and RuntimeError at once when the
    job reaches a final state (COMPLETED, FAILED, ...) that is not among `states`.
    """
    expected = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in expected:
            return state
        if state in FINAL_STATES:
            raise RuntimeError(f"job {job_id} ended as {state}, expected one of {sorted(expected)}; "
                               f"see `scontrol show job {job_id}`")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {state} (reason {job_field(job_id, 'Reason')}) after "
                               f"{timeout} s, expected one of {sorted(expected)}; see `scontrol show job {job_id}`")
        time.sleep(0.5)


def release_requeued(job_id: int) -> None:
    """Let a requeued job start now instead of after the BeginTime, about two minutes ahead, that SLURM gives it."""
    run_slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def cancel_all(prefix: str = JOB_PREFIX) -> list[int]:
    """Cancel every pending or running job whose name starts with `prefix`; return their ids."""
    out = run_slurm("squeue", "-h", "-o", "%i %j")
    job_ids = [int(line.split()[0]) for line in out.splitlines() if line.split()[1].startswith(prefix)]
    if job_ids:
        run_slurm("scancel", *map(str, job_ids))
    return job_ids
