"""Checks and helpers for lab's submitit launchers (hydra_plugins/lab_launcher), which are the
hydra-submitit-launcher plugin's launchers with two additions:
- every job's composed config is checked against the launcher's geometry (tasks per node against
  `trainer.devices`, nodes against `trainer.num_nodes`), so a mismatch fails on the login node in a second
  instead of hanging on the cluster;
- the sweep directory is resolved once and passed to every job as a literal override, so a job that SLURM
  requeues (preemption, time-out) finds the same `SWEEP_DIR/JOB_NUM` run directory and resumes there. The
  directory never depends on the SLURM job id.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lab.core.errors import ConfigError


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
