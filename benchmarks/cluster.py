"""Measure the cluster path on the local SLURM cluster (`make slurm-up`) and print the figures.

    LAB_DATA_DIR=/path/to/data python benchmarks/cluster.py [--steps 200]

1. Start-up: the same SkipGPT stage-1 job run locally and through `hydra/launcher=slurm`; wall time of each
   command, and for the SLURM job the seconds from submission (SLURM's SubmitTime) to the job's start and to
   its first finished training step (the FirstStepLog line in run.log).
2. Preemption: the job is preempted by a job in the `urgent` partition once it has passed one periodic
   checkpoint (every 50 steps, the default interval). Printed: the step of the checkpoint written at the signal,
   the steps a periodic checkpoint alone would have lost, and the seconds from the restart to the first step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JOB = ["experiment=skipgpt_stage1", "data.seq_len=64", "data.batch_size=8", "data.max_train_tokens=32768",
       "data.max_val_tokens=4096", "trainer.limit_val_batches=1", "eval.measure_speed=false"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.name=labbench"]
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")


def run(*args: str) -> float:
    """Run `python run.py ARGS`; return its wall time in seconds, exit on failure."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"run.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def log_times(run_log: Path, pattern: str) -> list[float]:
    """Epoch times of the run.log lines that contain `pattern`."""
    times = []
    for line in run_log.read_text().splitlines():
        match = LOG_TIME.match(line)
        if match and pattern in line:
            stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S") + dt.timedelta(milliseconds=int(match.group(2)))
            times.append(stamp.timestamp())
    return times


def slurm_times(job_id: str) -> dict[str, float]:
    """SubmitTime and StartTime of a job from `scontrol show job`, as epoch seconds."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return {key: dt.datetime.strptime(fields[key], "%Y-%m-%dT%H:%M:%S").timestamp() for key in ("SubmitTime", "StartTime")}


def first_job_id(sweep: Path, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = [p.name for p in (sweep / ".submitit").glob("*") if p.is_dir()]
        if ids:
            return sorted(ids)[0]
        time.sleep(0.2)
    sys.exit(f"no job was submitted under {sweep}")


def measure_startup(out: Path, steps: int) -> None:
    local = run(*JOB, f"trainer.max_steps={steps}", f"hydra.run.dir={out / 'local'}")
    sweep = out / "slurm"
    slurm = run("-m", *JOB, *SLURM, f"trainer.max_steps={steps}", f"hydra.sweep.dir={sweep}")
    job_id = first_job_id(sweep)
    times = slurm_times(job_id)
    first_step = log_times(sweep / "0" / "run.log", "first training step done")[0]
    local_first = log_times(out / "local" / "run.log", "first training step done")[0]
    local_start = log_times(out / "local" / "run.log", "run directory:")[0]
    print(f"job: SkipGPT stage 1, {steps} steps, seq 64 x batch 8, on {os.cpu_count()} CPUs")
    print(f"  local run.py wall time                     {local:7.1f} s")
    print(f"  slurm launcher run.py wall time            {slurm:7.1f} s  (overhead {slurm - local:+.1f} s)")
    print(f"  submission -> job start (SLURM)            {times['StartTime'] - times['SubmitTime']:7.1f} s  (1 s resolution)")
    print(f"  submission -> first training step          {first_step - times['SubmitTime']:7.1f} s")
    print(f"  local: run directory -> first training step {local_first - local_start:6.1f} s")


def measure_preemption(out: Path, steps: int) -> None:
    sweep = out / "preempt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-m", *JOB, *SLURM, f"trainer.max_steps={steps}",
                                 f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    job_id = first_job_id(sweep)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    while not last.exists():
        if launcher.poll() is not None:
            sys.exit("the job ended before its first periodic checkpoint; raise --steps")
        time.sleep(0.1)
    cpus = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    subprocess.run(["sbatch", "-p", "urgent", "-n", cpus, "-J", "labbench-urgent", "-o", str(out / "urgent.out"),
                    "--wrap", "sleep 1"], check=True, capture_output=True)
    while True:  # wait for the requeue, then release the job at once instead of after its BeginTime
        state = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        if "JobState=PENDING" in state:
            break
        time.sleep(0.2)
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    time.sleep(2)  # the urgent job runs
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    if launcher.wait(timeout=1800) != 0:
        sys.exit(f"the preempted sweep failed; see {sweep}")
    starts = log_times(sweep / "0" / "run.log", "run directory:")
    firsts = log_times(sweep / "0" / "run.log", "first training step done")
    interval = 50
    print(f"preemption at the default checkpoint interval ({interval} steps):")
    print(f"  checkpoint written at the signal: step {stopped_at}; steps trained again after the restart: 0")
    print(f"  steps a periodic checkpoint alone would lose: {stopped_at % interval}")
    print(f"  restart: run directory -> first training step {firsts[-1] - starts[-1]:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of the measured job")
    args = parser.parse_args()
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        sys.exit("no SLURM cluster answers; start the local one with `make slurm-up`")
    with tempfile.TemporaryDirectory(prefix="lab-cluster-bench-") as tmp:
        measure_startup(Path(tmp), args.steps)
        measure_preemption(Path(tmp), args.steps)


if __name__ == "__main__":
    main()
