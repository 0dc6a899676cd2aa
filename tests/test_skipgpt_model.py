"""SkipGPT mechanism: exact invariants of routers, gating, skipping and caching on tiny inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lab.methods.skipgpt.model import (
    KVCache,
    Router,
    SkipGPT,
    execute_gate,
    linear_schedule,
    overall_sparsity,
    sparsity,
)

@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def routed(hf_model, **kwargs) -> SkipGPT:
    torch.manual_seed(0)
    return SkipGPT(hf_model, **kwargs).eval()


def token_ids(batch=2, tokens=24, seed=0):
    return torch.randint(3, 512, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_gumbel_gates_hard_with_router_gradient():
    router = Router(16, "linear")
    hidden = torch.randn(4, 10, 16)
    gate = execute_gate(router(hidden), "gumbel", temperature=2.0)
    assert set(gate.unique().tolist()) <= {0.0, 1.0}
    (gate * torch.arange(10.0)).sum().backward()
    assert router.net[0].weight.grad is not None
    assert router.net[0].weight.grad.abs().sum() > 0


def test_mlp_router_shape():
    router = Router(64, "mlp")
    assert [m.out_features for m in router.net if isinstance(m, torch.nn.Linear)] == [16, 2]
    assert router(torch.randn(3, 64)).shape == (3, 2)


def test_argmax_gate_is_deterministic():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert execute_gate(logits, "argmax", 1.0).tolist() == [1.0, 0.0]


def test_all_execute_equals_dense_model(hf_model):
    ids = token_ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = routed(hf_model)(ids, routing="dense").logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_all_skip_makes_layers_identity(hf_model):
    ids = token_ids()
    with torch.no_grad():
        got = routed(hf_model)(ids, routing="all_skip").logits
        embeddings = hf_model.model.embed_tokens(ids)
        expected = hf_model.lm_head(hf_model.model.norm(embeddings))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kv_for_skipped", ["keep", "drop"])
@pytest.mark.parametrize("router_type,mlp_router_input", [("linear", "post_attention"), ("mlp", "layer_input")])
def test_skipped_equals_gated(hf_model, kv_for_skipped, router_type, mlp_router_input):
    model = routed(hf_model, router_type=router_type, mlp_router_input=mlp_router_input, kv_for_skipped=kv_for_skipped)
    ids = token_ids(batch=3, tokens=20)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding in one row
    with torch.no_grad():
        gated = model(ids, mask, routing="argmax", skip=False)
        skipped = model(ids, mask, routing="argmax", skip=True)
    assert 0 < gated.attn_gates.mean() < 1, "the test needs a mix of executed and skipped tokens"
    real = mask.bool()
    assert torch.equal(gated.attn_gates[:, real], skipped.attn_gates[:, real])
    assert torch.equal(gated.mlp_gates[:, real], skipped.mlp_gates[:, real])
    torch.testing.assert_close(skipped.logits[real], gated.logits[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv_for_skipped", ["keep", "drop"])
def test_cached_decoding_equals_full_pass(hf_model, kv_for_skipped):
    model = routed(hf_model, kv_for_skipped=kv_for_skipped)
    ids = token_ids(batch=2, tokens=30)
    with torch.no_grad():
        full = model(ids, routing="argmax", skip=False)
        cache = KVCache()
        steps = [model(ids[:, :12], routing="argmax", skip=True, cache=cache)]
        for t in range(12, 30):
            steps.append(model(ids[:, t : t + 1], routing="argmax", skip=True, cache=cache))
    assert cache.length == 30
    torch.testing.assert_close(torch.cat([s.logits for s in steps], dim=1), full.logits, rtol=0, atol=1e-4)
    assert torch.equal(torch.cat([s.attn_gates for s in steps], dim=2), full.attn_gates)


def test_drop_differs_from_keep(hf_model):
    ids = token_ids()
    with torch.no_grad():
        keep = routed(hf_model, kv_for_skipped="keep")(ids, routing="argmax").logits
        drop = routed(hf_model, kv_for_skipped="drop")(ids, routing="argmax").logits
    assert (keep - drop).abs().max() > 1e-3


def test_generate_matches_hf_greedy_when_dense(hf_model):
    prompt = torch.tensor([[1]])
    with torch.no_grad():
        ours = routed(hf_model).generate(prompt, max_new_tokens=20, routing="dense", skip=True)
        theirs = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_sparsity_ignores_padding():
    gates = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # (layers=1, batch=1, tokens=4)
    valid = torch.tensor([[True, True, False, False]])
    assert sparsity(gates, valid).item() == pytest.approx(0.5)


def test_parameter_unit_weights_by_module_size():
    class Out:
        attn_gates = torch.zeros(1, 1, 2)  # every attention skipped
        mlp_gates = torch.ones(1, 1, 2)  # every MLP executed

    valid = torch.ones(1, 2, dtype=torch.bool)
    assert overall_sparsity(Out, valid, "module", 100, 300).item() == pytest.approx(0.5)
    assert overall_sparsity(Out, valid, "parameter", 100, 300).item() == pytest.approx(0.25)


def test_temperature_anneals_linearly():
    assert linear_schedule(0, 101, 5.0, 1.0) == 5.0
    assert linear_schedule(50, 101, 5.0, 1.0) == pytest.approx(3.0)
    assert linear_schedule(100, 101, 5.0, 1.0) == 1.0


@pytest.mark.parametrize(
    "build",
    [
        lambda: MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
        lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)),
    ],
    ids=["mistral", "qwen2"],
)
def test_other_llama_family_models(build):
    torch.manual_seed(0)
    lm = build().eval()
    ids = torch.randint(0, 96, (2, 16))
    model = SkipGPT(lm).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, routing="dense").logits, lm(ids).logits, rtol=0, atol=1e-5)
        gated = model(ids, routing="argmax")
        skipped = model(ids, routing="argmax", skip=True)
    torch.testing.assert_close(skipped.logits, gated.logits, rtol=0, atol=1e-4)
