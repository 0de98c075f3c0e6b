"""
Shared test fixtures: a tiny character tokenizer, tiny GPTs with random weights, and checkpoints saved
from them under a fresh NANOCHAT_BASE_DIR.

    def test_x(char_tokenizer, tiny_gpt, save_tiny_checkpoint, nanochat_base):
        model = tiny_gpt(char_tokenizer, sequence_len=128)
        save_tiny_checkpoint(nanochat_base / "base_checkpoints" / "tiny", 1, model, char_tokenizer)

The builders are session-scoped factories, so module-scoped fixtures can use them too; helpers_chat
imports the plain functions for the chat servers it builds.
"""

import math

import pytest
import torch

import nanochat.checkpoint_manager as cm
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import CharTokenizer

# base_train flags for a one-layer model on a few hundred characters: a step takes milliseconds
TINY_TRAIN_ARGS = ["--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128",
                   "--eval-tokens", "64", "--sample-every", "0", "--device", "cpu", "--buffer-docs", "8"]
CORPUS = "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 0123456789 +-*/=?,"


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine run many times faster without intra-op threading
    (use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = "the a cat dog sat on mat and ran far away big small red blue".split()


def random_word_docs(words=WORDS, n=150, seed=0, length=(3, 30)):
    """`n` documents of `length[0]..length[1]` words drawn from `words`: a reproducible toy corpus."""
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) for _ in range(n)]


def write_word_shards(base, docs, shards=3):
    """`docs` in `shards` equal parquet shards (row groups of 10 documents) under base/base_data."""
    import os
    from nanochat import dataset
    os.makedirs(base / "base_data")
    per_shard = len(docs) // shards
    for s in range(shards):
        dataset.write_shard(str(base / "base_data" / dataset.shard_name(s)), docs[s * per_shard:(s + 1) * per_shard],
                            row_group_docs=10)


def tiny_base_run(base, num_iterations, save_every, tag="r"):
    """Fill the folder `base` with three parquet shards of random words, a character tokenizer and a
    base_train run `tag` of `num_iterations` steps saved every `save_every`: where the resume and
    checkpoint-integrity tests start. Returns `base`."""
    import os
    from scripts import base_train
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        docs = random_word_docs()
        write_word_shards(base, docs)
        CharTokenizer.train_from_iterator(docs).save(str(base / "tokenizer"))
        torch.set_num_threads(1)
        assert base_train.main(TINY_TRAIN_ARGS + ["--num-iterations", str(num_iterations), "--save-every",
                                                  str(save_every), "--eval-every", "0", "--model-tag", tag]) == 0
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    return base


def private_copy(base, tmp_path, monkeypatch):
    """A copy of the folder `base` that a test may damage, made the NANOCHAT_BASE_DIR."""
    import shutil
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(copy))
    return copy


def tiny_tokenizer(corpus=CORPUS):
    """A character tokenizer of `corpus` (plus the special tokens): trained in microseconds."""
    return CharTokenizer.train_from_iterator([corpus])


def tiny_model(tokenizer, seed=0, sequence_len=256):
    """A one-layer GPT for `tokenizer` with non-degenerate random weights (nanochat's init zeroes the
    output projections, so an initialised model would answer the same token to everything), in eval mode."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(1, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.eval()


def save_model_checkpoint(checkpoint_dir, step, model, tokenizer, optimizer_states=None, **meta):
    """Save `model` (and its tokenizer) as step `step` of `checkpoint_dir` with the meta every loader reads;
    `meta` adds or replaces keys. Returns the step's directory."""
    meta = {"model_config": model.config.to_dict(), "arch": model.config.arch, "train_args": {}, "metrics": {},
            **meta}
    return cm.save_checkpoint(str(checkpoint_dir), step, model.state_dict(), optimizer_states, meta, tokenizer)


@pytest.fixture(scope="session")
def char_tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt():
    """tiny_gpt(tokenizer, seed=0, sequence_len=256): see tiny_model."""
    return tiny_model


@pytest.fixture(scope="session")
def save_tiny_checkpoint():
    """save_tiny_checkpoint(checkpoint_dir, step, model, tokenizer, optimizer_states=None, **meta)."""
    return save_model_checkpoint


@pytest.fixture
def nanochat_base(tmp_path, monkeypatch):
    """A fresh, empty NANOCHAT_BASE_DIR for this test."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path
