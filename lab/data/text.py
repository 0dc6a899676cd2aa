"""Plain-text language-modelling data: read, check, tokenize and pack into fixed-length blocks.

Train and validation text come from separate files and are never mixed. A file whose stories are
separated by `<|endoftext|>` lines (the TinyStories train files) is split there; any other file is split at
blank lines. Every document starts with the tokenizer's BOS token, and the documents are concatenated and
cut into blocks of `seq_len` tokens (the last partial block is dropped).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lab.core.errors import ConfigError

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def data_root(path: str | None) -> Path:
    """Check and return the data root; `path` comes from `paths.data_dir` (default: $LAB_DATA_DIR)."""
    if not path:
        raise ConfigError(
            "the data root is not set: export LAB_DATA_DIR=/path/to/data (laid out as the README describes) "
            "or pass paths.data_dir=/path/to/data."
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {root} does not exist; set LAB_DATA_DIR or paths.data_dir to the data root.")
    return root


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, rejecting missing, empty, binary or undecodable files by name and line."""
    if not path.is_file():
        raise ConfigError(f"text file {path} does not exist; check data.train_files / data.val_file.")
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError(f"text file {path} is empty; it must hold UTF-8 text.")
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ConfigError(f"text file {path} line {line} contains a NUL byte; it looks binary, not UTF-8 text.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"text file {path} line {line} is not valid UTF-8 ({err.reason}); re-encode it as UTF-8."
        ) from None


def split_documents(text: str) -> list[str]:
    if END_OF_TEXT in text:
        parts = text.split(END_OF_TEXT)
    else:
        parts = text.split("\n\n")
    return [part.strip() for part in parts if part.strip()]


def tokenize_blocks(tokenizer, documents: list[str], seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Token blocks (n, seq_len) from BOS-prefixed documents, stopping once `max_tokens` are collected."""
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    batch = 256  # documents per tokenizer call
    for start in range(0, len(documents), batch):
        encoded = tokenizer(documents[start : start + batch], add_special_tokens=False)["input_ids"]
        for doc in encoded:
            if bos is not None:
                ids.append(bos)
            ids.extend(doc)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


class StepSampler(Sampler[int]):
    """Endless shuffled indices whose order depends only on (seed, position), so a resumed run gets the
    same batches it would have got without the interruption. Each rank takes every world_size-th index.
    """

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.start, self.rank, self.world_size = n, seed, start, rank, world_size

    def __iter__(self):
        step = self.start  # samples this rank has already consumed
        epoch, order = -1, None
        while True:
            position = step * self.world_size + self.rank  # position in the global, all-rank stream
            if position // self.n != epoch:
                epoch = position // self.n
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield int(order[position % self.n])
            step += 1


def blocks_per_batch(batch_tokens: int, seq_len: int) -> int:
    """Return the blocks in a batch of `batch_tokens` tokens, rejecting a budget that blocks cannot fill exactly."""
    if batch_tokens <= 0 or batch_tokens % seq_len:
        raise ConfigError(
            f"data.batch_tokens={batch_tokens} is not a positive multiple of data.seq_len={seq_len}; "
            f"use a multiple such as {max(1, round(batch_tokens / seq_len)) * seq_len}."
        )
    return batch_tokens // seq_len


class TextDataModule(LightningDataModule):
    """Train on `train_files` (a glob under the data root), evaluate on `val_file`; both must exist.

    A training batch contains `batch_size` blocks, or `batch_tokens // seq_len` blocks when `batch_tokens` is set.
    """

    def __init__(
        self,
        data_dir: str | None,
        tokenizer: str,
        train_files: str = "text/tinystories/*train*",
        val_file: str = "text/tinystories/tinystories_val.txt",
        seq_len: int = 256,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        max_train_tokens: int | None = None,
        max_val_tokens: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        source: str = "real",
        batch_tokens: int | None = None,
    ):
        super().__init__()
        if batch_tokens is not None:
            batch_size = blocks_per_batch(batch_tokens, seq_len)
        root = data_root(data_dir)
        self.train_paths = sorted(Path(p) for p in glob.glob(str(root / train_files)))
        if not self.train_paths:
            raise ConfigError(
                f"no training file matches data.train_files={train_files!r} under {root}; "
                "check the pattern or the data root."
            )
        self.val_path = root / val_file
        if self.val_path in self.train_paths:
            raise ConfigError(f"{self.val_path} is both a training and the validation file; keep them apart.")
        # Read every file now, so a bad file fails before any model is built.
        self.train_texts = [read_text(p) for p in self.train_paths]
        self.val_text = read_text(self.val_path)
        for path, text in [*zip(self.train_paths, self.train_texts), (self.val_path, self.val_text)]:
            if not split_documents(text):
                raise ConfigError(f"text file {path} contains no text once split into documents.")
        self.tokenizer_path = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.batch_tokens = batch_size * seq_len  # tokens per training batch on one device, all real (packed blocks)
        self.eval_batch_size = eval_batch_size
        self.max_train_tokens = max_train_tokens
        self.max_val_tokens = max_val_tokens
        self.seed = seed
        self.num_workers = num_workers
        self.source = source
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None

    def describe(self) -> dict:
        """Data provenance for results.json."""
        return {
            "source": self.source,
            "train_files": [str(p) for p in self.train_paths],
            "val_file": str(self.val_path),
            "train_blocks": None if self.train_blocks is None else int(self.train_blocks.shape[0]),
            "val_blocks": None if self.val_blocks is None else int(self.val_blocks.shape[0]),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "batch_tokens": self.batch_tokens,
        }

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        tokenizer.model_max_length = 1 << 62  # whole documents are tokenized, then cut into seq_len blocks
        train_docs = [doc for text in self.train_texts for doc in split_documents(text)]
        self.train_blocks = tokenize_blocks(tokenizer, train_docs, self.seq_len, self.max_train_tokens)
        self.val_blocks = tokenize_blocks(tokenizer, split_documents(self.val_text), self.seq_len, self.max_val_tokens)
        for name, blocks, path in [("train", self.train_blocks, self.train_paths), ("validation", self.val_blocks, [self.val_path])]:
            if blocks.shape[0] == 0:
                raise ConfigError(
                    f"{name} text ({', '.join(map(str, path))}) is shorter than one block of "
                    f"data.seq_len={self.seq_len} tokens; lower data.seq_len or add text."
                )
        log.info(
            "data (%s): %d train blocks from %d files, %d validation blocks from %s, %d tokens each",
            self.source, len(self.train_blocks), len(self.train_paths), len(self.val_blocks),
            self.val_path.name, self.seq_len,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = 0
        rank, world_size = 0, 1
        if trainer is not None:
            # After a restore, global_step counts the optimizer steps already taken; skip their batches.
            start = trainer.global_step * trainer.accumulate_grad_batches * self.batch_size
            rank, world_size = trainer.global_rank, trainer.world_size
        sampler = StepSampler(len(self.train_blocks), self.seed, start, rank, world_size)
        return DataLoader(
            TensorDataset(self.train_blocks), batch_size=self.batch_size, sampler=sampler,
            num_workers=self.num_workers, collate_fn=_collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(self.val_blocks), batch_size=self.eval_batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=_collate,
        )


def _collate(rows) -> dict:
    input_ids = torch.stack([row[0] for row in rows])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

