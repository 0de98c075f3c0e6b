"""Extending a trained tokenizer : new tokens are appended, no existing id ever changes,
and the result records where it came from."""

import json
import os
import random
import subprocess
import sys

import pytest
import regex

from nanochat.common import NanochatError
from nanochat.hf_tokenizer import HFTokenizer
from nanochat.tokenizer import SPECIAL_TOKENS, UNK_TOKEN, CharTokenizer, RustBPETokenizer, load_tokenizer
from nanochat.vocab_extension import extend_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V0 = 400


def english_corpus(num_docs=300, seed=0):
    """ASCII only: invented words, punctuation, numbers, newlines."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(500)]
    docs = []
    for _ in range(num_docs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + rng.choice(".,!?;")
                 for _ in range(rng.randint(2, 5))]
        docs.append("\n".join(lines) + f" {rng.randint(0, 9999)}")
    return docs


def korean_corpus(num_docs=300, seed=1):
    """Hangul words separated by single spaces: every chunk contains Hangul bytes, so none of the
    merges a tokenizer learns here can already exist in an ASCII-only tokenizer."""
    rng = random.Random(seed)
    syllables = [chr(0xAC00 + rng.randrange(0, 11172)) for _ in range(40)]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(num_docs)]


@pytest.fixture(scope="module")
def base():
    return RustBPETokenizer.train_from_iterator(iter(english_corpus()), V0)


@pytest.fixture(scope="module")
def korean():
    # 256 bytes + 81 merges + 9 specials: 81 tokens that the English tokenizer does not have
    return RustBPETokenizer.train_from_iterator(iter(korean_corpus()), 256 + 81 + len(SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def extended(base, korean):
    return extend_tokenizer(base, from_tokenizer=korean)


def test_base_fixture_has_its_full_vocab(base, korean):
    assert base.get_vocab_size() == V0 and len(korean.mergeable_ranks) == 256 + 81


def test_adding_81_tokens_of_a_second_tokenizer_gives_v0_plus_81(base, korean, extended):
    assert extended.get_vocab_size() == V0 + 81
    new_ids = sorted(i for b, i in extended.mergeable_ranks.items() if b not in base.mergeable_ranks)
    assert new_ids == list(range(V0, V0 + 81))
    korean_order = [b for b, _ in sorted(korean.mergeable_ranks.items(), key=lambda kv: kv[1])[256:]]
    assert [extended.id_to_bytes(i) for i in new_ids] == korean_order  # in the second tokenizer's rank order


def test_no_existing_id_changes(base, extended):
    for i in range(V0):
        assert extended.id_to_bytes(i) == base.id_to_bytes(i)
    assert {n: extended.encode_special(n) for n in SPECIAL_TOKENS} == {n: base.encode_special(n) for n in SPECIAL_TOKENS}
    assert extended.token_bytes()[:V0] == base.token_bytes()


def test_old_language_text_encodes_to_the_same_ids(base, extended):
    texts = english_corpus(50, seed=9)
    assert extended.encode(texts) == base.encode(texts)
    conversation = {"messages": [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]}
    assert extended.render_conversation(conversation) == base.render_conversation(conversation)


def test_new_tokens_are_encodable_and_decodable(base, extended):
    texts = korean_corpus(30, seed=5)
    for text in texts:
        ids = extended.encode(text)
        assert extended.decode(ids) == text
        assert any(i >= V0 for i in ids)
        assert len(ids) < len(base.encode(text))
    reachable_as_whole_chunk = 0
    for token, i in extended.mergeable_ranks.items():
        if i < V0:
            continue
        # every appended token is the merge of two tokens with smaller ids (a valid tiktoken rank)
        assert any(extended.mergeable_ranks.get(token[:k], i) < i and extended.mergeable_ranks.get(token[k:], i) < i
                   for k in range(1, len(token)))
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character: reachable only inside longer text
        if regex.findall(extended.pattern, text) == [text]:
            assert extended.encode(text) == [i]
            reachable_as_whole_chunk += 1
    assert reachable_as_whole_chunk > 10


def test_extension_has_a_new_fingerprint_that_records_its_parent(tmp_path, base, extended):
    assert extended.fingerprint != base.fingerprint
    assert extended.parent_fingerprint == base.fingerprint and extended.original_vocab_size == V0
    loaded = load_tokenizer(extended.save(tmp_path / "ext"))
    manifest = json.load(open(tmp_path / "ext" / "manifest.json"))
    assert manifest["parent_fingerprint"] == base.fingerprint and manifest["original_vocab_size"] == V0
    assert manifest["vocab_size"] == V0 + 81
    assert loaded.fingerprint == extended.fingerprint and loaded.parent_fingerprint == base.fingerprint
    assert loaded.encode(korean_corpus(5, seed=3)) == extended.encode(korean_corpus(5, seed=3))


def test_tokens_already_present_are_not_duplicated(base, korean, extended):
    again = extend_tokenizer(extended, from_tokenizer=korean)
    assert again.get_vocab_size() == extended.get_vocab_size()
    assert again.mergeable_ranks == extended.mergeable_ranks
    with_itself = extend_tokenizer(base, from_tokenizer=base, add_special=["<|bos|>"])
    assert with_itself.get_vocab_size() == V0 and with_itself.fingerprint == base.fingerprint
    # a second tokenizer overlapping ours: only the bytes we lack are appended
    mixed = RustBPETokenizer.train_from_iterator(iter(english_corpus(100, seed=4) + korean_corpus(100)), 500)
    grown = extend_tokenizer(base, from_tokenizer=mixed)
    missing = set(mixed.mergeable_ranks) - set(base.mergeable_ranks)
    assert 0 < len(missing) < len(mixed.mergeable_ranks) - 256
    assert grown.get_vocab_size() == V0 + len(missing)
    assert len(set(grown.mergeable_ranks.values())) == len(grown.mergeable_ranks)


def test_new_special_tokens_get_ids_after_everything(base, extended):
    grown = extend_tokenizer(extended, add_special=["<|tool_start|>", "<|tool_end|>"])
    assert grown.encode_special("<|tool_start|>") == V0 + 81 and grown.encode_special("<|tool_end|>") == V0 + 82
    assert grown.get_vocab_size() == V0 + 83
    assert grown.original_vocab_size == V0 + 81 and grown.parent_fingerprint == extended.fingerprint
    assert grown.token_bytes()[-2:] == [0, 0]
    assert grown.decode([grown.encode_special("<|tool_start|>")]) == "<|tool_start|>"
    assert grown.encode("<|tool_start|>") != [V0 + 81]  # typed text stays text
    with pytest.raises(NanochatError, match="must look like"):
        extend_tokenizer(base, add_special=["tool"])


def test_second_tokenizer_of_another_kind_or_pattern_is_refused(base, korean):
    char = CharTokenizer.train_from_iterator(korean_corpus(10))
    with pytest.raises(NanochatError, match="same --tokenizer kind"):
        extend_tokenizer(base, from_tokenizer=char)
    other = RustBPETokenizer(korean.mergeable_ranks, korean.special_tokens, pattern=r"\S+|\s+")
    with pytest.raises(NanochatError, match="split pattern"):
        extend_tokenizer(base, from_tokenizer=other)


def test_char_tokenizer_extension_appends_new_characters_after_the_specials(tmp_path):
    base = CharTokenizer.train_from_iterator(english_corpus(20))
    v0 = base.get_vocab_size()
    unk = base.encode_special(UNK_TOKEN)
    assert base.encode("가") == [unk]
    grown = extend_tokenizer(base, from_tokenizer=CharTokenizer.train_from_iterator(["가나 ab"]))
    assert grown.get_vocab_size() == v0 + 2  # 가 and 나; space, a, b already present
    assert grown.encode("가나") == [v0, v0 + 1] and grown.decode(grown.encode("가 ab")) == "가 ab"
    assert grown.encode("ab!") == base.encode("ab!") and grown.encode_special(UNK_TOKEN) == unk
    assert load_tokenizer(grown.save(tmp_path / "c")).fingerprint == grown.fingerprint


def test_hf_tokenizer_extension_adds_special_tokens_only(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(english_corpus(50), trainer=trainers.BpeTrainer(
        vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    base = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    v0 = base.get_vocab_size()
    grown = extend_tokenizer(base, add_special=["<|tool|>"])
    assert grown.get_vocab_size() == v0 + 1 and grown.encode_special("<|tool|>") == v0
    assert all(grown.encode_special(n) == base.encode_special(n) for n in SPECIAL_TOKENS)
    loaded = load_tokenizer(grown.save(tmp_path / "hf"))
    assert loaded.fingerprint == grown.fingerprint != base.fingerprint
    assert loaded.parent_fingerprint == base.fingerprint and loaded.encode_special("<|tool|>") == v0
    with pytest.raises(NanochatError, match="not hf"):
        extend_tokenizer(base, from_tokenizer=base)


# -----------------------------------------------------------------------------
# The script

def run_extend(args, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "scripts.tok_extend", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tok_extend_script_extends_in_place_and_keeps_the_parent(tmp_path, base, korean):
    base.save(tmp_path / "tokenizer")
    korean.save(tmp_path / "tokenizer_ko")
    result = run_extend(["--from-tokenizer", str(tmp_path / "tokenizer_ko"), "--add-special", "<|tool|>"], tmp_path)
    assert result.returncode == 0, result.stderr
    grown = load_tokenizer(tmp_path / "tokenizer")
    assert grown.get_vocab_size() == V0 + 82 and grown.encode_special("<|tool|>") == V0 + 81
    assert grown.parent_fingerprint == base.fingerprint
    parent = load_tokenizer(tmp_path / f"tokenizer.parent-{base.fingerprint[:16]}")
    assert parent.fingerprint == base.fingerprint


def test_tok_extend_script_writes_to_output_dir_and_rejects_nothing_to_do(tmp_path, base):
    base.save(tmp_path / "tokenizer")
    result = run_extend(["--add-special", "<|a|>", "<|b|>", "--output-dir", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_tokenizer(tmp_path / "out").get_vocab_size() == V0 + 2
    assert load_tokenizer(tmp_path / "tokenizer").fingerprint == base.fingerprint  # input untouched
    nothing = run_extend([], tmp_path)
    assert nothing.returncode != 0 and nothing.stderr.startswith("error: nothing to add")
    missing = run_extend(["--add-special", "<|a|>", "--tokenizer-dir", str(tmp_path / "none")], tmp_path)
    assert missing.returncode != 0 and "scripts.tok_train" in missing.stderr
