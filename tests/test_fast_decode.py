"""
The flat one-token decode step (nanochat/fast_decode.py) computes what GPT.forward computes with
a KV cache: the same logits and the same cached keys/values, step after step, at any batch size,
with grouped-query heads, with or without its transposed weight copy, across the blocks of rotation
matrices, with value embeddings and smear, after finished rows leave the batch; bf16 weights stay
close; a changed weight is picked up; a full cache is refused with the cache's own error.
"""

import math

import pytest
import torch

from nanochat import fast_decode
from nanochat.common import NanochatError
from nanochat.engine import KVCache
from nanochat.gpt import GPT, config_from_depth


def random_model(n_kv_head=None, vocab_size=300, seed=0, **extras):
    torch.manual_seed(seed)
    cfg = config_from_depth(2, vocab_size=vocab_size, sequence_len=64, n_embd=128, n_head=4, n_kv_head=n_kv_head,
                            **extras)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # far from nanochat's identity init, so every part of the step matters
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.eval()


def prefilled_caches(model, batch, prompt_len, max_len=40):
    cfg = model.config
    caches = [KVCache(batch, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, max_len) for _ in range(2)]
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for cache in caches:
            model(prompt, kv_cache=cache)
    return caches


def run_both(model, weights, batch, steps=6, prompt_len=5):
    """Feed the same ids to GPT.forward and decode_step; return the largest logit and cache differences."""
    plain, fast = prefilled_caches(model, batch, prompt_len)
    g = torch.Generator().manual_seed(2)
    prepared = weights.get()  # once per generation, as the Engine does
    worst_logits = 0.0
    with torch.inference_mode():
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (batch,), generator=g)
            expected = model(ids.view(-1, 1), kv_cache=plain)[:, -1, :]
            got = fast_decode.decode_step(model, prepared, ids, fast)
            assert got.shape == expected.shape == (batch, model.config.vocab_size)
            worst_logits = max(worst_logits, (got - expected).abs().max().item())
    assert fast.pos == plain.pos == prompt_len + steps
    n = plain.pos
    worst_cache = max((fast.k[:, :, :, :n] - plain.k[:, :, :, :n]).abs().max().item(),
                      (fast.v[:, :, :, :n] - plain.v[:, :, :, :n]).abs().max().item())
    return worst_logits, worst_cache


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_step_equals_the_plain_forward_logits_and_cache(batch, n_kv_head):
    model = random_model(n_kv_head=n_kv_head)
    logits_diff, cache_diff = run_both(model, fast_decode.DecodeWeights(model), batch)
    assert logits_diff < 1e-4 and cache_diff < 1e-5


def test_decode_step_without_the_transposed_copy_is_equal_too(monkeypatch):
    monkeypatch.setattr(fast_decode, "TRANSPOSED_COPY_MAX_PARAMS", 0)
    model = random_model(n_kv_head=2)
    weights = fast_decode.DecodeWeights(model)
    assert not weights.transposed
    logits_diff, cache_diff = run_both(model, weights, batch=2)
    assert logits_diff < 1e-4 and cache_diff < 1e-5


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("extras", [dict(value_embeds=True), dict(smear=True), dict(value_embeds=True, smear=True)])
def test_value_embeddings_and_smear_decode_as_the_plain_forward(monkeypatch, extras, transposed):
    if not transposed:
        monkeypatch.setattr(fast_decode, "TRANSPOSED_COPY_MAX_PARAMS", 0)
    model = random_model(n_kv_head=2, **extras)
    weights = fast_decode.DecodeWeights(model)
    assert weights.transposed == transposed
    logits_diff, cache_diff = run_both(model, weights, batch=3)
    assert logits_diff < 1e-4 and cache_diff < 1e-5


def test_bf16_weights_stay_close_to_the_fp32_forward():
    model = random_model(n_kv_head=2)
    weights = fast_decode.DecodeWeights(model, weights_dtype=torch.bfloat16)
    prepared = weights.get()
    layers, head = prepared.layers, prepared.head
    assert head.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for layer in layers for w in layer)
    logits_diff, _ = run_both(model, weights, batch=2)
    assert 1e-4 < logits_diff < 0.5  # bf16 has ~3 significant digits: different, but not by much


def test_a_changed_weight_is_picked_up():
    model = random_model()
    weights = fast_decode.DecodeWeights(model)
    run_both(model, weights, batch=1, steps=1)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(-2.0)
        model.lm_head.weight.add_(0.1)
    logits_diff, _ = run_both(model, weights, batch=1, steps=3)
    assert logits_diff < 1e-4


def test_a_full_cache_is_refused():
    model = random_model()
    plain, fast = prefilled_caches(model, batch=1, prompt_len=4, max_len=4)
    with pytest.raises(NanochatError, match="KV cache overflow"):
        fast_decode.decode_step(model, fast_decode.DecodeWeights(model).get(), torch.tensor([3]), fast)


def test_a_model_cast_to_bf16_decodes_in_bf16_close_to_its_own_forward():
    model = random_model(n_kv_head=2).to(torch.bfloat16)
    weights = fast_decode.DecodeWeights(model)
    assert not weights.transposed  # its own bf16 weights, no copy
    plain, fast = prefilled_caches(model, batch=2, prompt_len=5)
    assert fast.k.dtype == torch.bfloat16
    with torch.inference_mode():
        ids = torch.tensor([3, 7])
        expected = model(ids.view(-1, 1), kv_cache=plain)[:, -1, :]
        got = fast_decode.decode_step(model, weights.get(), ids, fast)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 0.5  # both bf16; the sums round differently
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_decoding_across_rotary_blocks_still_equals_the_plain_forward():
    model = random_model(n_kv_head=2)
    block = fast_decode.RotaryMatrices.BLOCK
    plain, fast = prefilled_caches(model, batch=2, prompt_len=block - 3, max_len=block + 8)
    prepared = fast_decode.DecodeWeights(model).get()
    with torch.inference_mode():
        for t in range(8):  # positions block-3 .. block+4: the step crosses into the next block
            ids = torch.tensor([t, 2 * t + 1])
            expected = model(ids.view(-1, 1), kv_cache=plain)[:, -1, :]
            got = fast_decode.decode_step(model, prepared, ids, fast)
            assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("extras", [{}, dict(value_embeds=True, smear=True)])
def test_dropping_finished_rows_mid_generation_keeps_decoding_the_remaining_rows_exactly(extras):
    # the step writes through buffers made for the cache's tensors: keep_rows replaces them
    model = random_model(n_kv_head=2, **extras)
    plain, fast = prefilled_caches(model, batch=3, prompt_len=5)
    prepared = fast_decode.DecodeWeights(model).get()
    with torch.inference_mode():
        for ids in ([3, 4, 5], [6, 7, 8], "drop row 1", [9, 10], [11, 12]):
            if ids == "drop row 1":
                for cache in (plain, fast):
                    cache.keep_rows(torch.tensor([0, 2]))
                continue
            ids = torch.tensor(ids)
            expected = model(ids.view(-1, 1), kv_cache=plain)[:, -1, :]
            got = fast_decode.decode_step(model, prepared, ids, fast)
            assert (got - expected).abs().max().item() < 1e-4
    n = plain.pos
    assert fast.k.size(1) == 2 and (fast.k[:, :, :, :n] - plain.k[:, :, :, :n]).abs().max().item() < 1e-5
    assert (fast.v[:, :, :, :n] - plain.v[:, :, :, :n]).abs().max().item() < 1e-5


def test_rotation_matrices_rotate_as_apply_rotary_does_at_any_position_even_after_eviction():
    from nanochat.gpt import apply_rotary
    model = random_model()
    rotary = fast_decode.RotaryMatrices(model)
    D = model.config.head_dim
    x = torch.randn(3, D)
    span = rotary.BLOCK * (rotary.KEEP_BLOCKS + 2)  # more blocks than are kept: old ones are rebuilt
    for pos in list(range(0, span, 7)) + [0, 5, rotary.BLOCK - 1, rotary.BLOCK]:
        cos, sin = model._rotary_slice(pos, 1)
        expected = apply_rotary(x.view(1, 1, 3, D), cos, sin).view(3, D)
        assert torch.allclose(x @ rotary.at(pos, torch.float32, 1.0), expected, atol=1e-5)
        assert torch.allclose(x @ rotary.at(pos, torch.float32, 2.0), 2 * expected, atol=1e-5)
    assert len(rotary.blocks) <= rotary.KEEP_BLOCKS
