"""Run one experiment: `python run.py experiment=skipgpt_stage1 [key=value ...]`; `-m` sweeps.

Kept thin and free of torch imports, so `--cfg job` prints the composed config in well under two seconds.
"""

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from lab.core.errors import ConfigError
from lab.core.resolvers import register_resolvers
from lab.core.sweep import finished_job_loss, in_multirun

register_resolvers()
# conf/hydra/launcher/submitit_local.yaml shares its name with the plugin's schema, which Hydra uses to type-check
# it; Hydra warns that this matching by name is deprecated, and the check is wanted here.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
log = logging.getLogger("lab")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lab.core.task import run_task

    # A sweep relaunched into its own directory (hydra.sweep.dir=SWEEP_DIR) skips the jobs that finished and
    # resumes the others from their checkpoints.
    if in_multirun():
        finished = finished_job_loss(cfg.paths.output_dir)
        if finished is not False:
            log.info("job already finished in %s; skipping it", cfg.paths.output_dir)
            return finished

    # In a multirun a failed job is recorded in its run directory (status.json, run.log) and the sweep goes on;
    # the sweep summary then names it and the sweep exits with status 1.
    try:
        return run_task(cfg)
    except ConfigError as err:
        log.error("%s", err)
        if in_multirun():
            return None
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if in_multirun():
            log.exception("job failed; the other jobs of the sweep go on")
            return None
        raise


if __name__ == "__main__":
    main()
