"""Callbacks every experiment uses (conf/callbacks/default.yaml): exact resume and preemption safety.

- `StepSeed` reseeds the random generators at the start of each training step from (seed, step, rank), so the
  randomness of a step (dropout, Gumbel noise) does not depend on whether the run was resumed in between.
- `FirstStepLog` logs when the first training step is done, which shows a job's start-up cost.
- `PreemptionCheckpoint` turns SIGTERM and SIGUSR2 into a checkpoint written at the end of the current
  training step, followed by a clean stop. SIGUSR2 is what submitit has SLURM send before a time-out, and at
  preemption on clusters with `SlurmctldParameters=preempt_send_user_signal`; after it the callback hands over
  to submitit's handler, which requeues the job. SIGTERM is what `kill` sends and what SLURM sends at
  preemption without that flag; the run stops with a checkpoint, and relaunching the sweep into its directory
  resumes it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lab.core.rundir import is_rank_zero

log = logging.getLogger(__name__)


class StepSeed(Callback):
    """Seed python, numpy and torch with a value derived from (seed, global step, global rank) before each step."""

    def __init__(self, seed: int | None):
        self.seed = seed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.seed is None:
            return
        # A large odd multiplier keeps the per-step seeds of neighbouring (seed, rank) pairs apart.
        step_seed = (self.seed * 1_000_003 + trainer.global_step * 8191 + trainer.global_rank) % (2**32)
        random.seed(step_seed)
        np.random.seed(step_seed)
        torch.manual_seed(step_seed)  # also seeds every CUDA device


class FirstStepLog(Callback):
    """Log one line when the first training step of this process has finished, with the seconds since the
    process started: the start-up cost of a job (imports, data, model, SLURM scheduling excluded)."""

    def __init__(self):
        self.done = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.done:
            return
        self.done = True
        since_start = time.time() - process_start_time()
        log.info("first training step done (global step %d), %.1f s after the process started", trainer.global_step, since_start)


def process_start_time() -> float:
    """This process's start time in seconds since the epoch, from /proc on Linux (to about 1 s, the resolution
    of the boot time there); the current time where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGUSR2, write `dirpath/last.ckpt` after the current training step and stop the run.

    The handler only records the signal; the checkpoint is written in `on_train_batch_end`, where the model,
    optimizer, scheduler and loop state are consistent. In multi-process training the ranks agree through a
    collective, so all of them stop after the same step.
    NOTE: a SIGTERM that arrives during validation makes Lightning (2.6) stop inside the validation loop, before
    this callback runs; the run then resumes from its last periodic checkpoint.
    """

    SIGNALS = ("SIGTERM", "SIGUSR2")

    def __init__(self, dirpath: str | os.PathLike):
        self.path = Path(dirpath) / "last.ckpt"
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            log.warning("received %s; checkpointing after the current training step", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Set after Lightning's own SIGTERM handler (registered after on_fit_start), which this one replaces
        # during training: Lightning's runs a collective inside the handler, which can deadlock DDP ranks.
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.path)
        signum = self.received or signal.SIGTERM
        log.warning("wrote %s at step %d after %s; stopping", self.path, trainer.global_step, signal.Signals(signum).name)
        previous = self._previous.get(signum)
        self._restore_handlers()
        if signum == signal.SIGUSR2:
            self._requeue(previous, signum)
        raise SystemExit(f"stopped after {signal.Signals(signum).name} at step {trainer.global_step}; rerun to resume")

    def _requeue(self, previous, signum: int) -> None:
        """Requeue on SIGUSR2: submitit's handler when submitit runs the job, else `scontrol requeue` under SLURM."""
        if callable(previous):
            previous(signum, None)  # submitit: requeues on rank 0, then exits
            return
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id and is_rank_zero():
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode != 0:
                log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())

