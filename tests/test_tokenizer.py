"""The shared tokenizer: BPE/char/HF kinds, fingerprinted save/load, conversation rendering,
and the tok_train / tok_eval stages run as a user would run them."""

import json
import os
import random
import subprocess
import sys

import pytest

from nanochat.common import NanochatError
from nanochat.hf_tokenizer import HFTokenizer
from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, UNK_TOKEN, CharTokenizer, RustBPETokenizer,
                                check_fingerprint, get_token_bytes, load_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is was for on that with as by at from it his an were are which this be "
         "river mountain number value function return print while token model train data 12 345 6789 "
         "café naïve Straße über 東京 데이터 모델 😀").split() * 20


def invented_words(n=600, seed=7):
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "ng"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_corpus(num_docs=300, seed=0):
    """Deterministic pseudo-text: words, punctuation, numbers, code-ish lines, some non-ASCII."""
    rng = random.Random(seed)
    vocabulary = WORDS + invented_words()
    docs = []
    for _ in range(num_docs):
        lines = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(vocabulary) for _ in range(rng.randint(5, 15))]
            lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ":", " = 42;"]))
        docs.append("\n".join(lines))
    return docs


def random_unicode(rng, n):
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
             (0x1F600, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else rng.choice(" \n\t0123456789"))
    return "".join(out)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return RustBPETokenizer.train_from_iterator(iter(corpus), 512)


def full_conversation():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute it."},
            {"type": "python", "text": "6 * 7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."},
        ]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]}


# -----------------------------------------------------------------------------
# BPE

def test_bpe_vocab_size_includes_the_nine_special_tokens_at_the_end(bpe):
    assert bpe.get_vocab_size() == 512
    assert len(bpe.mergeable_ranks) == 512 - len(SPECIAL_TOKENS)
    assert [bpe.encode_special(name) for name in SPECIAL_TOKENS] == list(range(503, 512))
    assert bpe.get_bos_token_id() == 503
    assert bpe.get_special_tokens() == set(SPECIAL_TOKENS)


def test_tiktoken_encoding_equals_rustbpe_encode_on_random_unicode(corpus, bpe):
    import rustbpe
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(corpus), 512 - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    assert {bytes(b): r for b, r in trainer.get_mergeable_ranks()} == bpe.mergeable_ranks
    rng = random.Random(1)
    texts = [random_unicode(rng, rng.randint(0, 200)) for _ in range(200)] + corpus[:50]
    for text in texts:
        assert bpe.encode(text) == trainer.encode(text), text
    assert bpe.encode(texts, num_threads=2) == [trainer.encode(t) for t in texts]


def test_decode_inverts_encode_on_random_unicode(bpe):
    rng = random.Random(2)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(0, 300))
        assert bpe.decode(bpe.encode(text)) == text


def test_encode_prepend_append_accept_ids_and_special_names(bpe):
    bos, end = bpe.get_bos_token_id(), bpe.encode_special("<|assistant_end|>")
    body = bpe.encode("the river")
    assert bpe.encode("the river", prepend="<|bos|>", append=end) == [bos] + body + [end]
    assert bpe.encode(["the", "river"], prepend=bos) == [[bos] + bpe.encode("the"), [bos] + bpe.encode("river")]
    # special-token strings typed in text stay ordinary text
    assert bos not in bpe.encode("<|bos|>")
    with pytest.raises(ValueError):
        bpe.encode_special("<|nope|>")


def test_bpe_save_load_round_trip_keeps_fingerprint_and_encodings(tmp_path, corpus, bpe):
    directory = bpe.save(tmp_path / "tok")
    assert sorted(os.listdir(directory)) == ["manifest.json", "ranks.tiktoken", "token_bytes.json"]
    manifest = json.loads(open(os.path.join(directory, "manifest.json")).read())
    assert manifest["kind"] == "bpe" and manifest["vocab_size"] == 512 and manifest["pattern"] == SPLIT_PATTERN
    assert manifest["fingerprint"] == bpe.fingerprint and manifest["parent_fingerprint"] is None
    assert manifest["original_vocab_size"] == 512
    assert manifest["special_tokens"] == {name: bpe.encode_special(name) for name in SPECIAL_TOKENS}
    loaded = load_tokenizer(directory)
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.encode(corpus[:20]) == bpe.encode(corpus[:20])
    token_bytes = json.loads(open(os.path.join(directory, "token_bytes.json")).read())
    assert token_bytes == bpe.token_bytes()
    assert token_bytes[:256] == [1] * 256 and token_bytes[503:] == [0] * 9
    assert all(token_bytes[i] == len(bpe.id_to_bytes(i)) for i in range(256, 503))


def test_training_is_deterministic_and_fingerprint_depends_on_the_merges(corpus, bpe):
    again = RustBPETokenizer.train_from_iterator(iter(corpus), 512)
    assert again.fingerprint == bpe.fingerprint
    smaller = RustBPETokenizer.train_from_iterator(iter(corpus), 400)
    assert smaller.fingerprint != bpe.fingerprint


def test_saving_over_an_existing_tokenizer_replaces_it_whole(tmp_path, corpus, bpe):
    directory = tmp_path / "tok"
    CharTokenizer.train_from_iterator(corpus).save(directory)
    bpe.save(directory)
    assert sorted(os.listdir(directory)) == ["manifest.json", "ranks.tiktoken", "token_bytes.json"]
    assert load_tokenizer(directory).fingerprint == bpe.fingerprint
    assert [p for p in os.listdir(tmp_path) if p != "tok"] == []  # no temp dirs left behind


def test_vocab_size_below_bytes_plus_specials_is_an_error(corpus):
    with pytest.raises(NanochatError, match="too small"):
        RustBPETokenizer.train_from_iterator(iter(corpus), 256 + len(SPECIAL_TOKENS) - 1)


def test_get_token_bytes_is_a_long_tensor_of_byte_lengths(bpe):
    import torch
    tb = get_token_bytes("cpu", tokenizer=bpe)
    assert tb.dtype == torch.long and tb.shape == (512,)
    assert tb.tolist() == bpe.token_bytes()


# -----------------------------------------------------------------------------
# Fingerprint checks on load

def test_modified_ranks_file_is_caught_by_the_fingerprint(tmp_path, bpe):
    directory = bpe.save(tmp_path / "tok")
    path = os.path.join(directory, "ranks.tiktoken")
    lines = open(path).read().splitlines()
    lines[300], lines[301] = lines[300].split()[0] + " 301", lines[301].split()[0] + " 300"  # swap two ids
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(NanochatError, match="does not match its files") as err:
        load_tokenizer(directory)
    assert bpe.fingerprint in str(err.value) and "retrain it with scripts.tok_train" in str(err.value)


def test_manifest_with_edited_special_ids_is_caught(tmp_path, bpe):
    directory = bpe.save(tmp_path / "tok")
    path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(path))
    manifest["special_tokens"]["<|bos|>"], manifest["special_tokens"]["<|user_start|>"] = 504, 503
    json.dump(manifest, open(path, "w"))
    with pytest.raises(NanochatError, match="fingerprint"):
        load_tokenizer(directory)


def test_corrupt_manifest_and_missing_directory_are_clear_errors(tmp_path, bpe):
    with pytest.raises(NanochatError, match="python -m scripts.tok_train"):
        load_tokenizer(tmp_path / "nowhere")
    directory = bpe.save(tmp_path / "tok")
    open(os.path.join(directory, "manifest.json"), "w").write("{not json")
    with pytest.raises(NanochatError, match="corrupt"):
        load_tokenizer(directory)


def test_check_fingerprint_names_both_fingerprints_and_sources():
    check_fingerprint("a" * 64, "a" * 64, "data", "tokenizer")  # equal: no error
    with pytest.raises(NanochatError) as err:
        check_fingerprint("a" * 64, "b" * 64, "shards in /x", "tokenizer in /y")
    message = str(err.value)
    assert all(s in message for s in ("a" * 64, "b" * 64, "shards in /x", "tokenizer in /y"))


# -----------------------------------------------------------------------------
# Conversations

def segments_with_mask(tok, conversation):
    """The rendered conversation cut into runs of equal mask, decoded: [(text, mask), ...]."""
    ids, mask = tok.render_conversation(conversation)
    runs = []
    for i, m in zip(ids, mask):
        if runs and runs[-1][1] == m:
            runs[-1][0].append(i)
        else:
            runs.append(([i], m))
    return [(tok.decode(r), m) for r, m in runs]


def test_render_conversation_masks_exactly_the_assistant_tokens(bpe):
    assert segments_with_mask(bpe, full_conversation()) == [
        ("<|bos|><|user_start|>Be brief.\n\nWhat is 6 times 7?<|user_end|><|assistant_start|>", 0),
        ("Let me compute it.<|python_start|>6 * 7<|python_end|>", 1),
        ("<|output_start|>42<|output_end|>", 0),
        ("It is 42.<|assistant_end|>", 1),
        ("<|user_start|>Thanks!<|user_end|><|assistant_start|>", 0),
        ("You're welcome.<|assistant_end|>", 1),
    ]
    ids, mask = bpe.render_conversation(full_conversation())
    assert ids[0] == bpe.get_bos_token_id() and mask[0] == 0 and len(ids) == len(mask)


def test_system_message_is_merged_into_the_first_user_message(bpe):
    with_system = bpe.render_conversation(full_conversation())
    merged = full_conversation()
    merged["messages"] = merged["messages"][1:]
    merged["messages"][0] = {"role": "user", "content": "Be brief.\n\nWhat is 6 times 7?"}
    assert bpe.render_conversation(merged) == with_system


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "alternate"),
    ([{"role": "robot", "content": "a"}], "unknown role"),
    ([{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}], "system"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "alternate"),
    ([{"role": "user", "content": ["a"]}], "string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": 3}]}], "not a string"),
    ([{"role": "user"}], "role' and 'content"),
])
def test_render_conversation_rejects_malformed_conversations(bpe, messages, match):
    with pytest.raises(ValueError, match=match):
        bpe.render_conversation({"messages": messages})


def test_render_conversation_truncates_to_max_tokens(bpe):
    ids, mask = bpe.render_conversation(full_conversation())
    short_ids, short_mask = bpe.render_conversation(full_conversation(), max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_for_completion_drops_the_last_answer_and_primes_the_assistant(bpe):
    conversation = full_conversation()
    ids = bpe.render_for_completion(conversation)
    assert ids[-1] == bpe.encode_special("<|assistant_start|>")
    assert bpe.decode(ids).endswith("<|user_start|>Thanks!<|user_end|><|assistant_start|>")
    assert "welcome" not in bpe.decode(ids)
    assert conversation == full_conversation()  # the caller's conversation is not modified
    with pytest.raises(ValueError):
        bpe.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_visualize_tokenization_marks_supervised_tokens(bpe):
    ids, mask = bpe.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]})
    plain = bpe.visualize_tokenization(ids, mask, color=False)
    assert plain.startswith("(<|bos|>)|(<|user_start|>)") and plain.endswith("[<|assistant_end|>]")
    coloured = bpe.visualize_tokenization(ids, mask, color=True)
    assert "\033[42m<|assistant_end|>\033[0m" in coloured and "\033[41m<|bos|>\033[0m" in coloured


# -----------------------------------------------------------------------------
# Character tokenizer

def test_char_tokenizer_vocab_is_corpus_characters_then_unk_and_specials(tmp_path, corpus):
    tok = CharTokenizer.train_from_iterator(corpus)
    chars = sorted(set("".join(corpus)))
    assert tok.get_vocab_size() == len(chars) + 1 + len(SPECIAL_TOKENS)
    assert tok.encode(chars[0] + chars[-1]) == [0, len(chars) - 1]
    assert tok.encode_special(UNK_TOKEN) == len(chars)
    assert [tok.encode_special(n) for n in SPECIAL_TOKENS] == list(range(len(chars) + 1, tok.get_vocab_size()))
    assert tok.decode(tok.encode(corpus[3])) == corpus[3]
    assert tok.token_bytes()[:len(chars)] == [len(c.encode()) for c in chars]
    loaded = load_tokenizer(tok.save(tmp_path / "char"))
    assert loaded.kind == "char" and loaded.fingerprint == tok.fingerprint
    ids, mask = loaded.render_conversation(full_conversation())
    assert len(ids) == len(mask) and sum(mask) > 0


def test_char_tokenizer_maps_unknown_characters_to_unk(corpus):
    tok = CharTokenizer.train_from_iterator(corpus)
    unk = tok.encode_special(UNK_TOKEN)
    assert "Ж" not in "".join(corpus)
    ids = tok.encode("theЖ")
    assert ids[:3] == tok.encode("the") and ids[3] == unk
    assert tok.decode(ids) == "the\ufffd"


# -----------------------------------------------------------------------------
# Hugging Face tokenizer

def build_hf_tokenizer_json(path, corpus, with_bos=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>"] if with_bos else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer_appends_missing_specials_and_maps_existing_ones(tmp_path, corpus):
    base = build_hf_tokenizer_json(tmp_path / "tokenizer.json", corpus, with_bos=True)
    n = base.get_vocab_size()
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.kind == "hf"
    assert tok.get_bos_token_id() == base.token_to_id("<|bos|>")  # mapped, not duplicated
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS[1:]] == list(range(n, n + 8))
    assert tok.get_vocab_size() == n + 8
    text = "the river café 東京 😀 12345"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == base.encode(text).ids
    assert tok.get_bos_token_id() not in tok.encode("<|bos|>")  # typed specials stay text
    token_bytes = tok.token_bytes()
    assert token_bytes[tok.get_bos_token_id()] == 0 and token_bytes[n:] == [0] * 8
    ids = tok.encode(text)
    assert sum(token_bytes[i] for i in ids) == len(text.encode("utf-8"))
    assert segments_with_mask(tok, full_conversation())[1] == ("Let me compute it.<|python_start|>6 * 7<|python_end|>", 1)


def test_hf_tokenizer_save_load_round_trip_and_fingerprint(tmp_path, corpus):
    build_hf_tokenizer_json(tmp_path / "tokenizer.json", corpus)
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    directory = tok.save(tmp_path / "hf")
    assert sorted(os.listdir(directory)) == ["manifest.json", "token_bytes.json", "tokenizer.json"]
    loaded = load_tokenizer(directory)
    assert loaded.fingerprint == tok.fingerprint and loaded.special_tokens == tok.special_tokens
    assert loaded.encode(corpus[:5]) == tok.encode(corpus[:5])
    # editing the copied tokenizer.json is caught
    path = os.path.join(directory, "tokenizer.json")
    data = json.load(open(path))
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(data, open(path, "w"))
    with pytest.raises(NanochatError, match="does not match its files"):
        load_tokenizer(directory)


def test_hf_file_that_is_missing_or_not_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(NanochatError, match="not found"):
        HFTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(NanochatError, match="not a valid"):
        HFTokenizer.from_file(tmp_path / "bad.json")


# -----------------------------------------------------------------------------
# The stages, run as a user runs them

def write_shards(base_dir, num_shards=3, docs_per_shard=200):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data_dir = os.path.join(base_dir, "base_data")
    os.makedirs(data_dir, exist_ok=True)
    for s in range(num_shards):
        docs = make_corpus(docs_per_shard, seed=100 + s)
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{s:05d}.parquet"), row_group_size=50)


def run_stage(module, args, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tok_train_then_tok_eval_run_on_a_tiny_shard_set(tmp_path):
    write_shards(tmp_path)
    train = run_stage("scripts.tok_train", ["--vocab-size", "512", "--max-chars", "200000"], tmp_path)
    assert train.returncode == 0, train.stderr
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert tok.kind == "bpe" and tok.get_vocab_size() == 512
    assert tok.fingerprint[:16] in train.stdout and "trained in" in train.stdout
    evaluation = run_stage("scripts.tok_eval", ["--max-chars", "100000"], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    for name in ("train", "val", "news", "code", "math", "korean"):
        assert any(line.startswith(name + " ") for line in evaluation.stdout.splitlines()), evaluation.stdout
    report_text = "".join(p.read_text() for p in (tmp_path / "report").glob("*.md"))
    assert "## Tokenizer training" in report_text and "## Tokenizer evaluation" in report_text
    assert tok.fingerprint in report_text


def test_tok_train_char_kind(tmp_path):
    write_shards(tmp_path, docs_per_shard=50)
    result = run_stage("scripts.tok_train", ["--tokenizer", "char", "--max-chars", "50000"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_tokenizer(tmp_path / "tokenizer").kind == "char"


def test_tok_train_without_shards_exits_nonzero_with_one_line_error(tmp_path):
    result = run_stage("scripts.tok_train", ["--vocab-size", "512"], tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nanochat.dataset" in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "tokenizer")


def test_tok_train_rejects_too_small_vocab_and_keeps_the_old_tokenizer(tmp_path):
    write_shards(tmp_path, docs_per_shard=50)
    result = run_stage("scripts.tok_train", ["--vocab-size", "264"], tmp_path)
    assert result.returncode != 0 and "too small" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "tokenizer")


def test_tok_train_on_empty_corpus_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data_dir = tmp_path / "base_data"
    data_dir.mkdir()
    for s in range(2):
        pq.write_table(pa.table({"text": ["", ""]}), data_dir / f"shard_{s:05d}.parquet")
    result = run_stage("scripts.tok_train", ["--vocab-size", "512"], tmp_path)
    assert result.returncode != 0 and "empty" in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "tokenizer")


def test_a_failed_save_leaves_the_previous_tokenizer_intact(tmp_path, corpus, bpe, monkeypatch):
    directory = tmp_path / "tok"
    char = CharTokenizer.train_from_iterator(corpus)
    char.save(directory)

    def fail(self, d):
        open(os.path.join(d, "ranks.tiktoken"), "w").write("half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(RustBPETokenizer, "_save_files", fail)
    with pytest.raises(NanochatError, match="disk full"):
        bpe.save(directory)
    assert load_tokenizer(directory).fingerprint == char.fingerprint
    assert os.listdir(tmp_path) == ["tok"]


def test_tok_train_imports_a_hugging_face_tokenizer(tmp_path, corpus):
    build_hf_tokenizer_json(tmp_path / "tokenizer.json", corpus)
    result = run_stage("scripts.tok_train", ["--tokenizer", f"hf:{tmp_path / 'tokenizer.json'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = load_tokenizer(tmp_path / "tokenizer")
    assert loaded.kind == "hf" and loaded.fingerprint == HFTokenizer.from_file(tmp_path / "tokenizer.json").fingerprint
    bad = run_stage("scripts.tok_train", ["--tokenizer", "wordpiece"], tmp_path)
    assert bad.returncode != 0 and "unknown --tokenizer" in bad.stderr
