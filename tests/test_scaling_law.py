"""Causal-LM pretraining for scaling laws: parameter counts, token-sized batches, logged curves, results record."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lab.core.errors import ConfigError
from lab.core.loggers import CSVLogger
from lab.data.text import TextDataModule
from lab.methods.scaling_law.params import count_parameters, llama_non_embedding_params
from lab.models.causal_lm import build_llama
from lab.models.pretrain import CausalLMPretraining

from conftest import results, run_lab

SEQ_LEN = 32
BATCH_TOKENS = 256  # 8 blocks of SEQ_LEN
MAX_TOKENS = 10 * BATCH_TOKENS  # 10 optimizer steps
SCALING_KEYS = {"role", "n_params", "n_params_embedding", "batch_tokens", "context_length", "tokens_seen",
                "setup", "setup_hash"}
SETUP_KEYS = {"tokenizer", "train_data", "context_length", "optimizer", "schedule"}


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize(
    "n_layer, d_model, n_head, n_kv_head, d_ff, tied",
    [
        (2, 32, 2, 2, 96, True),
        (3, 64, 8, 2, 176, True),  # grouped-query attention: 2 key/value heads for 8 query heads
        (4, 48, 4, 1, 128, False),  # multi-query attention and an untied LM head
    ],
)
def test_params_match_closed_form(n_layer, d_model, n_head, n_kv_head, d_ff, tied):
    model = build_llama(512, d_model, n_layer, n_head, n_kv_head, intermediate_size=d_ff, tie_word_embeddings=tied)
    counts = count_parameters(model)
    assert counts["non_embedding"] == llama_non_embedding_params(n_layer, d_model, n_head, n_kv_head, d_ff)
    assert counts["embedding"] == (1 if tied else 2) * 512 * d_model
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_params_closed_form_near_kaplan():
    exact = llama_non_embedding_params(4, 96, 6, None, 256, include_norms=False)
    assert exact == 12 * 4 * 96**2  # d_ff = 8/3 d_model: the Llama block has Kaplan's 12 d^2 per layer


# ---------------------------------------------------------------------------------------------------------------
# Batches sized in tokens


def test_batch_tokens_sets_batch_size(data_dir, model_dir):
    dm = TextDataModule(str(data_dir), str(model_dir), seq_len=SEQ_LEN, batch_tokens=BATCH_TOKENS,
                        max_train_tokens=4096, max_val_tokens=1024)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert dm.batch_size == BATCH_TOKENS // SEQ_LEN
    assert batch["input_ids"].shape == (BATCH_TOKENS // SEQ_LEN, SEQ_LEN)


def test_batch_tokens_not_multiple_rejected(data_dir, model_dir):
    with pytest.raises(ConfigError, match=r"data.batch_tokens=1000 is not a positive multiple of data.seq_len=64"):
        TextDataModule(str(data_dir), str(model_dir), seq_len=64, batch_tokens=1000)


def test_batch_size_kept_without_batch_tokens(data_dir, model_dir):
    dm = TextDataModule(str(data_dir), str(model_dir), seq_len=64, batch_size=5)
    assert dm.batch_size == 5
    assert dm.batch_tokens == 5 * 64


# ---------------------------------------------------------------------------------------------------------------
# The module, trained for a few steps


def make_module(model_dir, data_dir, **overrides) -> CausalLMPretraining:
    kwargs = dict(
        tokenizer=str(model_dir), n_layer=1, d_model=16, context_length=SEQ_LEN, max_tokens=MAX_TOKENS,
        warmup_steps=2, throughput_every=5, data_dir=str(data_dir), train_files="text/tinystories/*train*",
        val_file="text/tinystories/tinystories_val.txt",
    )
    kwargs.update(overrides)
    return CausalLMPretraining(**kwargs)


def tiny_fit(out: Path, model_dir, data_dir, batch_tokens: int = BATCH_TOKENS, **overrides):
    """Train a 1-layer model for MAX_TOKENS tokens on real text; return the module, trainer and data module."""
    dm = TextDataModule(str(data_dir), str(model_dir), seq_len=SEQ_LEN, batch_tokens=batch_tokens,
                        eval_batch_size=16, max_train_tokens=16384, max_val_tokens=2048)
    module = make_module(model_dir, data_dir, **overrides)
    trainer = Trainer(
        accelerator="cpu", max_steps=-1, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=2,
        log_every_n_steps=2, num_sanity_val_steps=0, logger=CSVLogger(str(out), name="csv", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer, dm


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, data_dir):
    out = tmp_path_factory.mktemp("pretrain")
    handler = ListHandler()
    logger = logging.getLogger("lab.models.pretrain")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        module, trainer, dm = tiny_fit(out, model_dir, data_dir)
    finally:
        logger.removeHandler(handler)
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    return {"out": out, "module": module, "trainer": trainer, "datamodule": dm, "rows": rows,
            "messages": handler.messages}


def test_module_stops_at_token_budget(trained):
    assert trained["trainer"].global_step == MAX_TOKENS // BATCH_TOKENS
    assert trained["module"].tokens_seen == MAX_TOKENS


def test_module_logs_train_loss_and_tokens(trained):
    train_rows = [row for row in trained["rows"] if row.get("train/loss")]
    assert train_rows
    for row in train_rows:
        assert float(row["tokens"]) == int(row["step"]) * BATCH_TOKENS


def test_module_logs_val_loss_and_tokens(trained):
    val_rows = [row for row in trained["rows"] if row.get("val/loss")]
    assert [int(row["step"]) for row in val_rows] == [4, 8, 10]  # every 4 steps, and once more at the end
    for row in val_rows:
        assert float(row["tokens"]) == int(row["step"]) * BATCH_TOKENS


def test_module_logs_throughput_line(trained):
    lines = [m for m in trained["messages"] if "tokens/s" in m]
    assert [line.split()[1] for line in lines] == ["5", "10"]


def test_evaluate_returns_loss_and_perplexity(trained):
    metrics = trained["module"].evaluate(trained["datamodule"].val_dataloader(), measure_speed=False)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)
    assert metrics["loss"] < 6.3  # below log(512), the loss of uniform guessing


def test_results_record_keys(trained):
    record = trained["module"].results_record()["scaling"]
    assert SCALING_KEYS <= set(record)
    assert SETUP_KEYS <= set(record["setup"])
    assert record["role"] == "ladder"
    assert record["n_params"] == count_parameters(trained["module"].model)["non_embedding"]
    assert record["batch_tokens"] == BATCH_TOKENS
    assert record["tokens_seen"] == MAX_TOKENS
    assert record["context_length"] == SEQ_LEN


def test_results_record_has_no_machine_paths(trained, data_dir):
    setup = json.dumps(trained["module"].results_record()["scaling"]["setup"])
    assert str(data_dir) not in setup
    assert trained["module"].results_record()["scaling"]["setup"]["tokenizer"] == "models/stories260K-hf"


def test_checkpoint_loads_weights_only(trained):
    path = trained["out"] / "last.ckpt"
    trained["trainer"].save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["tokens_seen"] == MAX_TOKENS
    assert checkpoint["hyper_parameters"]["betas"] == [0.9, 0.95]


def setup_hash(module) -> str:
    return module.results_record()["scaling"]["setup_hash"]


def test_setup_hash_ignores_model_size(trained, model_dir, data_dir):
    for overrides in [{"n_layer": 2}, {"d_model": 32}]:
        assert setup_hash(make_module(model_dir, data_dir, **overrides)) == setup_hash(trained["module"])


def test_setup_hash_ignores_batch_tokens(trained, tmp_path, model_dir, data_dir):
    module, _, _ = tiny_fit(tmp_path, model_dir, data_dir, batch_tokens=2 * BATCH_TOKENS)
    assert module.results_record()["scaling"]["batch_tokens"] == 2 * BATCH_TOKENS
    assert setup_hash(module) == setup_hash(trained["module"])


def test_setup_hash_changes_with_context_length(trained, model_dir, data_dir):
    assert setup_hash(make_module(model_dir, data_dir, context_length=2 * SEQ_LEN)) != setup_hash(trained["module"])


def test_context_longer_than_model_rejected(model_dir, data_dir):
    with pytest.raises(ConfigError, match="data.seq_len=512 is longer than model.max_context=256"):
        make_module(model_dir, data_dir, context_length=512, max_context=256)


# ---------------------------------------------------------------------------------------------------------------
# End to end through run.py


@pytest.mark.slow
def test_ladder_multirun_writes_curves(tmp_path):
    result = run_lab(
        "-m", "experiment=scaling_law", "model.n_layer=1", "model.d_model=16,32", f"paths.log_dir={tmp_path}",
        f"data.seq_len={SEQ_LEN}", f"data.batch_tokens={BATCH_TOKENS}", "data.max_train_tokens=16384",
        "data.max_val_tokens=2048", f"method.max_tokens={MAX_TOKENS}", "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "scaling_law" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [job.name for job in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "status.json").read_text())["status"] == "finished"
        rows = list(csv.DictReader(open(job / "csv" / "metrics.csv")))
        assert any(row.get("val/loss") and row.get("tokens") for row in rows)
    records = [results(job)["scaling"] for job in jobs]
    assert records[0]["n_params"] < records[1]["n_params"]
    assert records[0]["setup_hash"] == records[1]["setup_hash"]
