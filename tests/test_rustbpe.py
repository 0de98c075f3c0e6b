"""
Specification tests for rustbpe, our BPE trainer (the Rust internals have `cargo test`).

- same merges and encodings as the pure-Python reference BPE (tests/bpe_reference.py)
- same merges as PyPI rustbpe 0.1.0 (imported in a subprocess from RUSTBPE_PYPI_PATH,
  default /tmp/pypi_rustbpe; skipped with the reason if it is not installed there)
- the hand-written pre-tokenizer splits exactly like the regex (Python's `regex` module)
- encode/decode round trips on arbitrary Unicode
"""

import os
import pickle
import random
import subprocess
import sys

import pytest
import regex

import rustbpe
from tests import bpe_reference as ref

PYPI_PATH = os.environ.get("RUSTBPE_PYPI_PATH", "/tmp/pypi_rustbpe")
GPT4_PATTERN = ref.DEFAULT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")

SMALL_CORPORA = {
    "english": ["The cat sat on the mat. The cat's hat isn't flat!\n", "Hello hello HELLO, world 12345 67.\n\n"] * 3,
    "code": ["def f(x):\n    return x + 1  # add one\n", "for i in range(10):\n\tprint(i, end='')\r\n"],
    "unicode": ["naïve café — 日本語のテキスト、中文 😀😀 👍🏽 Ωμέγα ß ſ\u0301", "ﬁ ½ ²³ Ⅻ ٣٤٥ \u3000x\u00a0y"],
}


def train_ours(texts, vocab_size, pattern=None, buffer_size=8192):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, buffer_size=buffer_size, pattern=pattern)
    return tok


def random_unicode_text(rng, n):
    """Letters, digits, punctuation, white space (incl. CR/LF and exotic spaces), contractions,
    emoji, CJK, combining marks and control chars; no lone surrogates."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzSDMTLVRE", "0123456789٣²½Ⅻ", " \t\n\r\x0b\x0c\x85\xa0\u2028\u3000",
        ".,;:!?'\"()-_$€%&*/\\", "'s'T'll'VE're'ſ", "😀👍🏽🇫🇷👨‍👩‍👧", "日本語中文한국어ア", "\u0301\u0308\u200d\ufe0f",
        "\x00\x01\x1b\x7f\ufeff\u200b", "éßΩжـا𝔸𐍈",
    ]
    out = []
    while len(out) < n:
        pool = rng.choice(pools)
        out.extend(rng.choice(pool) for _ in range(rng.randint(1, 4)))
    return "".join(out[:n])

# -----------------------------------------------------------------------------
# Same result as the reference BPE


@pytest.mark.parametrize("corpus", sorted(SMALL_CORPORA))
def test_merges_and_encodings_equal_the_reference_bpe(corpus):
    texts = SMALL_CORPORA[corpus]
    vocab_size = 256 + 60
    tok = train_ours(texts, vocab_size)
    expected_merges = ref.train(texts, vocab_size)
    expected_ranks = [(b, i) for i, b in enumerate(ref.token_bytes(expected_merges))]
    assert tok.get_mergeable_ranks() == expected_ranks
    assert tok.vocab_size == len(expected_ranks)
    probe = texts + ["unseen: The mat's cat, 9876 naïve 😀 text\n"]
    for text in probe:
        assert tok.encode(text) == ref.encode(text, expected_merges)
    assert tok.batch_encode(probe) == [ref.encode(t, expected_merges) for t in probe]


def test_a_custom_pattern_is_used_for_training_and_encoding():
    texts = ["aaa bbb aaa, ccc"] * 2
    tok = train_ours(texts, 262, pattern=r"\w+|\s+|[^\w\s]+")
    merges = ref.train(texts, 262, pattern=r"\w+|\s+|[^\w\s]+")
    assert tok.get_pattern() == r"\w+|\s+|[^\w\s]+"
    assert tok.get_mergeable_ranks() == [(b, i) for i, b in enumerate(ref.token_bytes(merges))]
    assert tok.encode("aaa ccc") == ref.encode("aaa ccc", merges, pattern=r"\w+|\s+|[^\w\s]+")


def test_buffer_size_does_not_change_the_merges():
    texts = SMALL_CORPORA["english"] + SMALL_CORPORA["unicode"]
    ranks = [train_ours(texts, 330, buffer_size=b).get_mergeable_ranks() for b in (1, 3, 8192)]
    assert ranks[0] == ranks[1] == ranks[2]


def test_training_stops_early_when_no_pairs_are_left():
    tok = train_ours(["ab", "ab"], 1000)
    assert tok.vocab_size == 257
    assert tok.get_mergeable_ranks()[-1] == (b"ab", 256)

# -----------------------------------------------------------------------------
# Same merges as PyPI rustbpe 0.1.0

PYPI_CHILD = """
import pickle, sys
import rustbpe
assert rustbpe.__file__.startswith(sys.argv[1]), rustbpe.__file__
texts, vocab_size, pattern = pickle.load(sys.stdin.buffer)
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
pickle.dump((tok.get_mergeable_ranks(), tok.get_pattern()), sys.stdout.buffer)
"""


def pypi_train(texts, vocab_size, pattern):
    env = dict(os.environ, PYTHONPATH=PYPI_PATH)
    proc = subprocess.run([sys.executable, "-c", PYPI_CHILD, os.path.abspath(PYPI_PATH)], env=env, cwd=PYPI_PATH,
                          input=pickle.dumps((texts, vocab_size, pattern)), capture_output=True, check=True)
    return pickle.loads(proc.stdout)


needs_pypi = pytest.mark.skipif(not os.path.isdir(os.path.join(PYPI_PATH, "rustbpe")),
                                reason=f"PyPI rustbpe 0.1.0 not installed in {PYPI_PATH} "
                                       f"(pip install --target {PYPI_PATH} rustbpe==0.1.0, or set RUSTBPE_PYPI_PATH)")


@needs_pypi
@pytest.mark.parametrize("pattern", [ref.DEFAULT_PATTERN, GPT4_PATTERN, r"\w+|\s+|[^\w\s]+"],
                         ids=["gpt4-n2", "gpt4-n3", "custom"])
def test_merges_equal_pypi_rustbpe(pattern):
    rng = random.Random(1)
    texts = [t for c in SMALL_CORPORA.values() for t in c] + [random_unicode_text(rng, 300) for _ in range(30)]
    pypi_ranks, pypi_pattern = pypi_train(texts, 700, pattern)
    tok = train_ours(texts, 700, pattern=pattern)
    assert tok.get_pattern() == pypi_pattern == pattern
    assert tok.get_mergeable_ranks() == pypi_ranks

# -----------------------------------------------------------------------------
# Pre-tokenizer: the hand-written scanner splits exactly like the regex


@pytest.mark.parametrize("pattern", [ref.DEFAULT_PATTERN, GPT4_PATTERN], ids=["gpt4-n2", "gpt4-n3"])
def test_fast_pretokenizer_splits_like_the_regex_module(pattern):
    rng = random.Random(0)
    compiled = regex.compile(pattern)
    for _ in range(3000):
        text = random_unicode_text(rng, rng.randint(0, 40))
        assert rustbpe.split_text(text, pattern) == compiled.findall(text), repr(text)


def test_default_pattern_is_gpt4_with_two_digit_numbers():
    assert rustbpe.DEFAULT_PATTERN == ref.DEFAULT_PATTERN
    assert rustbpe.Tokenizer().get_pattern() == ref.DEFAULT_PATTERN
    assert train_ours(["x 12345"], 260).get_pattern() == ref.DEFAULT_PATTERN
    assert rustbpe.split_text("x 12345") == ["x", " ", "12", "34", "5"]

# -----------------------------------------------------------------------------
# Encode / decode


def test_encode_decode_round_trips_on_arbitrary_unicode():
    rng = random.Random(2)
    tok = train_ours([random_unicode_text(rng, 2000) for _ in range(20)], 600)
    for _ in range(300):
        text = random_unicode_text(rng, rng.randint(0, 200))
        assert tok.decode(tok.encode(text)) == text
    texts = [random_unicode_text(rng, 100) for _ in range(20)]
    assert [tok.decode(ids) for ids in tok.batch_encode(texts)] == texts


def test_decode_rejects_unknown_ids_and_partial_utf8():
    tok = train_ours(["hello hello"], 260)
    with pytest.raises(ValueError, match="Unknown token id: 9999"):
        tok.decode([9999])
    with pytest.raises(UnicodeDecodeError):
        tok.decode(["é".encode()[0]])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="at least 256"):
        train_ours(["abc"], 100)
    with pytest.raises(ValueError, match="Invalid regex pattern"):
        train_ours(["abc"], 300, pattern="(")
    with pytest.raises(TypeError):
        train_ours(["abc", 5], 300)
