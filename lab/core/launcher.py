"""Submitit launchers that check each job before submitting it and pin the sweep directory.

They are the hydra-submitit-launcher plugin's launchers with two additions:
- every job's composed config is checked against the launcher's geometry (tasks per node against
  `trainer.devices`, nodes against `trainer.num_nodes`), so a mismatch fails on the login node in a second
  instead of hanging on the cluster;
- the sweep directory is resolved once and passed to every job as a literal override, so a job that SLURM
  requeues (preemption, time-out) finds the same `SWEEP_DIR/JOB_NUM` run directory and resumes there. The
  directory never depends on the SLURM job id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig, open_dict

from lab.core.errors import ConfigError

log = logging.getLogger(__name__)


def check_geometry(cfg: DictConfig, params: dict, cluster: str, job: str = "") -> None:
    """Raise ConfigError when the launcher's processes do not match what the trainer expects.

    On SLURM every training process is a SLURM task, so `tasks_per_node` must equal `trainer.devices` and
    `nodes` must equal `trainer.num_nodes`. Locally submitit starts one task and lab starts the extra DDP
    processes itself, so `tasks_per_node` must be 1.
    """
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    num_nodes = trainer.get("num_nodes", 1) or 1
    accelerator = str(trainer.get("accelerator", "auto"))
    tasks = params.get("tasks_per_node", 1)
    nodes = params.get("nodes", 1)
    where = f" (job {job})" if job else ""

    if cluster == "local":
        if tasks != 1:
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={tasks} with the local submitit launcher{where}: set it to 1; "
                f"lab starts the trainer.devices={devices} training processes itself."
            )
        if num_nodes != 1:
            raise ConfigError(f"trainer.num_nodes={num_nodes} needs a cluster launcher{where}; use hydra/launcher=slurm.")
        return

    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            f"trainer.devices={devices!r}{where}: on SLURM give the number of processes per node as an integer, "
            "equal to hydra.launcher.tasks_per_node."
        )
    if tasks != devices:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}{where}: SLURM starts one "
            f"training process per task, so set both to the same number (e.g. hydra.launcher.tasks_per_node={devices})."
        )
    if nodes != num_nodes:
        raise ConfigError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}{where}: set both to the same number."
        )
    gpus = params.get("gpus_per_node")
    if accelerator in ("gpu", "cuda") and gpus is not None and gpus < devices:
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus} is fewer than trainer.devices={devices}{where}: "
            "request at least one GPU per training process."
        )


class _CheckedLauncher:
    """Mixin over the plugin's launchers: check every job, pin the sweep directory, then submit."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        for idx, overrides in enumerate(job_overrides):
            job_cfg = self.config_loader.load_sweep_config(self.config, list(overrides))
            check_geometry(job_cfg, self.params, self._EXECUTOR, job=f"#{initial_job_idx + idx}")

        sweep_dir = os.path.abspath(str(self.config.hydra.sweep.dir))
        with open_dict(self.config):
            self.config.hydra.sweep.dir = sweep_dir
            # Jobs compose their config again from the overrides; this one fixes the directory for reruns.
            self.config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{sweep_dir}'")
        log.info("sweep directory: %s", sweep_dir)
        return super().launch(job_overrides, initial_job_idx)

    @property
    def config_loader(self):
        return self.hydra_context.config_loader


class SlurmLauncher(_CheckedLauncher, submitit_launcher.SlurmLauncher):
    """Submit each job to SLURM through submitit."""


class LocalLauncher(_CheckedLauncher, submitit_launcher.LocalLauncher):
    """Run each job as a local submitit process (the same code path as SLURM, on a laptop)."""
