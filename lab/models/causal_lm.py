"""Loading causal LMs through the ordinary `transformers` calls, so a hub id works where a hub is reachable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lab.core.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def check_model_path(name_or_path: str) -> None:
    """Reject a local model path that does not exist, before anything loads.

    A string that is not an existing directory is passed on as a hub id, unless it looks like a filesystem
    path (absolute, or starting with '.' or '~').
    """
    looks_local = name_or_path.startswith(("/", ".", "~"))
    path = Path(name_or_path).expanduser()
    data_dir = os.environ.get("LAB_DATA_DIR")
    if not looks_local and not path.is_dir() and data_dir and (Path(data_dir) / name_or_path).is_dir():
        raise ConfigError(
            f"model.name_or_path={name_or_path} is not a directory here, but {Path(data_dir) / name_or_path} is; "
            "paths are relative to the working directory, so write model.name_or_path=${paths.data_dir}/"
            f"{name_or_path} or the full path."
        )
    if looks_local and not path.is_dir():
        raise ConfigError(
            f"model directory {path} does not exist; set model.name_or_path to a Hugging Face model "
            "directory or hub id, or LAB_DATA_DIR to the data root that holds models/."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model directory {path} has no config.json; it is not a Hugging Face model directory.")


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    """Load a `*ForCausalLM` with AutoModelForCausalLM; any Llama-family decoder works with SkipGPT."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_path(name_or_path)
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:  # missing files, no hub access, unknown model_type
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"could not load model {name_or_path!r}: {reason} Give a local Hugging Face model directory "
            "(absolute, or starting with './'), or a hub id on a machine that can reach the hub."
        ) from None
    layer = model.model.layers[0]
    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
        if not hasattr(layer, name):
            raise ConfigError(
                f"model {name_or_path} ({type(model).__name__}) has no '{name}' in its decoder layers; "
                "SkipGPT supports the Llama layer layout (Llama, Mistral, Qwen2)."
            )
    return model


def build_llama(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int | None = None,
    intermediate_size: int | None = None, max_position_embeddings: int = 2048, seed: int = 0,
    tie_word_embeddings: bool = True, bos_token_id: int | None = 1, eos_token_id: int | None = 2,
):
    """Build a randomly initialised LlamaForCausalLM from sizes, for pretraining, benchmarks and self-generated
    data. With `tie_word_embeddings` the LM head reuses the token-embedding matrix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or int(8 * hidden_size / 3 / 32 + 0.999) * 32,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
