"""Training-step throughput of lab's Trainer path vs a plain PyTorch loop on the same model and batches.

    python benchmarks/overhead.py [--steps N] [--warmup N]

Both sides train SkipGPT stage 1 (routers on the frozen stories260K from $LAB_DATA_DIR) on the same
pre-tokenized TinyStories batches with the same optimizer. The Trainer side uses the lab's default trainer,
callbacks and CSV logger (checkpoint every 50 steps, progress bar, logging every 10 steps), as a run does.
Only steps after the warm-up are timed. Ratio = Trainer steps/s / plain steps/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lab.data.text import TextDataModule  # noqa: E402
from lab.methods.skipgpt.model import overall_sparsity  # noqa: E402
from lab.methods.skipgpt.module import SkipGPTModule  # noqa: E402


class StepTimer(Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.steps += 1
            self.end = time.perf_counter()


def plain_loop(module: SkipGPTModule, datamodule, steps: int, warmup: int) -> float:
    """Steps/s of a hand-written loop: forward, loss, backward, clip, step, schedule."""
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    params = [p for p in module.parameters() if p.requires_grad]
    hp = module.hparams
    loader = iter(datamodule.train_dataloader())
    module.train()
    start = None
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        batch = next(loader)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = module.model(ids, mask, routing="gumbel", temperature=hp.temperature_start)
        lm_loss, _ = module.lm_loss(out.logits, ids, mask)
        achieved = overall_sparsity(out, mask.bool(), hp.sparsity_unit, module.attn_params, module.mlp_params)
        loss = lm_loss + hp.alpha * (hp.target_sparsity - achieved).abs()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
    return steps / (time.perf_counter() - start)


def trainer_loop(module: SkipGPTModule, datamodule, steps: int, warmup: int, run_dir: str) -> float:
    timer = StepTimer(warmup)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps + warmup, limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=10, gradient_clip_val=1.0, use_distributed_sampler=False, enable_model_summary=False,
        default_root_dir=run_dir, logger=CSVLogger(run_dir, name="csv", version=""),
        callbacks=[timer, ModelCheckpoint(dirpath=f"{run_dir}/checkpoints", save_last=True, save_top_k=0,
                                          every_n_train_steps=50), LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.steps / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    args = parser.parse_args()
    data_dir = os.environ.get("LAB_DATA_DIR")
    model_dir = f"{data_dir}/models/stories260K-hf"
    datamodule = TextDataModule(data_dir, model_dir, seq_len=256, batch_size=16, max_train_tokens=2_000_000, max_val_tokens=4096)
    datamodule.setup()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} timed steps of 16 x 256 tokens")

    results = {}
    for side in ("plain", "trainer", "plain", "trainer"):  # interleaved, so drift in machine speed hits both
        seed_everything(0, verbose=False)
        module = SkipGPTModule(model_dir, stage=1, lr=1e-2, warmup_steps=10)
        if side == "plain":
            rate = plain_loop(module, datamodule, args.steps, args.warmup)
        else:
            with tempfile.TemporaryDirectory() as run_dir:
                rate = trainer_loop(module, datamodule, args.steps, args.warmup, run_dir)
        results.setdefault(side, []).append(rate)
        print(f"{side:8} {rate:.3f} steps/s")
    plain, trainer = max(results["plain"]), max(results["trainer"])
    print(f"\nbest of two: plain {plain:.3f} steps/s, trainer {trainer:.3f} steps/s, ratio {trainer / plain:.3f}")


if __name__ == "__main__":
    main()
