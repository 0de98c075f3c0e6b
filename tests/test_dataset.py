"""Pretraining data: shard layout and readers, the downloader against a misbehaving local
server, local-file conversion, the embedded offline corpus, and pre-tokenized shards."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.common import NanochatError, run_main

try:
    from helpers_http import FlakyFileServer, HubMirror
except ImportError:  # tests/ imported as a package
    from tests.helpers_http import FlakyFileServer, HubMirror


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


def run_cli(argv, capsys):
    """Run `python -m nanochat.dataset argv` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_main(dataset.main, argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def make_docs(prefix, n):
    return [f"{prefix} document {i}: " + "words and more words " * (i % 7 + 1) for i in range(n)]


def parquet_bytes(docs, row_group_docs=4):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=row_group_docs)
    return buf.getvalue()


def write_parquet(path, docs, row_group_docs=4):
    with open(path, "wb") as f:
        f.write(parquet_bytes(docs, row_group_docs))


def read_all_texts(data_dir, split):
    return [t for texts in dataset.parquets_iter_batched(split, data_dir=str(data_dir)) for t in texts]


# -----------------------------------------------------------------------------
# Readers

@pytest.fixture
def three_shards(tmp_path):
    """shard_00000 (3 row groups), shard_00001 (2 row groups) = train; shard_00002 = val."""
    d = tmp_path / "shards"
    d.mkdir()
    write_parquet(d / "shard_00000.parquet", make_docs("a", 10), row_group_docs=4)
    write_parquet(d / "shard_00001.parquet", make_docs("b", 8), row_group_docs=4)
    write_parquet(d / "shard_00002.parquet", make_docs("v", 3), row_group_docs=2)
    (d / "shard_00003.parquet.partial").write_bytes(b"half a download")
    return d


def test_last_shard_by_name_is_validation_and_partials_are_not_shards(three_shards):
    names = [os.path.basename(p) for p in dataset.list_parquet_files(str(three_shards))]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert read_all_texts(three_shards, "val") == make_docs("v", 3)
    assert read_all_texts(three_shards, "train") == make_docs("a", 10) + make_docs("b", 8)


def test_ranks_get_disjoint_row_groups_that_together_cover_the_split_in_order(three_shards):
    world = 2
    per_rank = [list(dataset.iter_row_groups("train", start=r, step=world, data_dir=str(three_shards)))
                for r in range(world)]
    assert [g for g, _ in per_rank[0]] == [0, 2, 4]  # rows groups numbered across both train files
    assert [g for g, _ in per_rank[1]] == [1, 3]
    merged = sorted(per_rank[0] + per_rank[1])
    assert [t for _, texts in merged for t in texts] == make_docs("a", 10) + make_docs("b", 8)
    # the batched view yields the same row groups
    assert list(dataset.parquets_iter_batched("train", 1, 2, str(three_shards))) == [t for _, t in per_rank[1]]


def test_resuming_at_next_row_group_index_continues_exactly_where_reading_stopped(three_shards):
    full = list(dataset.iter_row_groups("train", start=0, step=2, data_dir=str(three_shards)))
    first = full[:2]
    resumed = list(dataset.iter_row_groups("train", start=first[-1][0] + 2, step=2, data_dir=str(three_shards)))
    assert first + resumed == full


def test_iter_documents_caps_each_document_and_stops_at_max_chars(three_shards):
    docs = list(dataset.iter_documents("train", doc_cap=10, data_dir=str(three_shards)))
    assert docs == [d[:10] for d in make_docs("a", 10) + make_docs("b", 8)]
    limited = list(dataset.iter_documents("train", max_chars=45, doc_cap=10, data_dir=str(three_shards)))
    assert sum(map(len, limited)) == 45 and limited == docs[:4] + [docs[4][:5]]


def test_no_shards_is_an_error_that_says_how_to_get_data(tmp_path):
    with pytest.raises(NanochatError, match=r"--embedded.*-n N"):
        list(dataset.parquets_iter_batched("train", data_dir=str(tmp_path / "nothing")))


def test_a_single_shard_is_validation_only_and_train_is_a_clear_error(tmp_path):
    write_parquet(tmp_path / "shard_00000.parquet", make_docs("v", 3))
    assert read_all_texts(tmp_path, "val") == make_docs("v", 3)
    with pytest.raises(NanochatError, match="only one shard"):
        read_all_texts(tmp_path, "train")


# -----------------------------------------------------------------------------
# Downloader against a local server that misbehaves

NUM_TOTAL = 5  # shard_00000..shard_00003 train, shard_00004 val


@pytest.fixture
def remote_shards():
    return {dataset.shard_name(i): parquet_bytes(make_docs(f"remote{i}", 40 + i), row_group_docs=8)
            for i in range(NUM_TOTAL)}


def download_args(server, data_dir, n, retries=3):
    return ["-n", str(n), "--base-url", server.url, "--num-shards-total", str(NUM_TOTAL), "--data-dir", str(data_dir),
            "--workers", "3", "--retries", str(retries), "--backoff", "0.01", "--timeout", "5"]


def test_downloader_recovers_from_drops_errors_and_corrupt_files_and_resumes_with_range(tmp_path, remote_shards, capsys):
    faults = {
        "shard_00000.parquet": ["drop"],                  # resume from the bytes already on disk
        "shard_00001.parquet": ["500"],                   # server error, then fine
        "shard_00002.parquet": ["truncate"],              # well-formed answer, corrupt parquet
        "shard_00003.parquet": ["drop", "ignore_range"],  # resume attempt answered with the whole file
    }
    data_dir = tmp_path / "dl"
    with FlakyFileServer(remote_shards, faults) as server:
        code, out, err = run_cli(download_args(server, data_dir, n=4), capsys)
        assert code == 0, err
        for name, data in remote_shards.items():
            assert (data_dir / name).read_bytes() == data, name
        leftovers = [n for n in os.listdir(data_dir) if not n.endswith(".parquet") and n != "manifest.json"]
        assert leftovers == []  # no partial or temp file left
        manifest = json.loads((data_dir / "manifest.json").read_text())
        assert manifest["source"] == "download" and manifest["shards"] == sorted(remote_shards)
        # shard 0 was resumed: the second request asked for the missing tail and got 206
        (_, r1, s1), (_, r2, s2) = server.requests_for("shard_00000.parquet")
        assert r1 is None and s1 == 200 and s2 == 206 and int(r2.split("=")[1].rstrip("-")) > 0
        # shard 3's server ignored the Range header: the file was fetched whole again, still correct
        assert [s for _, _, s in server.requests_for("shard_00003.parquet")] == [200, 200]
        assert [s for _, _, s in server.requests_for("shard_00002.parquet")] == [200, 200]
        assert "[5/5 shards]" in out and "MB/s" in out and "ETA" in out
        # everything already here: a second run downloads nothing
        before = len(server.requests)
        code, out, _ = run_cli(download_args(server, data_dir, n=4), capsys)
        assert code == 0 and len(server.requests) == before and "5 already here" in out


def test_download_n_fetches_the_first_n_train_shards_plus_the_validation_shard(tmp_path, remote_shards, capsys):
    data_dir = tmp_path / "dl"
    with FlakyFileServer(remote_shards) as server:
        code, _, err = run_cli(download_args(server, data_dir, n=2), capsys)
        assert code == 0, err
        assert [os.path.basename(p) for p in dataset.list_parquet_files(str(data_dir))] == [
            "shard_00000.parquet", "shard_00001.parquet", "shard_00004.parquet"]
        assert read_all_texts(data_dir, "val") == make_docs("remote4", 44)
        code, _, _ = run_cli(download_args(server, data_dir, n=3), capsys)
        assert code == 0
        assert sorted({name for name, _, _ in server.requests}) == [dataset.shard_name(i) for i in (0, 1, 2, 4)]
        assert len(server.requests) == 4  # only the new shard was fetched the second time


def test_download_fails_clearly_and_never_leaves_a_corrupt_shard_in_place(tmp_path, remote_shards, capsys):
    data_dir = tmp_path / "dl"
    with FlakyFileServer(remote_shards, {"shard_00001.parquet": ["truncate"] * 10}) as server:
        code, _, err = run_cli(download_args(server, data_dir, n=4, retries=2), capsys)
        assert len(server.requests_for("shard_00001.parquet")) == 3
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "shard_00001.parquet" in lines[0]
    assert "not a readable parquet" in lines[0] and "again" in lines[0]
    assert not (data_dir / "shard_00001.parquet").exists() and not (data_dir / "shard_00001.parquet.partial").exists()
    for i in (0, 2, 3, 4):  # the other shards are complete and intact
        assert (data_dir / dataset.shard_name(i)).read_bytes() == remote_shards[dataset.shard_name(i)]


def test_an_interrupted_download_keeps_its_partial_file_and_the_next_run_resumes_it(tmp_path, remote_shards, capsys):
    data_dir = tmp_path / "dl"
    name = "shard_00000.parquet"
    with FlakyFileServer(remote_shards, {name: ["drop"]}) as server:
        code, _, err = run_cli(download_args(server, data_dir, n=1, retries=0), capsys)
        assert code == 2 and name in err and "resume" in err
        assert not (data_dir / name).exists()
        kept = (data_dir / (name + ".partial")).stat().st_size
        assert 0 < kept < len(remote_shards[name])
        code, _, err = run_cli(download_args(server, data_dir, n=1, retries=0), capsys)
        assert code == 0, err
        assert server.requests_for(name)[-1] == (name, f"bytes={kept}-", 206)
    assert (data_dir / name).read_bytes() == remote_shards[name]


def test_download_refuses_to_mix_into_another_corpus_whose_shard_names_it_would_reuse(tmp_path, remote_shards, capsys):
    data_dir = tmp_path / "dl"
    (tmp_path / "mine.txt").write_text("one\n\ntwo\n\nthree", encoding="utf-8")
    dataset.build_from_files([str(tmp_path / "mine.txt")], str(data_dir))  # writes shard_00000/1.parquet
    with FlakyFileServer(remote_shards) as server:
        code, _, err = run_cli(download_args(server, data_dir, n=1), capsys)
        assert code == 2 and "another corpus" in err and server.requests == []
        code, _, err = run_cli(download_args(server, data_dir, n=1) + ["--overwrite"], capsys)
        assert code == 0, err
    assert sorted(os.listdir(data_dir)) == ["manifest.json", "shard_00000.parquet", "shard_00004.parquet"]
    assert (data_dir / "shard_00000.parquet").read_bytes() == remote_shards["shard_00000.parquet"]


def test_disk_full_during_a_download_is_one_clear_error_and_no_shard_is_renamed_into_place(tmp_path, remote_shards,
                                                                                         capsys, monkeypatch):
    class FullDiskFile(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    from nanochat import download
    monkeypatch.setattr(download, "open", lambda path, mode="r": FullDiskFile(), raising=False)
    data_dir = tmp_path / "dl"
    with FlakyFileServer(remote_shards) as server:
        code, _, err = run_cli(download_args(server, data_dir, n=1), capsys)
        assert len(server.requests_for("shard_00000.parquet")) == 1  # not retried: retrying cannot help
    assert code == 2 and "disk full" in err and len(err.strip().splitlines()) == 1
    assert dataset.list_parquet_files(str(data_dir)) == []


def test_download_of_a_missing_file_fails_at_once_without_retrying(tmp_path, remote_shards, capsys):
    del remote_shards["shard_00004.parquet"]
    with FlakyFileServer(remote_shards) as server:
        code, _, err = run_cli(download_args(server, tmp_path / "dl", n=1, retries=5), capsys)
        assert len(server.requests_for("shard_00004.parquet")) == 1
    assert code == 2 and "HTTP 404" in err and "--base-url" in err


def run_hub_download(hub, data_dir, n, *extra):
    """The CLI in a fresh process: huggingface_hub reads HF_ENDPOINT when it is first imported."""
    import subprocess
    import sys
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(data_dir) + ".hf_home", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", str(n), "--num-shards-total",
                           str(NUM_TOTAL), "--data-dir", str(data_dir), "--backoff", "0.01", *extra],
                          env=env, capture_output=True, text=True, timeout=120)


def test_hub_download_goes_through_hf_endpoint_and_checks_each_shard_before_it_counts(tmp_path, remote_shards):
    repo = dict(remote_shards, **{"shard_00001.parquet": b"not parquet at all"})
    with HubMirror({dataset.DEFAULT_REPO_ID: repo}) as hub:
        proc = run_hub_download(hub, tmp_path / "dl", 2, "--retries", "1")
        gets = [p for m, p, st in hub.requests if m == "GET" and p.endswith("shard_00001.parquet")]
    # shard 1 is served corrupt: fetched again (retry), then a one-line error; the others are in place
    assert proc.returncode == 2 and len(gets) == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "shard_00001.parquet" in proc.stderr
    names = sorted(os.path.basename(p) for p in dataset.list_parquet_files(str(tmp_path / "dl")))
    assert names == ["shard_00000.parquet", "shard_00004.parquet"]
    assert (tmp_path / "dl" / "shard_00004.parquet").read_bytes() == remote_shards["shard_00004.parquet"]
    manifest = json.loads((tmp_path / "dl" / "manifest.json").read_text())
    assert manifest["repo_id"] == dataset.DEFAULT_REPO_ID
    with HubMirror({dataset.DEFAULT_REPO_ID: remote_shards}) as hub:  # fixed upstream: the rerun completes
        proc = run_hub_download(hub, tmp_path / "dl", 2)
        fetched = sorted(p.rsplit("/", 1)[-1] for m, p, st in hub.requests if m == "GET")
    assert proc.returncode == 0, proc.stderr
    assert fetched == ["shard_00001.parquet"]  # shards already here are not fetched again
    assert read_all_texts(str(tmp_path / "dl"), "train")[-1].startswith("remote1")


def test_hub_download_of_a_shard_the_repo_lacks_fails_at_once_in_one_line(tmp_path, remote_shards):
    del remote_shards["shard_00004.parquet"]
    with HubMirror({dataset.DEFAULT_REPO_ID: remote_shards}) as hub:
        proc = run_hub_download(hub, tmp_path / "dl", 1, "--retries", "5")
        heads = [p for m, p, st in hub.requests if p.endswith("shard_00004.parquet")]
    assert proc.returncode == 2 and len(heads) == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--repo-id" in proc.stderr and "HF_ENDPOINT" in proc.stderr


# -----------------------------------------------------------------------------
# Custom corpora from local files

def test_from_files_converts_text_jsonl_and_parquet_into_train_shards_and_a_last_validation_shard(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond paragraph\n\nthird\n", encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps({"body": f"json doc {i} ünïcødé", "id": i}) + "\n")
    write_parquet(tmp_path / "c.parquet", make_docs("pq", 30))
    # parquet inputs use the same --text-field, so give c.parquet a 'body' column too
    pq.write_table(pa.table({"body": make_docs("pq", 30)}), tmp_path / "c.parquet", row_group_size=7)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["--from-files", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                                 str(tmp_path / "c.parquet"), "--text-field", "body", "--data-dir", str(out),
                                 "--docs-per-shard", "20", "--row-group-docs", "6", "--val-fraction", "0.1"], capsys)
    assert code == 0, err
    expected = (["first paragraph\nstill first", "second paragraph", "third"]
                + [f"json doc {i} ünïcødé" for i in range(20)] + make_docs("pq", 30))
    train, val = read_all_texts(out, "train"), read_all_texts(out, "val")
    assert sorted(train + val) == sorted(expected)  # every document exactly once
    assert len(val) == 5  # 10% of 53, in the last shard
    files = dataset.list_parquet_files(str(out))
    assert [os.path.basename(p) for p in files] == [dataset.shard_name(i) for i in range(4)]
    assert [pq.ParquetFile(p).num_row_groups for p in files] == [4, 4, 2, 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "files" and manifest["num_docs"] == 53 and manifest["shards"][-1]["split"] == "val"


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"caf\xe9 latin-1 text\n", "not UTF-8"),
])
def test_from_files_rejects_empty_and_non_utf8_input_in_one_line(tmp_path, capsys, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    code, _, err = run_cli(["--from-files", str(tmp_path / "bad.txt"), "--data-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert dataset.list_parquet_files(str(tmp_path / "out")) == []


def test_from_files_names_the_bad_jsonl_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(NanochatError, match=r"x\.jsonl:2 is not valid JSON"):
        dataset.build_from_files([str(tmp_path / "x.jsonl")], str(tmp_path / "out"))


def test_from_files_refuses_to_mix_with_existing_shards_and_a_failed_rebuild_keeps_the_old_corpus(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(make_docs("old", 10)), encoding="utf-8")
    out = str(tmp_path / "out")
    dataset.build_from_files([str(good)], out, docs_per_shard=4)
    before = {p: open(p, "rb").read() for p in dataset.list_parquet_files(out)}
    with pytest.raises(NanochatError, match="--overwrite"):
        dataset.build_from_files([str(good)], out)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(NanochatError, match="not UTF-8"):
        dataset.build_from_files([str(good), str(tmp_path / "bad.txt")], out, overwrite=True)
    assert {p: open(p, "rb").read() for p in dataset.list_parquet_files(out)} == before
    assert sorted(os.listdir(out)) == sorted([os.path.basename(p) for p in before] + ["manifest.json"])


def test_disk_full_while_writing_shards_is_one_clear_error_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(make_docs("doc", 30)), encoding="utf-8")
    out = tmp_path / "out"
    real_write_table = pq.ParquetWriter.write_table
    calls = []

    def write_table_until_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_write_table(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table_until_full)
    with pytest.raises(NanochatError, match="disk full"):
        dataset.build_from_files([str(good)], str(out), docs_per_shard=10, row_group_docs=5)
    assert os.listdir(out) == []  # no shard, no temp file, no staging folder


# -----------------------------------------------------------------------------
# The embedded offline corpus

def test_python_sources_are_cut_into_documents_that_join_back_to_the_module():
    import inspect
    import argparse
    text = inspect.getsource(argparse)
    docs = dataset.split_python_source(text, target=4000)
    assert "".join(docs) == text
    assert len(docs) > 10 and max(len(d) for d in docs[1:-1]) < 20000


def test_embedded_corpus_is_over_20mb_deterministic_and_has_a_validation_shard(tmp_path, capsys):
    code, out, err = run_cli(["--embedded", "--data-dir", str(tmp_path / "one")], capsys)
    assert code == 0, err
    assert "M characters" in out
    dataset.build_embedded(str(tmp_path / "two"))
    one = sorted(os.listdir(tmp_path / "one"))
    assert one == sorted(os.listdir(tmp_path / "two")) and "manifest.json" in one
    for name in one:  # byte for byte the same build
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    import sys
    assert manifest["source"] == "embedded" and manifest["python_version"] == sys.version.split()[0]
    assert manifest["num_chars"] >= 20_000_000
    assert [s["split"] for s in manifest["shards"]][-1] == "val" and len(manifest["shards"]) >= 3
    val = read_all_texts(tmp_path / "one", "val")
    assert len(val) == manifest["shards"][-1]["num_docs"] and sum(map(len, val)) > 100_000
    assert any("def " in d for d in val) and any("# Lib/" in d for d in val)
    # a second run on the same interpreter finds the corpus complete and leaves it alone
    code, out, _ = run_cli(["--embedded", "--data-dir", str(tmp_path / "one")], capsys)
    assert code == 0 and "nothing to do" in out


def test_embedded_refuses_to_overwrite_another_corpus(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("one\n\ntwo\n\nthree", encoding="utf-8")
    dataset.build_from_files([str(tmp_path / "mine.txt")], str(tmp_path / "d"))
    code, _, err = run_cli(["--embedded", "--data-dir", str(tmp_path / "d")], capsys)
    assert code == 2 and "--overwrite" in err


# -----------------------------------------------------------------------------
# Pre-tokenized shards

class FakeByteTokenizer:
    """Bytes 0..255 plus BOS = 256: the interface nanochat.tokenizer gives, in miniature."""

    def __init__(self, fingerprint="ab" * 32):
        self.fingerprint = fingerprint

    def get_vocab_size(self):
        return 257

    def get_bos_token_id(self):
        return 256

    def encode(self, texts, prepend=None):
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


@pytest.fixture
def pretokenized(three_shards, tmp_path):
    tok = FakeByteTokenizer()
    out = dataset.pretokenize(tok, data_dir=str(three_shards), out_dir=str(tmp_path / "tok"))
    return out, tok, three_shards


def test_pretokenized_shards_hold_every_document_with_bos_and_record_the_fingerprint(pretokenized):
    out, tok, shards = pretokenized
    meta = json.loads(open(os.path.join(out, "meta.json")).read())
    assert meta["fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16" and meta["vocab_size"] == 257
    assert [(f["name"], f["split"]) for f in meta["files"]] == [
        ("train_00000.bin", "train"), ("train_00001.bin", "train"), ("val_00000.bin", "val")]
    for split in ("train", "val"):
        arrays = dataset.load_pretokenized(out, tok.fingerprint, 257, split)
        expected = [t for doc in tok.encode(read_all_texts(shards, split), prepend=256) for t in doc]
        assert np.concatenate(arrays).tolist() == expected
    assert meta["files"][0]["max_id"] == 256


def test_pretokenize_skips_work_already_done_but_redoes_it_when_the_shards_changed(pretokenized, capsys):
    out, tok, shards = pretokenized
    capsys.readouterr()
    assert dataset.pretokenize(tok, data_dir=str(shards), out_dir=out) == out
    assert "already pre-tokenized" in capsys.readouterr().out
    write_parquet(shards / "shard_00002.parquet", make_docs("new val", 5))
    dataset.pretokenize(tok, data_dir=str(shards), out_dir=out)
    assert "already" not in capsys.readouterr().out
    val = np.concatenate(dataset.load_pretokenized(out, tok.fingerprint, 257, "val")).tolist()
    assert val == [t for doc in tok.encode(make_docs("new val", 5), prepend=256) for t in doc]


def test_default_pretokenized_dir_is_named_by_fingerprint_and_big_vocabs_use_uint32(base_dir):
    assert dataset.pretokenized_dir("0123456789abcdef" * 4) == os.path.join(str(base_dir), "base_data_tok",
                                                                          "0123456789abcdef")
    assert dataset.token_dtype(65535) == "uint16" and dataset.token_dtype(65536) == "uint32"


def test_pretokenized_shards_from_another_tokenizer_are_refused_naming_both_fingerprints(pretokenized):
    out, tok, _ = pretokenized
    other = "cd" * 32
    with pytest.raises(NanochatError) as e:
        dataset.load_pretokenized(out, other, 257)
    assert tok.fingerprint in str(e.value) and other in str(e.value) and out in str(e.value)


def test_pretokenized_ids_beyond_the_model_vocab_are_refused(pretokenized):
    out, tok, _ = pretokenized
    with pytest.raises(NanochatError, match="token id 256 but the model's vocab size is 200"):
        dataset.load_pretokenized(out, tok.fingerprint, 200)


def test_pretokenized_data_that_disagrees_with_its_metadata_is_refused(pretokenized):
    out, tok, _ = pretokenized
    path = os.path.join(out, "train_00000.bin")
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[len(tokens) // 2] = 40000  # corrupted bytes: an id far above the recorded max
    tokens.tofile(path)
    with pytest.raises(NanochatError, match="above its recorded max id"):
        dataset.load_pretokenized(out, tok.fingerprint, 65536)
    tokens[:-1].tofile(path)  # and a truncated file
    with pytest.raises(NanochatError, match="not .* tokens long"):
        dataset.load_pretokenized(out, tok.fingerprint, 65536)


def test_pretokenized_dir_without_meta_is_incomplete_and_says_how_to_make_it(tmp_path):
    with pytest.raises(NanochatError, match="--pretokenize"):
        dataset.load_pretokenized(str(tmp_path), "ab" * 32, 257)
