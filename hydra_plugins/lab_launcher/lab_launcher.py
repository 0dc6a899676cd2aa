"""lab's submitit launchers: check every job against the trainer, pin the sweep directory, then submit.

Hydra loads launchers only from the `hydra_plugins` namespace package, so they live here; the checks are in
lab/core/launcher.py. Configs: conf/hydra/launcher/slurm.yaml and submitit_local.yaml.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import open_dict

from lab.core.errors import ConfigError
from lab.core.launcher import check_geometry

log = logging.getLogger(__name__)


class _CheckedLauncher:
    """Mixin over the plugin's launchers: check every job, pin the sweep directory, then submit."""

    _EXECUTOR: str

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        for idx, overrides in enumerate(job_overrides):
            job_cfg = self.config_loader.load_sweep_config(self.config, list(overrides))
            try:
                check_geometry(job_cfg, self.params, self._EXECUTOR, job=f"#{initial_job_idx + idx}")
            except ConfigError as err:
                print(f"error: {err} Nothing was submitted.", file=sys.stderr)
                sys.exit(2)

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
