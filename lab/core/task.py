"""The task every experiment runs: validate, build data, model, loggers and trainer, fit, evaluate, record.

A method plugs in through its LightningModule, which may provide:
- `evaluate(dataloader, measure_speed) -> dict`: final held-out metrics for results.json;
- `save_artifacts(run_dir)`: files a later stage reads (SkipGPT stage 1 writes its routers);
- `results_record() -> dict`: extra top-level entries for results.json (the scaling-law module stores its
  parameter counts and training setup there).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import warnings

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lab.core.errors import ConfigError
from lab.core.distributed import start_workers
from lab.core.rundir import RunDir, git_state, is_rank_zero, write_json
from lab.core.validate import validate_config

log = logging.getLogger("lab")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config with its machine paths replaced by placeholders, so the same
    experiment hashes the same in any run directory and on any machine."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    for key in ("output_dir", "log_dir", "data_dir"):
        value = cfg.paths.get(key)
        if value:
            text = text.replace(str(value), f"<{key}>")
    return hashlib.sha256(text.encode()).hexdigest()


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, re-raising our ConfigError as itself instead of wrapped by Hydra."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def logger_kwargs(node: DictConfig, run_dir: RunDir) -> dict:
    """Per-run arguments of a logger: the W&B run id kept in the run directory, so a resume continues it."""
    if str(node.get("_target_", "")).endswith("WandbLogger") and node.get("id") is None:
        return {"id": run_dir.wandb_run_id()}
    return {}


def run_task(cfg: DictConfig) -> float | None:
    """Run one job in its run directory; return the value sweeps optimise (held-out loss), if any."""
    run_dir = RunDir(cfg.paths.output_dir)
    try:
        validate_config(cfg)
        run_dir.start()
    except BaseException as err:
        if run_dir.status() != "finished":  # never overwrite the record of a finished run
            run_dir.finish(False, err)
        raise
    log.info("run directory: %s", run_dir.path)
    workers = None  # DDP ranks 1..N-1 when this process starts them itself
    ok = False
    try:
        workers = start_workers(cfg, run_dir.path)
        metrics = _fit_and_evaluate(cfg, run_dir)
        if workers is not None:
            workers.join(ok=True)
            workers = None
        ok = True
        return metrics.get("loss")
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C into SystemExit(1) after it has stopped training.
        run_dir.finish(False, err, status="interrupted")
        log.error("interrupted; rerun with hydra.run.dir=%s to resume from checkpoints/last.ckpt", run_dir.path)
        raise
    except BaseException as err:
        run_dir.finish(False, err)
        raise
    finally:
        if workers is not None:
            workers.join(ok=False)
        if ok:
            run_dir.finish(True)
        _finish_wandb(failed=not ok)


def _fit_and_evaluate(cfg: DictConfig, run_dir: RunDir) -> dict:
    from lightning.pytorch import seed_everything

    # Frozen pretrained weights stay in eval mode on purpose (no dropout in the frozen part).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    if cfg.get("seed") is not None:  # seed 0 is a seed
        seed_everything(cfg.seed, workers=True)
    log.info("seed: %s, git commit: %s", cfg.get("seed"), git_state()["commit"])

    # Data first: missing or malformed files fail here, before any model is built.
    datamodule = build(cfg.data)
    log.info("data: %s", ", ".join(str(p) for p in [*datamodule.train_paths, datamodule.val_path]))
    module = build(cfg.method, _convert_="all")
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [build(c, **logger_kwargs(c, run_dir)) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir.path))

    ckpt_path = run_dir.resolve_checkpoint(cfg.get("ckpt_path"))
    if ckpt_path:
        import torch

        from lab.core.loggers import drop_rows_from_step

        resumed_step = torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"]
        log.info("resuming from %s at step %d", ckpt_path, resumed_step)
        if is_rank_zero():
            drop_rows_from_step(run_dir.path, resumed_step)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")
    trainer.save_checkpoint(run_dir.last_checkpoint)

    metrics = {}
    if trainer.is_global_zero:
        if hasattr(module, "save_artifacts"):
            module.save_artifacts(run_dir.path)
        if hasattr(module, "evaluate"):
            log.info("evaluating on %s", datamodule.val_path)
            metrics = module.evaluate(datamodule.val_dataloader(), measure_speed=cfg.eval.measure_speed)
            scalars = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
                logger.save()
        results = {
            "metrics": metrics,
            "config_hash": config_hash(cfg),
            "data": datamodule.source,
            "data_detail": datamodule.describe(),
            "git_commit": git_state()["commit"],
            "seed": cfg.get("seed"),
            "global_step": trainer.global_step,
            "run_dir": str(run_dir.path),
            "task_name": cfg.task_name,
            "hparams": dict(module.hparams),
        }
        if hasattr(module, "results_record"):
            results.update(module.results_record())
        write_json(run_dir.path / "results.json", results)
        log.info("results: %s", run_dir.path / "results.json")
    return metrics


def _finish_wandb(failed: bool) -> None:
    """End the W&B run of this job, so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
