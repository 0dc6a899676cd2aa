"""Text data: bad files stop with a message naming them, train and validation stay apart, order resumes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lab.core.errors import ConfigError
from lab.data.text import StepSampler, TextDataModule, split_documents


def make_root(tmp_path: Path, train: bytes, val: bytes) -> Path:
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a_train.txt").write_bytes(train)
    (tmp_path / "text" / "val.txt").write_bytes(val)
    return tmp_path


def datamodule(root, model_dir, **kwargs):
    return TextDataModule(
        data_dir=str(root), tokenizer=str(model_dir), train_files="text/*train*", val_file="text/val.txt", **kwargs
    )


def test_missing_data_root_message():
    with pytest.raises(ConfigError, match="LAB_DATA_DIR"):
        TextDataModule(data_dir=None, tokenizer="unused")


def test_nonexistent_data_root_message(tmp_path):
    with pytest.raises(ConfigError, match=f"data root {tmp_path / 'nope'} does not exist"):
        TextDataModule(data_dir=str(tmp_path / "nope"), tokenizer="unused")


def test_no_train_file_message(tmp_path, model_dir):
    (tmp_path / "text").mkdir()
    with pytest.raises(ConfigError, match=r"no training file matches data.train_files='text/\*train\*'"):
        datamodule(tmp_path, model_dir)


def test_missing_val_file_message(tmp_path, model_dir):
    root = make_root(tmp_path, b"Once upon a time.\n", b"x\n")
    (root / "text" / "val.txt").unlink()
    with pytest.raises(ConfigError, match=r"val.txt does not exist"):
        datamodule(root, model_dir)


def test_empty_file_message(tmp_path, model_dir):
    root = make_root(tmp_path, b"Once upon a time.\n", b"\n  \n")
    with pytest.raises(ConfigError, match=r"val.txt is empty"):
        datamodule(root, model_dir)


def test_invalid_utf8_names_line(tmp_path, model_dir):
    root = make_root(tmp_path, b"line one\nline two\nbad \xff byte\n", b"fine\n")
    with pytest.raises(ConfigError, match=r"a_train.txt line 3 is not valid UTF-8"):
        datamodule(root, model_dir)


def test_binary_file_names_line(tmp_path, model_dir):
    root = make_root(tmp_path, b"text\n", b"ok\nstill ok\n\x00\x01\x02")
    with pytest.raises(ConfigError, match=r"val.txt line 3 contains a NUL byte"):
        datamodule(root, model_dir)


def test_text_shorter_than_block_message(tmp_path, model_dir):
    root = make_root(tmp_path, b"Once upon a time.\n", b"The end.\n")
    dm = datamodule(root, model_dir, seq_len=256)
    with pytest.raises(ConfigError, match="shorter than one block of data.seq_len=256"):
        dm.setup()


def test_val_file_excluded_from_training(tmp_path, model_dir):
    root = make_root(tmp_path, b"a\n", b"b\n")
    with pytest.raises(ConfigError, match="both a training and the validation file"):
        TextDataModule(data_dir=str(root), tokenizer=str(model_dir), train_files="text/*.txt", val_file="text/val.txt")


def test_real_tinystories_split_kept_apart(data_dir, model_dir):
    dm = TextDataModule(data_dir=str(data_dir), tokenizer=str(model_dir), seq_len=64, max_train_tokens=4096, max_val_tokens=4096)
    assert all("train" in p.name for p in dm.train_paths)
    assert dm.val_path.name == "tinystories_val.txt"
    assert dm.val_path not in dm.train_paths
    dm.setup()
    assert dm.train_blocks.shape == (64, 64)
    assert dm.val_blocks.shape == (64, 64)
    assert dm.train_blocks[0, 0].item() == 1  # every document starts with BOS


def test_documents_split_on_end_of_text():
    text = "one\n\ntwo\n<|endoftext|>\nthree\n<|endoftext|>\n"
    assert split_documents(text) == ["one\n\ntwo", "three"]
    assert split_documents("a\n\nb\n") == ["a", "b"]


def test_sampler_resumes_where_it_stopped():
    full = list(itertools.islice(iter(StepSampler(10, seed=3)), 25))
    resumed = list(itertools.islice(iter(StepSampler(10, seed=3, start=12)), 13))
    assert resumed == full[12:]


def test_sampler_ranks_partition_stream():
    whole = list(itertools.islice(iter(StepSampler(7, seed=1)), 14))
    rank0 = list(itertools.islice(iter(StepSampler(7, seed=1, rank=0, world_size=2)), 7))
    rank1 = list(itertools.islice(iter(StepSampler(7, seed=1, rank=1, world_size=2)), 7))
    assert rank0 == whole[0::2]
    assert rank1 == whole[1::2]
