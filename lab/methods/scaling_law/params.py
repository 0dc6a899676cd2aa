"""Parameter counts for scaling laws: N is the non-embedding parameter count (Kaplan et al. 2020).

Embedding parameters are the token embedding, an LM head that does not share the embedding matrix, and any
learned positional table (Llama has none: RoPE has no parameters). Everything else counts towards N.
"""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict:
    """Count a model's parameters as {"non_embedding", "embedding", "total"}; a shared tensor counts once."""
    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):  # token embedding and learned positional tables
            embedding_ids.update(id(p) for p in module.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # an untied LM head; a tied one is the embedding matrix, already in the set
        embedding_ids.update(id(p) for p in head.parameters())

    total = embedding = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        total += p.numel()
        if id(p) in embedding_ids:
            embedding += p.numel()
    return {"non_embedding": total - embedding, "embedding": embedding, "total": total}


def llama_non_embedding_params(
    n_layer: int, d_model: int, n_head: int, n_kv_head: int | None, d_ff: int, head_dim: int | None = None,
    include_norms: bool = True,
) -> int:
    """Return the closed-form non-embedding parameter count of a Llama decoder without biases.

    Each layer has q and o projections of d_model x (n_head * head_dim) and k and v projections of
    d_model x (n_kv_head * head_dim). Its SwiGLU MLP has gate, up and down matrices of d_model x d_ff, and two
    RMSNorm weight vectors of d_model sit before attention and the MLP. One more RMSNorm follows the last layer.

    Norms are counted by default, because they are trained parameters outside the embedding and so the
    result equals `count_parameters(model)["non_embedding"]` exactly. They add (2 * n_layer + 1) * d_model,
    under 1% of N for d_model >= 32. Kaplan et al. 2020 leave norms and biases out and approximate
    N ~= 12 * n_layer * d_model^2 (attention 4 d^2 plus an MLP of width 4d, 8 d^2); with d_ff = 8/3 d_model
    and n_kv_head = n_head this block has the same 12 d^2 per layer.
    """
    n_kv_head = n_kv_head or n_head
    head_dim = head_dim or d_model // n_head
    attention = 2 * d_model * n_head * head_dim + 2 * d_model * n_kv_head * head_dim
    mlp = 3 * d_model * d_ff
    norms = 2 * d_model if include_norms else 0
    final_norm = d_model if include_norms else 0
    return n_layer * (attention + mlp + norms) + final_norm
