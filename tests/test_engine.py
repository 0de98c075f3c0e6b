"""
The inference engine: KV-cache generation equals the naive model token for token, sampling
is seedable and respects temperature/top-k/top-p, tool calls get the calculator's answer forced
into the stream, and streamed text never contains half a UTF-8 character.
"""

import math

import pytest
import torch

from nanochat.common import NanochatError
from nanochat.engine import Engine, KVCache, StreamDecoder, sample_next
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import CharTokenizer, RustBPETokenizer

# Many distinct characters so that the 10 special ids are a small part of the vocab.
CORPUS = "the quick brown fox jumps over the lazy dog 0123456789 +-*/().,!? " + "".join(chr(c) for c in range(0x3b1, 0x3c9))


def tiny_model(vocab_size, depth=2, sequence_len=256, seed=0, **extras):
    """A random model whose logits are far from uniform (nanochat's init starts blocks as identity)."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len, **extras))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)) if p.ndim == 2 else 1.0)
        model.transformer.wte.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def char_setup():
    tokenizer = CharTokenizer.train_from_iterator([CORPUS])
    return tiny_model(tokenizer.get_vocab_size()), tokenizer


def cut_at_stop(ids, engine):
    for i, t in enumerate(ids):
        if t in (engine.assistant_end, engine.bos):
            return ids[:i]
    return ids


# -----------------------------------------------------------------------------
# Correctness against the naive model

@pytest.mark.parametrize("extras", [{}, dict(value_embeds=True, smear=True)])
def test_greedy_engine_output_equals_naive_generate_token_for_token(char_setup, extras):
    model, tokenizer = char_setup
    if extras:  # the cache also carries the smear's last embedding through prefill copies
        model = tiny_model(tokenizer.get_vocab_size(), **extras)
    engine = Engine(model, tokenizer)
    prompts = ["the quick", "0123 + 45", "αβγ δεζ", "x"]
    compared = 0
    for text in prompts:
        prompt = tokenizer.encode(text, prepend="<|bos|>")
        naive = cut_at_stop(list(model.generate(prompt, max_tokens=40, temperature=0.0)), engine)
        results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
        for row, mask in zip(results, masks):
            assert row[:len(prompt)] == prompt
            assert row[len(prompt):] == naive
            assert mask == [0] * len(prompt) + [1] * len(naive)
        compared += len(naive)
    assert compared >= 40  # the comparison covered real generated text, not just early stops


def test_generation_is_seedable_and_samples_differ_across_rows_and_seeds(char_setup):
    model, tokenizer = char_setup
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("the lazy", prepend="<|bos|>")
    kwargs = dict(num_samples=6, max_tokens=24, temperature=1.0)
    a, _ = engine.generate_batch(prompt, seed=1, **kwargs)
    b, _ = engine.generate_batch(prompt, seed=1, **kwargs)
    c, _ = engine.generate_batch(prompt, seed=2, **kwargs)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1  # rows share one prefill but are sampled independently


def test_finished_rows_stop_and_the_column_marks_them(char_setup):
    model, tokenizer = char_setup
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("fox", prepend="<|bos|>")
    ended_at = {}
    for step, (column, masks) in enumerate(engine.generate(prompt, num_samples=8, max_tokens=64, temperature=1.5, seed=3)):
        assert len(column) == len(masks) == 8
        for r, tok in enumerate(column):
            if r in ended_at:
                assert tok == engine.assistant_end and masks[r] == 0
            elif tok in (engine.assistant_end, engine.bos):
                ended_at[r] = step
    assert ended_at  # with 10 specials in a ~95 id vocab at temperature 1.5, some rows do stop


def test_prompt_longer_than_the_window_is_a_clear_error_and_generation_stops_at_the_window(char_setup):
    model, tokenizer = char_setup
    engine = Engine(model, tokenizer)
    window = model.config.sequence_len
    with pytest.raises(NanochatError, match="context window"):
        next(engine.generate([tokenizer.get_bos_token_id()] + [0] * window, max_tokens=4))
    prompt = [tokenizer.get_bos_token_id()] + [5] * (window - 3)
    steps = list(engine.generate(prompt, max_tokens=100, temperature=0.0))
    assert len(steps) <= 3


# -----------------------------------------------------------------------------
# KV cache and sampling

def test_kv_cache_returns_everything_so_far_and_prefill_copies_one_row_into_many():
    one = KVCache(batch_size=1, num_heads=2, head_dim=4, num_layers=2, max_len=8)
    k1, v1 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for layer in range(2):
        assert one.get_pos() == 0
        k, v = one.insert_kv(layer, k1 + layer, v1 + layer)
        assert k.shape == (1, 2, 3, 4) and torch.equal(k, k1 + layer) and torch.equal(v, v1 + layer)
    assert one.get_pos() == 3  # advanced after the last layer
    many = KVCache(batch_size=5, num_heads=2, head_dim=4, num_layers=2, max_len=10)
    many.prefill(one)
    assert many.get_pos() == 3
    k_new = torch.randn(5, 2, 1, 4)
    k, v = many.insert_kv(0, k_new, k_new)
    assert k.shape == (5, 2, 4, 4)
    assert torch.equal(k[:, :, :3], (k1).expand(5, -1, -1, -1))
    assert torch.equal(k[:, :, 3:], k_new)
    with pytest.raises(NanochatError, match="overflow"):
        many.insert_kv(0, torch.randn(5, 2, 9, 4), torch.randn(5, 2, 9, 4))


def test_the_last_embedding_of_a_smear_model_follows_prefill_copies_and_dropped_rows():
    one = KVCache(batch_size=1, num_heads=1, head_dim=2, num_layers=1, max_len=4)
    one.insert_kv(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    one.prev_embed = torch.tensor([[[1.0, 2.0]]])  # (B, 1, C), as GPT.forward leaves it
    many = KVCache(batch_size=3, num_heads=1, head_dim=2, num_layers=1, max_len=4)
    many.prefill(one)
    assert torch.equal(many.prev_embed, torch.tensor([[[1.0, 2.0]]] * 3))
    many.prev_embed[1] += 10  # rows are independent copies
    many.keep_rows(torch.tensor([1, 2]))
    assert torch.equal(many.prev_embed, torch.tensor([[[11.0, 12.0]], [[1.0, 2.0]]]))
    many.reset()
    assert many.prev_embed is None and many.get_pos() == 0


def test_sampling_follows_temperature_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, g, temperature=0.0), torch.zeros(4000, dtype=torch.long))
    counts = torch.bincount(sample_next(logits, g, temperature=1.0), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)
    assert set(sample_next(logits, g, 1.0, top_k=2).tolist()) == {0, 1}
    assert set(sample_next(logits, g, 1.0, top_p=0.7).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(sample_next(logits, g, 1.0, top_p=0.1).tolist()) == {0}
    sharp = torch.bincount(sample_next(logits, g, temperature=0.3), minlength=4).float() / 4000
    assert sharp[0] > 0.8  # low temperature concentrates on the most likely id


def test_sampling_bounded_logits_without_the_max_draws_the_same_ids():
    logits = torch.rand(64, 5000, generator=torch.Generator().manual_seed(1)) * 30 - 15  # soft-capped: |x| <= 15
    for temperature in (1.0, 0.6, 0.1):  # 15 / 0.1 is past the overflow-safe range: the max is subtracted
        plain = sample_next(logits, torch.Generator().manual_seed(2), temperature)
        bounded = sample_next(logits, torch.Generator().manual_seed(2), temperature, bound=15.0)
        assert (plain == bounded).float().mean() > 0.99, temperature  # equal but for CDF rounding at a boundary


# -----------------------------------------------------------------------------
# Tool use

class ScriptedModel(torch.nn.Module):
    """Test double: emits a fixed script of ids (one per position after the prompt), follows the KV
    cache protocol, and records every id it is fed, so we can see the forced tool output."""

    def __init__(self, script, vocab_size, prompt_len):
        super().__init__()
        self.config = config_from_depth(1, vocab_size=vocab_size, sequence_len=128)
        self.lm_head = torch.nn.Linear(1, 1)
        self.script, self.prompt_len, self.fed = script, prompt_len, []

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        pos = kv_cache.get_pos()
        self.fed.append(idx[0].tolist())
        cfg = self.config
        dummy = torch.zeros(B, cfg.n_kv_head, T, cfg.head_dim)
        for layer in range(cfg.n_layer):
            kv_cache.insert_kv(layer, dummy, dummy)
        logits = torch.full((B, T, cfg.vocab_size), -1e9)
        nxt = pos + T - self.prompt_len  # index into the script of the id to predict next
        logits[:, -1, self.script[min(nxt, len(self.script) - 1)]] = 0.0
        return logits


def test_python_block_gets_the_calculator_result_forced_into_the_stream():
    tokenizer = CharTokenizer.train_from_iterator([CORPUS])
    sp = tokenizer.encode_special
    expr = tokenizer.encode("12*(3+4)")
    result = tokenizer.encode("84")
    forced = [sp("<|output_start|>")] + result + [sp("<|output_end|>")]
    # the model "writes" a tool call, then (while the output is forced) its script keeps going
    script = [sp("<|python_start|>")] + expr + [sp("<|python_end|>")] + [0] * len(forced) + tokenizer.encode(" ok") + [sp("<|assistant_end|>")]
    prompt = tokenizer.encode("q", prepend="<|bos|>")
    model = ScriptedModel(script, tokenizer.get_vocab_size(), len(prompt))
    engine = Engine(model, tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=60, temperature=0.0)
    call = [sp("<|python_start|>")] + expr + [sp("<|python_end|>")]
    for row, mask in zip(results, masks):
        out, out_mask = row[len(prompt):], mask[len(prompt):]
        assert out == call + forced + tokenizer.encode(" ok")
        assert out_mask == [1] * len(call) + [0] * len(forced) + [1] * 3
    # the forced ids were fed to the model as inputs, in order
    fed = [ids[0] for ids in model.fed[1:]]
    assert fed[len(call):len(call) + len(forced)] == forced


def test_a_refused_python_block_forces_nothing():
    tokenizer = CharTokenizer.train_from_iterator([CORPUS])
    sp = tokenizer.encode_special
    script = [sp("<|python_start|>")] + tokenizer.encode("fox()") + [sp("<|python_end|>")] + tokenizer.encode("no") + [sp("<|assistant_end|>")]
    prompt = tokenizer.encode("q", prepend="<|bos|>")
    engine = Engine(ScriptedModel(script, tokenizer.get_vocab_size(), len(prompt)), tokenizer)
    results, masks = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert results[0][len(prompt):] == script[:-1]
    assert 0 not in masks[0][len(prompt):]


# -----------------------------------------------------------------------------
# Streaming decode

class ByteTokenizer:
    """Test double: one id per UTF-8 byte (the worst case of byte-level BPE: every multi-byte
    character is split), plus the special tokens after the 256 bytes."""
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def get_special_tokens(self):
        return set(self.SPECIALS)

    def encode_special(self, name):
        return 256 + self.SPECIALS.index(name)

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_decoder_never_emits_a_broken_utf8_character():
    tokenizer = ByteTokenizer()
    text = "héllo 👋 wörld — 日本語 🇫🇷!"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) == len(text)  # every character as soon as its last byte arrives


def test_stream_decoder_with_a_real_bpe_tokenizer_that_splits_characters():
    try:
        tokenizer = RustBPETokenizer.train_from_iterator(iter(["hello world, plain ascii text only. " * 40]), 300)
    except ImportError as e:  # the rustbpe extension is built by `pip install -e .`
        pytest.skip(f"rustbpe is not built: {e}")
    text = "héllo 👋 wörld — 日本語 🇫🇷!"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # single ids do decode to broken text
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stream_decoder_shows_tool_calls_as_markup_and_hides_other_special_tokens():
    tokenizer = CharTokenizer.train_from_iterator([CORPUS])
    sp = tokenizer.encode_special
    ids = (tokenizer.encode("so ") + [sp("<|python_start|>")] + tokenizer.encode("2*3") + [sp("<|python_end|>"), sp("<|output_start|>")]
           + tokenizer.encode("6") + [sp("<|output_end|>"), sp("<|user_start|>")])
    decoder = StreamDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "so «2*3 → 6»"
