"""Tests of the local SLURM cluster from scripts/slurm_local.sh: partitions, batch jobs, 2-task steps, preemption.

    make slurm-up
    LAB_REQUIRE_SLURM=1 .venv/bin/python -m pytest -q -m slurm tests/test_slurm_cluster.py
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from slurm_support import (
    job_field,
    node_cpus,
    partitions,
    release_requeued,
    run_slurm,
    sbatch,
    slurm_cluster,  # noqa: F401  (fixture, used through pytestmark)
    wait_for_job_state,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# The preempted job's first run: it records each SIGTERM and keeps running after the first one, so that
# SLURM itself ends the job when the partition's GraceTime has passed, and requeues it. The rerun exits at once.
VICTIM_SCRIPT = """\
#!/bin/bash
marker=$1
echo "start restart=${SLURM_RESTART_COUNT:-0}" >> "$marker"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
terms=0
on_term() {
    terms=$((terms + 1))
    echo "sigterm $terms" >> "$marker"
    if [ "$terms" -ge 2 ]; then exit 0; fi
}
trap on_term TERM
while true; do sleep 1; done
"""


@pytest.fixture
def submitted():
    """List of job ids that a test appends to; the jobs still queued or running are cancelled afterwards."""
    job_ids: list[int] = []
    yield job_ids
    if job_ids:
        subprocess.run(["scancel", *map(str, job_ids)], capture_output=True)


def wait_for_line(path: Path, line: str, timeout: float) -> bool:
    """Poll a file every 0.2 s until it contains `line`; return whether it did within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return True
        time.sleep(0.2)
    return False


def test_cluster_partitions():
    names = partitions()
    assert "debug" in names
    assert "urgent" in names
    assert "debug*" in run_slurm("sinfo", "-h", "-o", "%P").split()  # sinfo marks the default partition with *


def test_batch_job_writes_file(tmp_path, submitted):
    out = tmp_path / "hello.txt"
    submitted.append(sbatch("-p", "debug", "-o", str(tmp_path / "slurm.out"), "--wrap", f"echo hello > {out}",
                            name="batch"))
    assert wait_for_job_state(submitted[0], "COMPLETED", timeout=30) == "COMPLETED"
    assert out.read_text() == "hello\n"


def test_srun_two_tasks(tmp_path, submitted):
    if node_cpus() < 2:
        pytest.skip("the node has fewer than 2 CPUs")
    out = tmp_path / "slurm.out"
    submitted.append(sbatch("-p", "debug", "-N", "1", "-n", "2", "-o", str(out),
                            "--wrap", "srun bash -c 'echo rank=$SLURM_PROCID'", name="srun2"))
    assert wait_for_job_state(submitted[0], "COMPLETED", timeout=30) == "COMPLETED"
    assert sorted(out.read_text().split()) == ["rank=0", "rank=1"]


def test_preemption_requeues_job(tmp_path, submitted):
    victim = tmp_path / "victim.sh"
    victim.write_text(VICTIM_SCRIPT)
    marker = tmp_path / "marker.txt"

    # A job step in `debug` (through srun, as submitit starts its jobs): SLURM signals steps, not the batch shell.
    victim_id = sbatch("-p", "debug", "-n", "1", "-o", str(tmp_path / "victim.out"),
                       "--wrap", f"srun bash {victim} {marker}", name="victim")
    submitted.append(victim_id)
    assert wait_for_line(marker, "start restart=0", timeout=30), f"job {victim_id} did not start within 30 s"

    # A job in `urgent` that needs every CPU of the node preempts it.
    urgent_id = sbatch("-p", "urgent", "-N", "1", "-n", str(node_cpus()), "-o", str(tmp_path / "urgent.out"),
                       "--wrap", "sleep 1", name="urgent")
    submitted.append(urgent_id)
    assert wait_for_line(marker, "sigterm 1", timeout=20), f"job {victim_id} got no SIGTERM within 20 s"

    # SLURM ends and requeues the job once GraceTime (30 s) has passed, which took 48 to 60 s here.
    state = wait_for_job_state(victim_id, {"PENDING", "REQUEUED", "PREEMPTED"}, timeout=75)
    assert state in {"PENDING", "REQUEUED", "PREEMPTED"}
    assert job_field(victim_id, "Restarts") == "1"
    assert wait_for_job_state(urgent_id, "COMPLETED", timeout=30) == "COMPLETED"

    release_requeued(victim_id)
    assert wait_for_job_state(victim_id, "COMPLETED", timeout=30) == "COMPLETED"
    assert "start restart=1" in marker.read_text().splitlines()
