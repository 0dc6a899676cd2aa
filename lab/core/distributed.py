"""Multi-process (DDP) training on one machine, started by lab instead of by Lightning.

Lightning's default DDP launcher reruns the whole command line once per extra process. Under Hydra that
reruns `run.py -m ...` as a fresh sweep in each child, so a 2-job multirun turned into extra sweeps and stray
run directories. lab instead writes the job's resolved config into its run directory and starts ranks
1..N-1 as `python -m lab.core.distributed CONFIG`, with the usual torch.distributed variables (MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK). Lightning sees LOCAL_RANK and treats the processes
as launched externally. All ranks run the same task in the same run directory; only rank 0 writes records.

Processes started by SLURM (one task per device), torchrun or any other launcher are left alone.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lab.core.errors import ConfigError

log = logging.getLogger(__name__)

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def launched_externally() -> bool:
    """True when another launcher (SLURM tasks, torchrun, an earlier lab launch) already created the ranks."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Workers:
    """Ranks 1..N-1 of a local multi-process run, and the variables this process set to become rank 0."""

    def __init__(self, processes: list[subprocess.Popen], saved_env: dict[str, str | None]):
        self.processes = processes
        self.saved_env = saved_env

    def join(self, ok: bool) -> None:
        """Wait for the workers (stop them first if this rank failed); restore this process's environment."""
        try:
            for rank, process in enumerate(self.processes, start=1):
                if not ok and process.poll() is None:
                    process.terminate()
                code = process.wait()
                if ok and code != 0:
                    raise RuntimeError(f"DDP rank {rank} exited with status {code}; its log is in this job's output above.")
        finally:
            for name, value in self.saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()  # the next job of a multirun starts its own group


def start_workers(cfg: DictConfig, run_dir: Path) -> Workers | None:
    """Start ranks 1..devices-1 when the trainer asks for several devices and nobody launched them yet."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    strategy = str(trainer.get("strategy", "auto"))
    if not isinstance(devices, int) or devices <= 1 or launched_externally() or "spawn" in strategy:
        return None
    if (trainer.get("num_nodes", 1) or 1) > 1:
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes} on a single machine: use hydra/launcher=slurm (one task per "
            "device) or torchrun to start processes on several nodes."
        )

    config_file = Path(run_dir) / ".ddp" / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_file, resolve=True)
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(devices), "NODE_RANK": "0"}
    processes = []
    for rank in range(1, devices):
        env = {**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        processes.append(subprocess.Popen([sys.executable, "-m", "lab.core.distributed", str(config_file)], env=env))
    saved_env = {name: os.environ.get(name) for name in DIST_VARS}
    os.environ.update({**shared, "RANK": "0", "LOCAL_RANK": "0"})
    log.info("started DDP ranks 1..%d on this machine (master port %s)", devices - 1, shared["MASTER_PORT"])
    return Workers(processes, saved_env)


def main() -> None:
    """Entry point of one worker rank: run the task with the config rank 0 wrote."""
    if len(sys.argv) != 2 or "RANK" not in os.environ:
        sys.exit("usage: RANK=r LOCAL_RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python -m lab.core.distributed CONFIG")
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ['RANK']}][%(name)s][%(levelname)s] - %(message)s")
    from lab.core.resolvers import register_resolvers
    from lab.core.task import run_task

    register_resolvers()
    run_task(OmegaConf.load(sys.argv[1]))


if __name__ == "__main__":
    main()
