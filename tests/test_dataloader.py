"""The pretraining data loader: BOS-aligned best-fit packing, rank sharding, exact resume, pre-tokenized mode."""

import random

import pytest
import torch

from nanochat import dataset, pretokenized
from nanochat.common import NanochatError
from nanochat.dataloader import pretokenized_distributed_data_loader, tokenizing_distributed_data_loader
from nanochat.tokenizer import CharTokenizer

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()


def make_docs(n, seed=0):
    """Documents of very different lengths, each tagged with a unique marker like <d0042>."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.choice([2, 5, 10, 30, 80])
        docs.append(f"<d{i:04d}> " + " ".join(rng.choice(WORDS) for _ in range(length)))
    return docs


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    docs = make_docs(400)
    # 3 train shards + 1 val shard, 25 documents per row group -> 4 row groups per shard
    for s in range(4):
        dataset.write_shard(str(data_dir / dataset.shard_name(s)), docs[s * 100:(s + 1) * 100], row_group_docs=25)
    tok = CharTokenizer.train_from_iterator(docs)
    return tok, str(data_dir), docs


def take(loader, n):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(n)]


def markers(tok, inputs):
    """The document markers that appear in a batch."""
    found = set()
    for row in inputs.tolist():
        text = tok.decode(row)
        found.update(part[:7] for part in text.split("<d")[1:] if len(part) >= 5 and part[4] == ">")
    return found


def test_every_row_starts_with_bos_and_targets_are_inputs_shifted_by_one(corpus):
    tok, data_dir, _ = corpus
    loader = tokenizing_distributed_data_loader(tok, B=4, T=64, split="train", data_dir=data_dir, buffer_docs=16)
    bos = tok.get_bos_token_id()
    for inputs, targets in take(loader, 20):
        assert inputs.shape == targets.shape == (4, 64)
        assert inputs.dtype == targets.dtype == torch.int64
        assert (inputs[:, 0] == bos).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert int(inputs.max()) < tok.get_vocab_size()
    loader.close()


def test_ranks_read_disjoint_documents(corpus):
    tok, data_dir, _ = corpus
    seen = []
    for rank in range(2):
        loader = tokenizing_distributed_data_loader(tok, B=4, T=64, split="train", rank=rank, world_size=2,
                                                    data_dir=data_dir, buffer_docs=8)
        found = set()
        for inputs, _ in take(loader, 10):
            found |= markers(tok, inputs)
        loader.close()
        seen.append(found)
        assert len(found) > 20
    assert not seen[0] & seen[1]


def test_resume_continues_with_exactly_the_next_batches(corpus):
    tok, data_dir, _ = corpus
    kwargs = dict(B=3, T=96, split="train", data_dir=data_dir, buffer_docs=12)
    straight = tokenizing_distributed_data_loader(tok, **kwargs)
    # 60 batches of 3x97 tokens runs past one epoch of the 3 train shards (~17k tokens)
    expected = take(straight, 60)
    assert straight.epoch >= 1
    straight.close()

    first = tokenizing_distributed_data_loader(tok, **kwargs)
    got = take(first, 25)
    state = first.state_dict()
    first.close()
    resumed = tokenizing_distributed_data_loader(tok, resume_state=state, **kwargs)
    got += take(resumed, 35)
    resumed.close()
    for (a_in, a_tg), (b_in, b_tg) in zip(expected, got):
        assert torch.equal(a_in, b_in) and torch.equal(a_tg, b_tg)


def test_resume_refuses_a_state_saved_with_another_sequence_length(corpus):
    tok, data_dir, _ = corpus
    loader = tokenizing_distributed_data_loader(tok, B=2, T=32, split="train", data_dir=data_dir, buffer_docs=8)
    take(loader, 2)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(NanochatError, match="row_len"):
        tokenizing_distributed_data_loader(tok, B=2, T=64, split="train", data_dir=data_dir, buffer_docs=8,
                                           resume_state=state)


def naive_crop_waste(doc_lengths, row_len, num_rows):
    """Tokens dropped when rows take documents in order and crop the one that overflows."""
    kept = cropped = 0
    it = iter(doc_lengths)
    for _ in range(num_rows):
        space = row_len
        while space:
            n = next(it)
            kept += min(n, space)
            cropped += max(0, n - space)
            space -= min(n, space)
    return cropped / (kept + cropped)


def test_best_fit_packing_wastes_fewer_tokens_than_naive_cropping(corpus):
    tok, data_dir, docs = corpus
    T, rows = 600, 20
    loader = tokenizing_distributed_data_loader(tok, B=1, T=T, split="train", data_dir=data_dir, buffer_docs=32)
    take(loader, rows)
    best_fit = loader.waste_fraction()
    loader.close()
    train_lengths = [len(tok.encode(d)) + 1 for d in docs[:300]] * 3
    naive = naive_crop_waste(train_lengths, T + 1, rows)
    assert best_fit < naive / 2, (best_fit, naive)


def test_val_split_repeats_so_evaluation_never_runs_dry(corpus):
    tok, data_dir, _ = corpus
    loader = tokenizing_distributed_data_loader(tok, B=4, T=128, split="val", data_dir=data_dir, buffer_docs=8)
    batches = take(loader, 40)  # far more tokens than the 100 val documents hold
    assert len(batches) == 40 and loader.epoch >= 1
    fresh = tokenizing_distributed_data_loader(tok, B=4, T=128, split="val", data_dir=data_dir, buffer_docs=8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[:5], take(fresh, 5)))
    loader.close()
    fresh.close()


def test_pretokenized_mode_packs_rows_from_bos_and_resumes_exactly(corpus, tmp_path):
    tok, data_dir, _ = corpus
    out = pretokenized.pretokenize(tok, data_dir=data_dir, out_dir=str(tmp_path / "tok"))
    kwargs = dict(B=2, T=50, split="train", buffer_docs=10, block_tokens=1000)
    straight = pretokenized_distributed_data_loader(out, tok, tok.get_vocab_size(), **kwargs)
    expected = take(straight, 30)
    for inputs, targets in expected:
        assert (inputs[:, 0] == tok.get_bos_token_id()).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    first = pretokenized_distributed_data_loader(out, tok, tok.get_vocab_size(), **kwargs)
    got = take(first, 11)
    resumed = pretokenized_distributed_data_loader(out, tok, tok.get_vocab_size(), resume_state=first.state_dict(), **kwargs)
    got += take(resumed, 19)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_pretokenized_mode_refuses_shards_of_another_tokenizer_or_a_smaller_vocab(corpus, tmp_path):
    tok, data_dir, docs = corpus
    out = pretokenized.pretokenize(tok, data_dir=data_dir, out_dir=str(tmp_path / "tok"))
    other = CharTokenizer.train_from_iterator(docs + ["ü"])
    with pytest.raises(NanochatError, match=other.fingerprint):
        pretokenized_distributed_data_loader(out, other, other.get_vocab_size(), B=2, T=32, split="train")
    with pytest.raises(NanochatError, match="vocab size"):
        pretokenized_distributed_data_loader(out, tok, 10, B=2, T=32, split="train")


def test_a_document_longer_than_a_row_shows_a_new_window_in_each_pass(tmp_path, monkeypatch):
    """Training: pass 0 crops a long document to its start, later passes take text further into it (always
    after the document's BOS), so several epochs are not the same few rows again. Validation: always the start."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    rng = random.Random(3)
    docs = [f"<d{i:04d}> " + " ".join(rng.choice(WORDS) for _ in range(200)) for i in range(10)]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    dataset.write_shard(str(data_dir / dataset.shard_name(0)), docs[:8], row_group_docs=8)
    dataset.write_shard(str(data_dir / dataset.shard_name(1)), docs[8:], row_group_docs=8)   # val
    tok = CharTokenizer.train_from_iterator(docs)
    bos = tok.get_bos_token_id()
    loader = tokenizing_distributed_data_loader(tok, B=1, T=63, split="train", data_dir=str(data_dir), buffer_docs=2)
    rows = [tuple(inputs[0].tolist()) for inputs, _ in take(loader, 32)]   # 4 passes over 8 documents
    assert all(row[0] == bos for row in rows)
    assert len(set(rows)) == 32                        # never the same row twice
    starts = [row for row in rows if tok.decode(list(row[1:3])) == "<d"]
    assert len(starts) == 8                            # each document's start once: in pass 0
    texts = {doc: tok.encode(doc) for doc in docs[:8]}
    for row in rows:                                   # every row is BOS + a contiguous piece of one document
        assert any(" ".join(map(str, row[1:])) in " ".join(map(str, ids)) for ids in texts.values())
    # the val split always reads each document's start: the same rows however many passes it makes
    val = tokenizing_distributed_data_loader(tok, B=1, T=63, split="val", data_dir=str(data_dir), buffer_docs=2)
    val_rows = [tuple(inputs[0].tolist()) for inputs, _ in take(val, 8)]   # 4 passes over 2 documents
    assert len(set(val_rows)) == 2
    assert all(tok.decode(list(row[1:3])) == "<d" for row in val_rows)
