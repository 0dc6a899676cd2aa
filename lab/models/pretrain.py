"""Causal-LM pretraining from scratch as a LightningModule, shared by the methods that train a decoder.

The decoder is a randomly initialised Llama (`build_llama`) sized by the config, with the vocabulary of the
tokenizer. AdamW with linear warm-up, then cosine decay to `min_lr_ratio * lr` or a constant rate. A run is
`trainer.max_steps` optimizer steps long, or `max_tokens` tokens when that is set (whichever ends first).

Logged against the optimizer step (the `step` column of csv/metrics.csv):
- `train/loss` and `tokens` every `trainer.log_every_n_steps` steps;
- `val/loss` and `tokens` at each validation.
`tokens` counts the real (attention-mask) tokens of all ranks that the logged weights were trained on, so
with a fixed batch it equals step * batch_tokens. Every `throughput_every` steps a log line gives the step,
the loss and training tokens/s.

Hyperparameters are plain numbers, strings and lists, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from lab.core.errors import ConfigError
from lab.methods.scaling_law.params import count_parameters
from lab.models.causal_lm import build_llama

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
ROLES = ("ladder", "batch")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Return the learning-rate multiplier at `step`: linear warm-up, then constant or cosine decay to
    `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def path_in_data_root(path: str, data_dir: str | None) -> str:
    """Return `path` relative to the data root, so a record contains no machine path.

    A hub id (not an existing path) is returned unchanged; a directory outside the data root keeps only its name.
    """
    local = Path(path).expanduser()
    if not local.exists() and not path.startswith(("/", ".", "~")):
        return path
    if data_dir:
        try:
            return local.resolve().relative_to(Path(data_dir).expanduser().resolve()).as_posix()
        except ValueError:
            pass
    return local.name


def load_tokenizer(name_or_path: str):
    """Load a Hugging Face tokenizer, turning a missing or unreadable one into a ConfigError naming the key."""
    from transformers import AutoTokenizer

    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(
            f"tokenizer directory model.tokenizer={name_or_path} does not exist; set LAB_DATA_DIR to the data "
            "root that holds models/stories260K-hf, or model.tokenizer to a Hugging Face tokenizer directory."
        )
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # missing files, no hub access, unknown tokenizer class
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"could not load the tokenizer model.tokenizer={name_or_path!r}: {reason} Give a Hugging Face "
            "tokenizer directory (default: models/stories260K-hf under the data root) or a reachable hub id."
        ) from None


class CausalLMPretraining(LightningModule):
    """A Llama decoder trained from scratch on next-token prediction."""

    def __init__(
        self,
        tokenizer: str,
        n_layer: int = 2,
        d_model: int = 64,
        n_head: int | None = None,
        head_dim: int = 16,
        n_kv_head: int | None = None,
        d_ff: int | None = None,
        ffn_ratio: float = 8 / 3,
        ffn_multiple_of: int = 16,
        tie_embeddings: bool = True,
        max_context: int = 256,
        context_length: int = 128,
        lr: float = 2e-3,
        betas: list[float] | tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        lr_schedule: str = "cosine",
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        max_tokens: int | None = None,
        role: str = "ladder",
        throughput_every: int = 50,
        data_dir: str | None = None,
        train_files: str = "",
        val_file: str = "",
        seed: int | None = 0,
    ):
        super().__init__()
        # save_hyperparameters reads the arguments from this frame, so it runs before anything reassigns them.
        self.save_hyperparameters()
        self.hparams["betas"] = [float(b) for b in betas]
        if lr_schedule not in SCHEDULES:
            raise ConfigError(f"method.lr_schedule={lr_schedule!r} is not one of {', '.join(SCHEDULES)}.")
        if role not in ROLES:
            raise ConfigError(f"method.role={role!r} is not one of {', '.join(ROLES)}.")
        if n_head is None and d_model % head_dim:
            raise ConfigError(
                f"model.d_model={d_model} is not a multiple of model.head_dim={head_dim}; "
                "change one of them or set model.n_head."
            )
        self.n_head = n_head or d_model // head_dim
        if d_model % self.n_head:
            raise ConfigError(f"model.d_model={d_model} is not divisible by model.n_head={self.n_head}.")
        if n_kv_head is not None and self.n_head % n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={n_kv_head}.")
        if context_length > max_context:
            raise ConfigError(
                f"data.seq_len={context_length} is longer than model.max_context={max_context}; "
                "lower data.seq_len or raise model.max_context."
            )

        vocab = load_tokenizer(tokenizer)
        self.n_kv_head = n_kv_head or self.n_head
        self.d_ff = d_ff or ffn_multiple_of * math.ceil(ffn_ratio * d_model / ffn_multiple_of)
        self.model = build_llama(
            vocab_size=len(vocab), hidden_size=d_model, num_layers=n_layer, num_heads=self.n_head,
            num_kv_heads=self.n_kv_head, intermediate_size=self.d_ff, max_position_embeddings=max_context,
            seed=torch.initial_seed() if seed is None else seed, tie_word_embeddings=tie_embeddings,
            bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
        )
        self.n_params = count_parameters(self.model)
        log.info(
            "decoder: %d layers, d_model %d, %d heads (%d key/value), d_ff %d, vocabulary %d: "
            "%d non-embedding and %d embedding parameters",
            n_layer, d_model, self.n_head, self.n_kv_head, self.d_ff, len(vocab),
            self.n_params["non_embedding"], self.n_params["embedding"],
        )
        self.tokens_seen = 0  # real tokens trained on, summed over ranks; kept in checkpoints
        self.batch_tokens: int | None = None  # tokens per optimizer step, all ranks; set when training starts
        self._window = {"seconds": 0.0, "tokens": 0}  # throughput since the last log line
        self._batch_start = 0.0
        self._last_logged_step = -1

    # ----------------------------------------------------------------------------------------------------------
    # Run length

    def setup(self, stage: str) -> None:
        """Read the batch size from the data module: tokens per optimizer step over all ranks."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "batch_tokens"):
            return
        if datamodule.seq_len != self.hparams.context_length:
            raise ConfigError(
                f"method.context_length={self.hparams.context_length} differs from data.seq_len="
                f"{datamodule.seq_len}; leave method.context_length at ${{data.seq_len}}."
            )
        self.batch_tokens = datamodule.batch_tokens * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def total_steps(self) -> int:
        """Return the optimizer steps of the whole run: from `max_tokens` when set, capped by trainer.max_steps."""
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if self.hparams.max_tokens:
            if not self.batch_tokens:
                raise ConfigError("method.max_tokens needs a data module with batch_tokens (lab.data.text).")
            by_tokens = math.ceil(self.hparams.max_tokens / self.batch_tokens)
            return min(by_tokens, max_steps) if max_steps > 0 else by_tokens
        if max_steps <= 0:
            raise ConfigError("set trainer.max_steps or method.max_tokens; the training stream has no end.")
        return max_steps

    def on_train_start(self) -> None:
        log.info(
            "training for %d optimizer steps of %s tokens", self.total_steps(), self.batch_tokens or "unknown"
        )

    # ----------------------------------------------------------------------------------------------------------
    # Training and validation

    def lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over real tokens, and the number of tokens it averages."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, int((labels != -100).sum())

    def _tokens_all_ranks(self, attention_mask: torch.Tensor) -> int:
        count = attention_mask.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count.float(), reduce_op="sum")
        return int(count)

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss, _ = self.lm_loss(ids, mask)
        self.log("train/loss", loss, prog_bar=True)
        self.log("tokens", float(self.tokens_seen))  # tokens behind the weights that produced this loss
        self.tokens_seen += self._tokens_all_ranks(mask)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss, count = self.lm_loss(ids, mask)
        self.log("val/loss", loss, prog_bar=True, batch_size=count)  # mean weighted by tokens

    def on_validation_epoch_end(self) -> None:
        # Lightning writes validation rows at step global_step - 1, the index of the last batch. A logged "step"
        # replaces that, so the step of every row is the number of updates behind the logged weights.
        self.log("step", float(self.global_step))
        self.log("tokens", float(self.tokens_seen))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._window["seconds"] += time.perf_counter() - self._batch_start
        self._window["tokens"] += int(batch["attention_mask"].sum()) * self.trainer.world_size
        step = self.global_step
        every = self.hparams.throughput_every
        if every and step % every == 0 and step != self._last_logged_step:
            if self.trainer.is_global_zero:  # tokens/s of all ranks together, timed on rank 0
                log.info(
                    "step %d  loss %.4f  tokens %d  %.0f tokens/s", step, float(outputs["loss"]), self.tokens_seen,
                    self._window["tokens"] / self._window["seconds"],
                )
            self._window = {"seconds": 0.0, "tokens": 0}
            self._last_logged_step = step
        if self.hparams.max_tokens and step >= self.total_steps():
            self.trainer.should_stop = True

    def configure_optimizers(self):
        hp = self.hparams
        # Weight decay on matrices only (embeddings included); norms' gains are not decayed.
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.total_steps()

        def schedule(step: int) -> float:
            return lr_factor(step, hp.warmup_steps, total, hp.lr_schedule, hp.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = int(self.tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))

    # ----------------------------------------------------------------------------------------------------------
    # Final evaluation and the record for results.json

    @torch.no_grad()
    def evaluate(self, dataloader, measure_speed: bool = True) -> dict:
        """Measure the held-out loss (mean over real tokens) and perplexity; with measure_speed, tokens/s."""
        was_training = self.training
        self.eval()
        nll, count = 0.0, 0
        start = time.perf_counter()
        for batch in dataloader:
            loss, n = self.lm_loss(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            nll += float(loss) * n
            count += n
        seconds = time.perf_counter() - start
        self.train(was_training)
        metrics = {"loss": nll / count, "perplexity": math.exp(nll / count), "eval_tokens": count}
        if measure_speed:
            metrics["eval_tokens_per_s"] = count / seconds
        return metrics

    def setup_record(self) -> dict:
        """Describe what must match for two runs to sit on one scaling law: data, tokenizer, context,
        architecture family, optimizer and schedule. Model size, batch size and run length are left out."""
        hp = self.hparams
        return {
            "tokenizer": path_in_data_root(hp.tokenizer, hp.data_dir),
            "train_data": hp.train_files,
            "val_data": hp.val_file,
            "context_length": hp.context_length,
            "architecture": {
                "name": "llama",
                "n_head": hp.n_head if hp.n_head is not None else f"d_model / {hp.head_dim}",
                "n_kv_head": hp.n_kv_head if hp.n_kv_head is not None else "n_head",
                "d_ff": hp.d_ff if hp.d_ff is not None else f"{hp.ffn_ratio:.4g} * d_model, multiple of {hp.ffn_multiple_of}",
                "tie_embeddings": hp.tie_embeddings,
            },
            "optimizer": {"name": "AdamW", "lr": hp.lr, "betas": list(hp.betas), "weight_decay": hp.weight_decay},
            "schedule": {"name": hp.lr_schedule, "warmup_steps": hp.warmup_steps, "min_lr_ratio": hp.min_lr_ratio},
        }

    def results_record(self) -> dict:
        """Return the `scaling` entry of results.json, which the scaling-law fit reads."""
        setup = self.setup_record()
        setup_hash = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()
        return {
            "scaling": {
                "role": self.hparams.role,
                "n_params": self.n_params["non_embedding"],
                "n_params_embedding": self.n_params["embedding"],
                "n_layer": self.hparams.n_layer,
                "d_model": self.hparams.d_model,
                "batch_tokens": self.batch_tokens,
                "context_length": self.hparams.context_length,
                "tokens_seen": int(self.tokens_seen),
                "setup": setup,
                "setup_hash": setup_hash,
            }
        }
