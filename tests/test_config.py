"""Every config composes and binds to its targets; bad keys fail fast with a message naming them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from lab.core.errors import ConfigError
from lab.core.resolvers import register_resolvers
from lab.core.validate import resolve_signature, validate_config

from conftest import ROOT, run_lab

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
register_resolvers()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_experiments_exist():
    assert "skipgpt_stage1" in EXPERIMENTS
    assert "skipgpt_stage2" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    validate_config(cfg)
    assert cfg.task_name == experiment


@pytest.mark.parametrize(
    "override",
    [f"debug={p.stem}" for p in (CONF / "debug").glob("*.yaml")]
    + [f"logger={p.stem}" for p in (CONF / "logger").glob("*.yaml")]
    + [f"trainer={p.stem}" for p in (CONF / "trainer").glob("*.yaml")],
)
def test_option_composes_and_validates(override):
    validate_config(compose_cfg("experiment=skipgpt_stage1", override))


def test_misspelled_argument_names_key_and_fix():
    cfg = compose_cfg("experiment=skipgpt_stage1", "+method.target_sparsiti=0.3")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "method.target_sparsiti" in str(err.value)
    assert "did you mean 'method.target_sparsity'" in str(err.value)


def test_misspelled_trainer_argument_is_caught():
    cfg = compose_cfg("experiment=skipgpt_stage1", "+trainer.max_step=5")
    with pytest.raises(ConfigError, match="trainer.max_step"):
        validate_config(cfg)


def test_missing_required_argument_is_caught():
    cfg = compose_cfg("experiment=skipgpt_stage1")
    with open_dict(cfg):
        del cfg.method["model_name_or_path"]
    with pytest.raises(ConfigError, match="model_name_or_path"):
        validate_config(cfg)


def test_signature_read_without_import():
    signature = resolve_signature("lightning.pytorch.Trainer")
    assert "max_steps" in signature.names
    assert not signature.var_keyword


def test_unimportable_target_is_reported():
    cfg = OmegaConf.create({"thing": {"_target_": "lab.no_such_module.Thing", "x": 1}})
    with pytest.raises(ConfigError, match="lab.no_such_module.Thing"):
        validate_config(cfg)


def test_seed_zero_is_kept():
    assert compose_cfg("experiment=skipgpt_stage1", "seed=0").seed == 0


def test_cfg_job_prints_without_torch():
    result = run_lab("experiment=skipgpt_stage1", "--cfg", "job", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    assert "task_name: skipgpt_stage1" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "hydra" in imported
    assert "torch" not in imported


def test_unknown_experiment_message():
    result = run_lab("experiment=skipgpt_stage9")
    assert result.returncode != 0
    assert "experiment/skipgpt_stage9" in result.stderr
    assert "skipgpt_stage1" in result.stderr  # Hydra lists the available options


def test_misspelled_override_message():
    result = run_lab("experiment=skipgpt_stage1", "method.target_sparsiti=0.3")
    assert result.returncode != 0
    assert "target_sparsiti" in result.stderr


def test_misspelled_argument_fails_before_training(tmp_path):
    result = run_lab("experiment=skipgpt_stage1", "+method.alpah=3", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    assert "error: config key 'method.alpah' is not an argument" in result.stderr
    assert "did you mean 'method.alpha'" in result.stderr
    assert not list(Path(tmp_path).glob("**/checkpoints/*.ckpt"))


def test_env_data_root_is_read(monkeypatch):
    monkeypatch.setenv("LAB_DATA_DIR", "/some/data")
    cfg = compose_cfg("experiment=skipgpt_stage1")
    assert cfg.paths.data_dir == "/some/data"
    assert cfg.model.name_or_path == "/some/data/models/stories260K-hf"
    assert os.environ["LAB_DATA_DIR"] == "/some/data"
