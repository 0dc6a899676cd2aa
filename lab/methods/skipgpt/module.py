"""SkipGPT training as a LightningModule: stage 1 trains routers, stage 2 recovers with LoRA.

Stage 1: the base model is frozen; only router parameters train, with Gumbel-softmax straight-through
gates and temperature annealed linearly over the run. Loss = LM loss + alpha * |target - achieved sparsity|.
Stage 2: routers are loaded from a stage-1 run and frozen; LoRA adapters (peft) train on the LM loss only,
with deterministic (argmax) routing.

Hyperparameters are plain numbers, strings and lists, so checkpoints load with `weights_only=True`.
Checkpoints hold only router and LoRA weights; the base model is reloaded from `model_name_or_path`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from lab.core.errors import ConfigError
from lab.methods.skipgpt.model import (
    KV_FOR_SKIPPED,
    MLP_ROUTER_INPUTS,
    ROUTER_TYPES,
    SkipGPT,
    linear_schedule,
    overall_sparsity,
    perplexity,
    sparsity,
)
from lab.models.causal_lm import check_model_path, load_causal_lm

log = logging.getLogger(__name__)

ROUTERS_FILE = "routers.pt"


def find_stage1_run(stage1_run: str | None, search_dir: str) -> Path:
    """Find the stage-1 run directory to start from: the named one, or the newest finished one in search_dir."""
    if stage1_run:
        run = Path(stage1_run).expanduser()
        if not (run / ROUTERS_FILE).is_file():
            raise ConfigError(
                f"stage1_run={run} has no {ROUTERS_FILE}; pass the run directory of a finished "
                "`python run.py experiment=skipgpt_stage1` run."
            )
        return run
    candidates = []
    for routers in Path(search_dir).glob(f"**/{ROUTERS_FILE}"):
        status = routers.parent / "status.json"
        if status.is_file() and json.loads(status.read_text()).get("status") == "finished":
            candidates.append(routers.parent)
    if not candidates:
        raise ConfigError(
            f"no finished stage-1 run under {search_dir}; run `python run.py experiment=skipgpt_stage1` first "
            "or pass stage1_run=PATH."
        )
    return max(candidates, key=lambda run: (run / ROUTERS_FILE).stat().st_mtime)


class SkipGPTModule(LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        stage: int = 1,
        dtype: str = "float32",
        router_type: str = "linear",
        mlp_router_input: str = "post_attention",
        kv_for_skipped: str = "keep",
        target_sparsity: float = 0.25,
        alpha: float = 8.0,
        sparsity_unit: str = "module",
        temperature_start: float = 5.0,
        temperature_end: float = 1.0,
        noise_scale_start: float = 1.0,
        noise_scale_end: float = 1.0,
        anneal_fraction: float = 1.0,
        eval_routing: str = "argmax",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.1,
        lora_target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj", "gate_proj"),
        stage1_run: str | None = None,
        stage1_search_dir: str = "logs/skipgpt_stage1",
    ):
        super().__init__()
        # Every check runs before the model loads.
        if stage not in (1, 2):
            raise ConfigError(f"method.stage={stage} must be 1 (routers) or 2 (LoRA recovery).")
        for key, value, allowed in [
            ("router_type", router_type, ROUTER_TYPES),
            ("mlp_router_input", mlp_router_input, MLP_ROUTER_INPUTS),
            ("kv_for_skipped", kv_for_skipped, KV_FOR_SKIPPED),
            ("sparsity_unit", sparsity_unit, ("module", "parameter")),
            ("eval_routing", eval_routing, ("argmax", "sample")),
            ("lr_schedule", lr_schedule, ("cosine", "constant")),
        ]:
            if value not in allowed:
                raise ConfigError(f"method.{key}={value!r} is not one of {', '.join(allowed)}.")
        if not 0.0 <= target_sparsity < 1.0:
            raise ConfigError(f"method.target_sparsity={target_sparsity} must be in [0, 1).")
        check_model_path(model_name_or_path)
        routers_record = None
        if stage == 2:
            run = find_stage1_run(stage1_run, stage1_search_dir)
            routers_record = torch.load(run / ROUTERS_FILE, weights_only=True)
            for key, value in [("router_type", router_type), ("mlp_router_input", mlp_router_input)]:
                if routers_record[key] != value:
                    raise ConfigError(
                        f"method.{key}={value!r} differs from the stage-1 run {run} ({routers_record[key]!r}); "
                        f"set method.{key}={routers_record[key]} or pick another stage1_run."
                    )
            stage1_run = str(run.resolve())
        self.save_hyperparameters(ignore=["stage1_search_dir"])
        self.hparams["stage1_run"] = stage1_run
        self.hparams["lora_target_modules"] = list(lora_target_modules)

        self.model = SkipGPT(load_causal_lm(model_name_or_path, dtype), router_type, mlp_router_input, kv_for_skipped)
        self.attn_params, self.mlp_params = self.model.module_params()
        for p in self.model.lm.parameters():
            p.requires_grad = False
        if stage == 1:
            return
        loaded = self.model.load_state_dict(routers_record["state_dict"], strict=False)
        if loaded.unexpected_keys or any("routers." in k for k in loaded.missing_keys):
            raise ConfigError(
                f"the routers in {stage1_run} do not fit {model_name_or_path} "
                f"(unexpected {loaded.unexpected_keys[:3]}); use the model that stage 1 was trained on."
            )
        for p in self.model.parameters():
            p.requires_grad = False
        self._add_lora()
        log.info("stage 2 starts from the routers of %s", stage1_run)

    def _add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=self.hparams.lora_r,
            lora_alpha=self.hparams.lora_alpha,
            lora_dropout=self.hparams.lora_dropout,
            target_modules=list(self.hparams.lora_target_modules),
            bias="none",
        )
        self.model.lm = get_peft_model(self.model.lm, config)  # freezes all but the LoRA weights

    # Checkpoints keep only what training changes; the frozen base model would dwarf them.
    strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if "routers." in k or "lora_" in k
        }

    def router_state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k.startswith(("attn_routers", "mlp_routers"))}

    def save_routers(self, path: Path) -> None:
        torch.save(
            {
                "state_dict": self.router_state_dict(),
                "router_type": self.hparams.router_type,
                "mlp_router_input": self.hparams.mlp_router_input,
                "target_sparsity": float(self.hparams.target_sparsity),
            },
            path,
        )

    def temperature(self) -> tuple[float, float]:
        """Gumbel-softmax temperature and noise scale at this step, annealed linearly over `anneal_fraction`
        of the run and constant after it."""
        hp = self.hparams
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 1
        total = max(1, round(total * hp.anneal_fraction))
        return (
            linear_schedule(self.global_step, total, hp.temperature_start, hp.temperature_end),
            linear_schedule(self.global_step, total, hp.noise_scale_start, hp.noise_scale_end),
        )

    def lm_loss(self, logits, input_ids, attention_mask):
        """Mean next-token cross-entropy over real tokens, and the number of tokens it averages."""
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, int((labels != -100).sum())

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        stage1 = self.hparams.stage == 1
        tau, noise = self.temperature() if stage1 else (1.0, 0.0)
        out = self.model(ids, mask, routing="gumbel" if stage1 else "argmax", temperature=tau, noise_scale=noise)
        lm_loss, _ = self.lm_loss(out.logits, ids, mask)
        valid = mask.bool()
        achieved = overall_sparsity(out, valid, self.hparams.sparsity_unit, self.attn_params, self.mlp_params)
        loss = lm_loss
        if stage1:
            loss = lm_loss + self.hparams.alpha * (self.hparams.target_sparsity - achieved).abs()
            self.log("train/temperature", tau)
            self.log("train/noise_scale", noise)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lm_loss", lm_loss)
        self.log("train/sparsity", achieved, prog_bar=True)
        self.log("train/sparsity_attn", sparsity(out.attn_gates.detach(), valid))
        self.log("train/sparsity_mlp", sparsity(out.mlp_gates.detach(), valid))
        return loss

    def validation_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = self.model(ids, mask, routing=self.hparams.eval_routing)
        loss, _ = self.lm_loss(out.logits, ids, mask)
        valid = mask.bool()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/sparsity_attn", sparsity(out.attn_gates, valid))
        self.log("val/sparsity_mlp", sparsity(out.mlp_gates, valid))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, hp = self.hparams.warmup_steps, self.hparams
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 1

        def schedule(step: int) -> float:
            """Learning-rate factor: linear warm-up, then constant or cosine decay to min_lr_ratio."""
            if step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def base_model_only(self):
        """Context in which the model runs without LoRA adapters (the dense baseline)."""
        if hasattr(self.model.lm, "disable_adapter"):
            return self.model.lm.disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, dataloader, measure_speed: bool = True) -> dict:
        """Measure held-out perplexity, routed and dense, and achieved sparsity per module type and layer."""
        was_training = self.training
        self.eval()

        totals = {"routed_nll": 0.0, "dense_nll": 0.0, "tokens": 0}
        n_layers = len(self.model.layers)
        executed_attn = torch.zeros(n_layers, dtype=torch.float64)
        executed_mlp = torch.zeros(n_layers, dtype=torch.float64)
        real_tokens = 0
        for batch in dataloader:
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            routed = self.model(ids, mask, routing=self.hparams.eval_routing, skip=True)
            with self.base_model_only():
                dense = self.model(ids, mask, routing="dense")
            routed_loss, n = self.lm_loss(routed.logits, ids, mask)
            dense_loss, _ = self.lm_loss(dense.logits, ids, mask)
            totals["routed_nll"] += float(routed_loss) * n
            totals["dense_nll"] += float(dense_loss) * n
            totals["tokens"] += n
            valid = mask.bool().unsqueeze(0)
            executed_attn += (routed.attn_gates * valid).sum(dim=(1, 2)).double().cpu()
            executed_mlp += (routed.mlp_gates * valid).sum(dim=(1, 2)).double().cpu()
            real_tokens += int(mask.sum())

        skipped_attn = (1 - executed_attn / real_tokens).tolist()
        skipped_mlp = (1 - executed_mlp / real_tokens).tolist()
        s_attn = sum(skipped_attn) / n_layers
        s_mlp = sum(skipped_mlp) / n_layers
        p_attn, p_mlp = self.attn_params, self.mlp_params

        metrics = {
            "ppl": perplexity(totals["routed_nll"] / totals["tokens"]),
            "dense_ppl": perplexity(totals["dense_nll"] / totals["tokens"]),
            "loss": totals["routed_nll"] / totals["tokens"],
            "dense_loss": totals["dense_nll"] / totals["tokens"],
            "eval_tokens": totals["tokens"],
            "target_sparsity": float(self.hparams.target_sparsity),
            "sparsity_attn": s_attn,
            "sparsity_mlp": s_mlp,
            "sparsity_module": (s_attn + s_mlp) / 2,
            "sparsity_parameter": (p_attn * s_attn + p_mlp * s_mlp) / (p_attn + p_mlp),
            "sparsity_attn_per_layer": skipped_attn,
            "sparsity_mlp_per_layer": skipped_mlp,
        }

        if measure_speed:
            metrics.update(self.measure_speed(next(iter(dataloader))["input_ids"].to(self.device)))
        self.train(was_training)
        return metrics

    @torch.no_grad()
    def measure_speed(self, input_ids: torch.Tensor, repeats: int = 3) -> dict:
        """Prefill tokens/s, routed with real skipping vs dense, on one evaluation batch (best of repeats)."""

        def best_seconds(routing: str, skip: bool) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.model(input_ids, routing=routing, skip=skip)
                times.append(time.perf_counter() - start)
            return min(times)

        # NOTE: in stage 2 both sides run the LoRA adapters unmerged; merging them would speed up both equally.
        best_seconds("dense", False)  # warm-up
        dense = best_seconds("dense", False)
        routed = best_seconds(self.hparams.eval_routing, True)
        tokens = input_ids.numel()
        return {
            "prefill_tokens_per_s_dense": tokens / dense,
            "prefill_tokens_per_s_routed": tokens / routed,
            "speedup_prefill": dense / routed,
        }


    def save_artifacts(self, run_dir: Path) -> None:
        """Stage 1 leaves its routers in the run directory, where stage 2 finds them."""
        if self.hparams.stage == 1:
            self.save_routers(Path(run_dir) / ROUTERS_FILE)
