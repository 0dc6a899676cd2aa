"""A self-generated stand-in for the data root, used by `make run` only when the real data is absent.

It writes template stories (train and validation from the same grammar with different seeds), a
character-level tokenizer, and a small Llama model pretrained on the training stories for a few hundred
steps. All are in Hugging Face formats, so the pipeline loads them with the same calls as the real model.
Results on it show only that the pipeline runs; they are labelled `"data": "synthetic"`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

TRAIN_FILE = "text/synthetic/synthetic_train.txt"
VAL_FILE = "text/synthetic/synthetic_val.txt"
MODEL_DIR = "models/synthetic-llama"

_NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue"]
_ANIMALS = ["cat", "dog", "bird", "fox", "frog", "bear", "duck", "fish"]
_ADJECTIVES = ["little", "happy", "big", "kind", "shy", "brave", "small", "funny"]
_PLACES = ["park", "garden", "forest", "house", "river", "school", "beach", "farm"]
_VERBS = ["play", "run", "sing", "jump", "swim", "read", "dance", "draw"]
_THINGS = ["ball", "box", "hat", "kite", "cake", "book", "toy", "shell"]


def story(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    animal, adjective, place = rng.choice(_ANIMALS), rng.choice(_ADJECTIVES), rng.choice(_PLACES)
    verb, thing = rng.choice(_VERBS), rng.choice(_THINGS)
    return (
        f"Once upon a time there was a {adjective} {animal} named {name}. {name} liked to {verb} in the {place}.\n"
        f"One day {name} found a {thing} in the {place}. {name} showed the {thing} to {friend}.\n"
        f"{friend} said, \"What a nice {thing}!\" They liked to {verb} together every day. The end."
    )


def write_stories(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(story(rng) + "\n<|endoftext|>\n" for _ in range(n)), encoding="utf-8")


def build_tokenizer(texts: list[str]):
    """Build a character-level PreTrainedTokenizerFast with <unk>=0, <s>=1, </s>=2."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for text in texts for c in text})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_synthetic_root(root: Path, pretrain_steps: int = 300, seed: int = 0) -> Path:
    """Write the synthetic data root (text, tokenizer, pretrained model) unless it already exists."""
    import torch

    from lab.data.text import split_documents, tokenize_blocks
    from lab.models.causal_lm import build_llama

    root = Path(root)
    model_dir = root / MODEL_DIR
    if (model_dir / "model.safetensors").is_file():
        return root
    write_stories(root / TRAIN_FILE, n=3000, seed=seed)
    write_stories(root / VAL_FILE, n=300, seed=seed + 1)
    train_text = (root / TRAIN_FILE).read_text(encoding="utf-8")
    tokenizer = build_tokenizer([train_text, (root / VAL_FILE).read_text(encoding="utf-8")])
    blocks = tokenize_blocks(tokenizer, split_documents(train_text), seq_len=128, max_tokens=None)

    model = build_llama(len(tokenizer), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                        intermediate_size=172, max_position_embeddings=512, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(pretrain_steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == pretrain_steps - 1:
            log.info("synthetic model pretraining: step %d/%d, loss %.3f", step + 1, pretrain_steps, loss.item())
    model.eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return root
