"""Run one experiment: `python run.py experiment=skipgpt_stage1 [key=value ...]`; `-m` sweeps.

Kept thin and free of torch imports, so `--cfg job` prints the composed config in well under two seconds.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from lab.core.errors import ConfigError
from lab.core.resolvers import register_resolvers

register_resolvers()
log = logging.getLogger("lab")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lab.core.task import run_task

    try:
        return run_task(cfg)
    except ConfigError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
