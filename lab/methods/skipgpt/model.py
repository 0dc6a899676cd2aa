"""SkipGPT: token-aware dynamic skipping of attention and MLP modules in a pretrained decoder.

SkipGPT (Zhao et al., 2025) puts two routers in every decoder layer, one before attention and one before
the MLP. Each router looks at one token's hidden state and decides whether that module runs for that
token. A skipped module leaves the residual stream unchanged:

    x = x + g_attn * attention(norm(x))      g in {0, 1} per token
    x = x + g_mlp  * mlp(norm(x))

`SkipGPT` wraps a Hugging Face `*ForCausalLM` of the Llama family (Llama, Mistral, Qwen2: same layer
layout) and runs its weights through the forward pass below, so every module it calls is the model's own
(and LoRA-wrapped modules work unchanged). There are two ways to apply the gates:

- gated (`skip=False`): every module runs on every token and its output is multiplied by the gate. This is
  what training needs, because the router gradient flows through the product.
- skipped (`skip=True`, inference): a module runs only on the tokens routed to it (gather, compute,
  scatter), so skipped tokens cost nothing there. By default (`kv_for_skipped="keep"`) a token that skips
  attention still has its keys and values computed and cached, so later tokens can attend to it. With
  `kv_for_skipped="drop"` they are neither computed nor attended to.

Router logits are ordered (execute, skip), as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_TYPES = ("linear", "mlp")
MLP_ROUTER_INPUTS = ("post_attention", "layer_input")
ROUTINGS = ("gumbel", "argmax", "sample", "dense", "all_skip")
KV_FOR_SKIPPED = ("keep", "drop")


class Router(nn.Module):
    """Two logits (execute, skip) per token from its hidden state.

    `linear` is d -> 2 (the paper's router); `mlp` is d -> d/4 -> ReLU -> 2 (the official code's). Both use
    Kaiming-uniform weights and zero biases, as the official code does.
    """

    def __init__(self, hidden_size: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(hidden_size, 2))
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden_size // 4), nn.ReLU(), nn.Linear(hidden_size // 4, 2)
            )
        else:
            raise ValueError(f"router kind {kind!r} is not one of {ROUTER_TYPES}")
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu" if kind == "mlp" else "linear")
                nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Routers run in float32 whatever the model dtype, so bf16 models route the same way.
        return self.net(hidden.float())


def execute_gate(logits: torch.Tensor, routing: str, temperature: float, noise_scale: float = 1.0) -> torch.Tensor:
    """Return the execute gate (..., ) in {0, 1} from router logits (..., 2).

    `gumbel` takes the hard one-hot argmax of logits + noise_scale * Gumbel noise in the forward pass and
    the gradient of softmax((logits + noise) / temperature) in the backward pass (straight-through). With
    noise_scale 1 this is torch's `gumbel_softmax(hard=True)`, the paper's rule; at 0 it is a
    straight-through argmax, the rule evaluation uses. `argmax` is the deterministic evaluation rule;
    `sample` draws from the router's softmax without a gradient.
    """
    if routing == "gumbel":
        noise = -torch.empty_like(logits).exponential_().log()  # standard Gumbel samples
        soft = ((logits + noise_scale * noise) / temperature).softmax(dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), num_classes=2).to(soft.dtype)
        return (hard - soft.detach() + soft)[..., 0]
    if routing == "argmax":
        return (logits[..., 0] >= logits[..., 1]).float()
    if routing == "sample":
        return torch.bernoulli(logits.softmax(dim=-1)[..., 0])
    raise ValueError(f"routing {routing!r} is not one of {ROUTINGS}")


class KVCache:
    """Keys and values per layer, (batch, kv_heads, positions, head_dim), plus which keys may be attended.

    Storage grows by doubling, so appending one decoded token copies nothing in the common case.
    """

    def __init__(self):
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._key_mask: list[torch.Tensor] = []  # (batch, positions) bool
        self._lengths: list[int] = []

    @property
    def length(self) -> int:
        return self._lengths[0] if self._lengths else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """Add new positions to one layer; return that layer's keys, values and key mask so far."""
        if layer == len(self._keys):
            self._keys.append(k)
            self._values.append(v)
            self._key_mask.append(mask)
            self._lengths.append(k.shape[2])
        else:
            start, end = self._lengths[layer], self._lengths[layer] + k.shape[2]
            if end > self._keys[layer].shape[2]:
                self._grow(layer, max(end, 2 * self._keys[layer].shape[2]))
            self._keys[layer][:, :, start:end] = k
            self._values[layer][:, :, start:end] = v
            self._key_mask[layer][:, start:end] = mask
            self._lengths[layer] = end
        n = self._lengths[layer]
        return self._keys[layer][:, :, :n], self._values[layer][:, :, :n], self._key_mask[layer][:, :n]

    def _grow(self, layer: int, capacity: int) -> None:
        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity - shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        self._keys[layer] = grown(self._keys[layer], 2)
        self._values[layer] = grown(self._values[layer], 2)
        self._key_mask[layer] = grown(self._key_mask[layer], 1)


@dataclass
class RoutedOutput:
    logits: torch.Tensor  # (batch, tokens, vocab)
    attn_gates: torch.Tensor  # (layers, batch, tokens) execute gates, with gradient under gumbel routing
    mlp_gates: torch.Tensor  # (layers, batch, tokens)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the Hugging Face layout; x (B, heads, T, hd), cos/sin (B, T, hd)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class SkipGPT(nn.Module):
    """A Llama-family causal LM with an attention router and an MLP router in every layer."""

    def __init__(
        self,
        causal_lm: nn.Module,
        router_type: str = "linear",
        mlp_router_input: str = "post_attention",
        kv_for_skipped: str = "keep",
    ):
        super().__init__()
        if mlp_router_input not in MLP_ROUTER_INPUTS:
            raise ValueError(f"mlp_router_input {mlp_router_input!r} is not one of {MLP_ROUTER_INPUTS}")
        if kv_for_skipped not in KV_FOR_SKIPPED:
            raise ValueError(f"kv_for_skipped {kv_for_skipped!r} is not one of {KV_FOR_SKIPPED}")
        self.lm = causal_lm
        self.mlp_router_input = mlp_router_input
        self.kv_for_skipped = kv_for_skipped
        config = causal_lm.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        # NOTE: Mistral's sliding window is not applied; sequences must fit in the window (4096 tokens there).
        n_layers = len(self.layers)
        self.attn_routers = nn.ModuleList(Router(config.hidden_size, router_type) for _ in range(n_layers))
        self.mlp_routers = nn.ModuleList(Router(config.hidden_size, router_type) for _ in range(n_layers))

    # The decoder is reached through properties, not attributes, so its modules are registered once (under
    # `lm`) and the paths stay valid after peft wraps `lm`.
    @property
    def base(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.model.layers

    def module_params(self) -> tuple[int, int]:
        """Parameters of one layer's attention and of its MLP, for sparsity in parameter units."""
        layer = self.layers[0]
        attn = sum(p.numel() for n, p in layer.self_attn.named_parameters() if "lora_" not in n)
        mlp = sum(p.numel() for n, p in layer.mlp.named_parameters() if "lora_" not in n)
        return attn, mlp

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        routing: str = "argmax",
        temperature: float = 1.0,
        noise_scale: float = 1.0,
        skip: bool = False,
        cache: KVCache | None = None,
        gates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RoutedOutput:
        """Run the routed model on (batch, tokens) ids; `attention_mask` is 1 for real tokens, 0 for padding.

        With a cache, the ids continue the cached sequence and the cache is extended in place. `gates`, two
        (layers, batch, tokens) tensors of execute gates for attention and MLP, replaces the routers'
        decisions (benchmarks use it to skip an exact share of modules).
        """
        decoder = self.base.model
        batch, tokens = input_ids.shape
        past = cache.length if cache is not None else 0
        valid = (
            torch.ones(batch, tokens, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        # NOTE: positions count from the first column, which suits right padding only; left-padded batches
        # would need per-row position ids.
        positions = torch.arange(past, past + tokens, device=input_ids.device).expand(batch, tokens)

        x = decoder.embed_tokens(input_ids)
        cos, sin = decoder.rotary_emb(x, positions)
        attn_gates, mlp_gates = [], []
        for i, layer in enumerate(self.layers):
            layer_input = x
            if gates is None:
                g_attn = self._gate(self.attn_routers[i], x, routing, temperature, noise_scale)
            else:
                g_attn = gates[0][i]
            x = self._attention(i, layer, x, g_attn, valid, positions, cos, sin, skip, cache)
            router_input = x if self.mlp_router_input == "post_attention" else layer_input
            if gates is None:
                g_mlp = self._gate(self.mlp_routers[i], router_input, routing, temperature, noise_scale)
            else:
                g_mlp = gates[1][i]
            x = self._mlp(layer, x, g_mlp, valid, skip)
            attn_gates.append(g_attn)
            mlp_gates.append(g_mlp)
        logits = self.base.lm_head(decoder.norm(x))
        return RoutedOutput(logits, torch.stack(attn_gates), torch.stack(mlp_gates))

    def _gate(self, router: Router, hidden, routing: str, temperature: float, noise_scale: float) -> torch.Tensor:
        if routing == "dense":
            return hidden.new_ones(hidden.shape[:2], dtype=torch.float32)
        if routing == "all_skip":
            return hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        return execute_gate(router(hidden), routing, temperature, noise_scale)

    def _mlp(self, layer, x, gate, valid, skip: bool) -> torch.Tensor:
        active = (gate > 0) & valid
        if not skip or bool(active.all()):  # nothing to skip: the plain path saves the gather and scatter
            return x + gate.unsqueeze(-1).to(x.dtype) * layer.mlp(layer.post_attention_layernorm(x))
        flat = x.reshape(-1, x.shape[-1])
        rows = active.reshape(-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return x
        out = layer.mlp(layer.post_attention_layernorm(flat.index_select(0, rows)))
        return flat.index_add(0, rows, out.to(x.dtype)).view_as(x)

    def _attention(self, i, layer, x, gate, valid, positions, cos, sin, skip: bool, cache) -> torch.Tensor:
        attn = layer.self_attn
        batch, tokens, _ = x.shape
        h = layer.input_layernorm(x)
        executed = gate.detach() > 0
        if skip and bool((executed & valid).all()):
            skip = False  # nothing to skip: the plain path saves the gather and scatter
        # Keys a later query may attend to: real tokens, minus skipped ones when their keys are dropped.
        key_mask = valid & executed if self.kv_for_skipped == "drop" else valid

        if skip and self.kv_for_skipped == "drop":
            k, v = self._kv_for_rows(attn, h, key_mask, cos, sin)
        else:
            k, v = self._kv(attn, h, cos, sin)
        if cache is not None:
            k, v, key_mask = cache.append(i, k, v, key_mask)
        key_positions = torch.arange(k.shape[2], device=x.device)

        if not skip:
            q = attn.q_proj(h).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
            q = apply_rope(q, cos, sin)
            out = self._sdpa(q, k, v, positions, key_positions, key_mask)
            out = attn.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
            return x + gate.unsqueeze(-1).to(x.dtype) * out

        # Skipped path: queries only for executed tokens, packed to the left of each row.
        active = executed & valid
        counts = active.sum(dim=1)
        width = int(counts.max())
        if width == 0:
            return x
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, width)
        slot_used = torch.arange(width, device=x.device) < counts.unsqueeze(1)
        h_sel = h.gather(1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        q = attn.q_proj(h_sel).view(batch, width, self.num_heads, self.head_dim).transpose(1, 2)
        cos_sel = cos.gather(1, order.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
        sin_sel = sin.gather(1, order.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
        q = apply_rope(q, cos_sel, sin_sel)
        out = self._sdpa(q, k, v, positions.gather(1, order), key_positions, key_mask)
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
        out = out * slot_used.unsqueeze(-1).to(out.dtype)  # unused slots add zero to their row
        return x.scatter_add(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]), out.to(x.dtype))

    def _kv(self, attn, h, cos, sin):
        batch, tokens, _ = h.shape
        k = attn.k_proj(h).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def _kv_for_rows(self, attn, h, rows_mask, cos, sin):
        """Keys and values computed only where rows_mask is set; zeros elsewhere (masked out anyway)."""
        batch, tokens, d = h.shape
        rows = rows_mask.reshape(-1).nonzero().squeeze(-1)
        width = self.num_kv_heads * self.head_dim
        k_flat = h.new_zeros(batch * tokens, width)
        v_flat = h.new_zeros(batch * tokens, width)
        if rows.numel():
            h_rows = h.reshape(-1, d).index_select(0, rows)
            k_flat = k_flat.index_copy(0, rows, attn.k_proj(h_rows))
            v_flat = v_flat.index_copy(0, rows, attn.v_proj(h_rows))
        k = k_flat.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v_flat.view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def _sdpa(self, q, k, v, query_positions, key_positions, key_mask):
        """Causal attention of queries at absolute `query_positions` (B, Tq) over all cached keys."""
        allowed = key_positions.view(1, 1, -1) <= query_positions.unsqueeze(-1)  # (B, Tq, Tk)
        allowed = allowed & key_mask.unsqueeze(1)
        # Every query may attend to its own key. This keeps rows that drop or padding would empty from
        # giving NaN, and changes nothing for an executed real token, whose own key is always kept.
        allowed = allowed | (key_positions.view(1, 1, -1) == query_positions.unsqueeze(-1))
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), scale=self.head_dim**-0.5)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, routing="argmax", skip=True) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns prompt and new ids."""
        cache = KVCache()
        out = self(input_ids, routing=routing, skip=skip, cache=cache)
        ids = input_ids
        for _ in range(max_new_tokens):
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            out = self(next_id, routing=routing, skip=skip, cache=cache)
        return ids


def sparsity(gates: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fraction of (layer, token) pairs skipped, over real tokens only; differentiable through the gates."""
    weight = valid.to(gates.dtype).unsqueeze(0).expand_as(gates)
    return 1.0 - (gates * weight).sum() / weight.sum().clamp_min(1.0)


def overall_sparsity(out: RoutedOutput, valid: torch.Tensor, unit: str, attn_params: int, mlp_params: int):
    """Skipped share of all modules (`module` units) or of all module parameters (`parameter` units)."""
    s_attn = sparsity(out.attn_gates, valid)
    s_mlp = sparsity(out.mlp_gates, valid)
    if unit == "module":
        return (s_attn + s_mlp) / 2
    if unit == "parameter":
        return (attn_params * s_attn + mlp_params * s_mlp) / (attn_params + mlp_params)
    raise ValueError(f"sparsity unit {unit!r} is not 'module' or 'parameter'")


def linear_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Interpolate linearly from `start` at step 0 to `end` at the last step."""
    if total_steps <= 1:
        return end
    fraction = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * fraction


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))
