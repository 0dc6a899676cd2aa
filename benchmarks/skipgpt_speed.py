"""Dense vs routed (really skipping) inference throughput, beside the ideal speedup from skipped FLOPs.

    python benchmarks/skipgpt_speed.py [--device cpu|cuda] [--repeats N]

Two models: the real stories260K (5 layers, d=64) from $LAB_DATA_DIR, and a randomly initialised wider
Llama (8 layers, d=512) where compute dominates. Routes are fixed, not learned: in every layer an exact
share s of the tokens skips attention and an independent share s skips the MLP, so the work skipped is
known. The ideal ratio is 1 / (1 - skipped FLOPs / total FLOPs), counting matrix multiplications and
attention scores; a skipped attention still computes its token's keys and values (kv_for_skipped=keep).
Batched decoding on a CPU is bound by reading the weights, not by FLOPs. A module's weights are read unless
every row skips it, so the batch-4 decode rows show how far below the FLOP ideal that leaves it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.methods.skipgpt.model import KVCache, SkipGPT  # noqa: E402
from lab.models.causal_lm import build_llama  # noqa: E402

SPARSITIES = (0.0, 0.25, 0.4, 0.6)


def flops_per_token(config, context: float, s: float) -> tuple[float, float]:
    """(total, skipped) FLOPs per token at average attended context length `context` and sparsity s."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q_and_o = 2 * (2 * d * heads * head_dim)
    k_and_v = 2 * (2 * d * kv_heads * head_dim)
    scores = 2 * 2 * heads * head_dim * context  # QK^T and attention-weighted V
    mlp = 3 * 2 * d * config.intermediate_size
    routers = 2 * 2 * 2 * d
    per_layer = q_and_o + k_and_v + scores + mlp + routers
    total = layers * per_layer + 2 * d * vocab
    skipped = layers * (s * (q_and_o + scores) + s * mlp)
    return total, skipped


def exact_routes(layers: int, batch: int, tokens: int, s: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Execute gates with exactly round(s * tokens) skipped tokens per row, per layer and module type."""

    def one() -> torch.Tensor:
        gates = torch.ones(layers, batch, tokens)
        n_skip = round(s * tokens)
        for layer in range(layers):
            for row in range(batch):
                gates[layer, row, torch.randperm(tokens, generator=generator)[:n_skip]] = 0
        return gates

    return one(), one()


def timed(fn, repeats: int, device: str) -> float:
    """Fastest seconds of fn() over repeats, after one warm-up call (the minimum is the least noisy
    estimate on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def bench_model(name, model: SkipGPT, device, batch, prompt, decode_steps, repeats):
    config = model.base.config
    layers = config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=generator).to(device)
    rows = []
    for s in SPARSITIES:
        prefill_gates = tuple(g.to(device) for g in exact_routes(layers, batch, prompt, s, generator))
        # Decoding: in every row and layer, exactly round(s * decode_steps) of the steps skip each module type.
        step_gates = _spread_decode_routes(layers, batch, decode_steps, s, generator, device)

        dense_prefill = timed(lambda: model(ids, routing="dense"), repeats, device)
        routed_prefill = timed(lambda: model(ids, gates=prefill_gates, skip=True), repeats, device)

        def decode(routes):
            cache = KVCache()
            model(ids, routing="dense", skip=True, cache=cache)
            token = ids[:, -1:]
            start = time.perf_counter()
            for step in range(decode_steps):
                if routes is None:
                    model(token, routing="dense", skip=True, cache=cache)
                else:
                    model(token, gates=routes[step], skip=True, cache=cache)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        decode(None)
        dense_decode = min(decode(None) for _ in range(repeats))
        routed_decode = min(decode(step_gates) for _ in range(repeats))

        total, skipped = flops_per_token(config, (prompt + 1) / 2, s)
        ideal_prefill = total / (total - skipped)
        total_d, skipped_d = flops_per_token(config, prompt + decode_steps / 2, s)
        ideal_decode = total_d / (total_d - skipped_d)
        for mode, dense_t, routed_t, n_tokens, ideal in [
            ("prefill", dense_prefill, routed_prefill, batch * prompt, ideal_prefill),
            ("decode", dense_decode, routed_decode, batch * decode_steps, ideal_decode),
        ]:
            measured = dense_t / routed_t
            rows.append((name, mode, batch, s, n_tokens / dense_t, n_tokens / routed_t, measured, ideal, measured / ideal))
    return rows


def _spread_decode_routes(layers, batch, steps, s, generator, device):
    """Per-step gates, one token per row, drawn so that each row skips exactly round(s * steps) steps."""
    attn, mlp = exact_routes(layers, batch, steps, s, generator)
    return [(attn[:, :, t : t + 1].to(device), mlp[:, :, t : t + 1].to(device)) for t in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per cell (fastest reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")

    models = []
    data_dir = os.environ.get("LAB_DATA_DIR")
    real = Path(data_dir or "") / "models" / "stories260K-hf"
    if data_dir and real.is_dir():
        from transformers import AutoModelForCausalLM

        models.append(("stories260K (5L, d=64)", AutoModelForCausalLM.from_pretrained(real), 4, 256))
    else:
        print(f"skipping the real model: {real} not found (set LAB_DATA_DIR)")
    wide = build_llama(vocab_size=512, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376,
                       max_position_embeddings=1024)
    models.append(("wide Llama (8L, d=512)", wide, 4, 256))

    header = f"{'model':24} {'mode':8} {'batch':>5} {'sparsity':>8} {'dense tok/s':>12} {'routed tok/s':>13} {'measured':>9} {'ideal':>6} {'meas/ideal':>10}"
    print(header)
    print("-" * len(header))
    for name, lm, batch, prompt in models:
        model = SkipGPT(lm.eval()).to(args.device).eval()
        for decode_batch in (batch, 1):
            for row in bench_model(name, model, args.device, decode_batch, prompt, 32, args.repeats):
                if decode_batch == 1 and row[1] == "prefill":
                    continue
                print(f"{row[0]:24} {row[1]:8} {row[2]:>5} {row[3]:>8.2f} {row[4]:>12.0f} {row[5]:>13.0f} "
                      f"{row[6]:>8.2f}x {row[7]:>5.2f}x {row[8]:>10.2f}")


if __name__ == "__main__":
    main()
