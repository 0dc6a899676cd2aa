"""SkipGPT training stages: which parameters train, what checkpoints hold, how stage 2 finds stage 1."""

from __future__ import annotations

import json

import pytest
import torch

from lab.core.errors import ConfigError
from lab.methods.skipgpt.module import ROUTERS_FILE, SkipGPTModule, find_stage1_run


def batch(seed=0):
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def train_one_step(module: SkipGPTModule) -> dict[str, torch.Tensor]:
    """Take one optimizer step outside a Trainer; return the parameters from before it."""
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    loss = module.training_step(batch(), 0)
    loss.backward()
    optimizer.step()
    return before


def changed(module, before) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


@pytest.fixture
def stage1(model_dir, monkeypatch):
    module = SkipGPTModule(str(model_dir), stage=1)
    monkeypatch.setattr(SkipGPTModule, "log", lambda *a, **k: None)  # no Trainer to log to
    return module


def test_stage1_trains_only_routers(stage1):
    trainable = {n for n, p in stage1.named_parameters() if p.requires_grad}
    assert trainable
    assert all("routers." in n for n in trainable)
    before = train_one_step(stage1)
    assert changed(stage1, before)
    assert all("routers." in n for n in changed(stage1, before))


def test_stage2_trains_only_lora(stage1, model_dir, tmp_path):
    stage1.save_routers(tmp_path / ROUTERS_FILE)
    stage2 = SkipGPTModule(str(model_dir), stage=2, stage1_run=str(tmp_path))
    trainable = {n for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "v_proj", "gate_proj"}
    before = train_one_step(stage2)
    assert changed(stage2, before)
    assert all("lora_" in n for n in changed(stage2, before))


def test_stage2_loads_stage1_routers(stage1, model_dir, tmp_path):
    with torch.no_grad():
        stage1.model.attn_routers[0].net[0].bias.fill_(0.123)
    stage1.save_routers(tmp_path / ROUTERS_FILE)
    stage2 = SkipGPTModule(str(model_dir), stage=2, stage1_run=str(tmp_path))
    assert torch.allclose(stage2.model.attn_routers[0].net[0].bias, torch.tensor(0.123))


def test_stage2_rejects_router_mismatch(stage1, model_dir, tmp_path):
    stage1.save_routers(tmp_path / ROUTERS_FILE)
    with pytest.raises(ConfigError, match="method.router_type='mlp' differs from the stage-1 run"):
        SkipGPTModule(str(model_dir), stage=2, stage1_run=str(tmp_path), router_type="mlp")


def test_stage2_without_stage1_run_message(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no finished stage-1 run under"):
        SkipGPTModule(str(model_dir), stage=2, stage1_search_dir=str(tmp_path))


def test_latest_finished_stage1_run_is_found(tmp_path):
    for name, status in [("a", "finished"), ("b", "finished"), ("c", "failed")]:
        run = tmp_path / name
        run.mkdir()
        (run / ROUTERS_FILE).write_bytes(b"x")
        (run / "status.json").write_text(json.dumps({"status": status}))
    import os

    os.utime(tmp_path / "a" / ROUTERS_FILE, (1, 1))
    assert find_stage1_run(None, str(tmp_path)) == tmp_path / "b"


def test_missing_model_dir_message(tmp_path):
    with pytest.raises(ConfigError, match=f"model directory {tmp_path / 'nope'} does not exist"):
        SkipGPTModule(str(tmp_path / "nope"))


def test_invalid_switch_message(model_dir):
    with pytest.raises(ConfigError, match="method.router_type='conv' is not one of linear, mlp"):
        SkipGPTModule(str(model_dir), router_type="conv")


def test_checkpoint_keeps_only_trained_weights(stage1):
    checkpoint = {"state_dict": stage1.state_dict()}
    stage1.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"]
    assert all("routers." in k for k in checkpoint["state_dict"])


def test_hyperparameters_are_plain(stage1):
    allowed = (int, float, str, bool, type(None), list)
    assert all(isinstance(v, allowed) for v in stage1.hparams.values())


def test_model_path_relative_to_data_root_message(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"write model.name_or_path=\$\{paths.data_dir\}/models/stories260K-hf"):
        SkipGPTModule("models/stories260K-hf")


def test_unloadable_model_message(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"could not load model '{tmp_path}'"):
        SkipGPTModule(str(tmp_path))
