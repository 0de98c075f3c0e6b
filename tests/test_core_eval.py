"""CORE: bundle download (retries, one download for concurrent callers), scoring of the three task types,
centered accuracy, and base_eval end to end on a bundle served from 127.0.0.1."""

import io
import json
import os
import random
import threading
import zipfile

import pytest
import torch
from tqdm import tqdm

from nanochat import core_eval
from nanochat.common import NanochatError
from nanochat.tokenizer import CharTokenizer
from tests.helpers_http import FlakyFileServer

CORE_YAML = """icl_tasks:
- label: mc_task
  dataset_uri: mc/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
- label: schema_task
  dataset_uri: schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
- label: lm_task
  dataset_uri: lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
META_CSV = "Eval Task,Task Category,Random baseline\nmc_task,x,25\nschema_task,x,50\nlm_task,x,0\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_items(seed=0):
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "gold"]
    mc = [{"query": f"q{i} color?", "choices": colors, "gold": rng.randrange(4)} for i in range(8)]
    schema = [{"context_options": [f"ctx a{i}", f"ctx b{i}"], "continuation": "then it rained", "gold": rng.randrange(2)}
              for i in range(6)]
    lm = [{"context": f"count {i}", "continuation": f"{i + 1} {i + 2}"} for i in range(5)]
    return mc, schema, lm


def bundle_zip():
    mc, schema, lm = make_items()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("eval_bundle/core.yaml", CORE_YAML)
        z.writestr("eval_bundle/eval_meta_data.csv", META_CSV)
        for name, items in (("mc/mc.jsonl", mc), ("schema.jsonl", schema), ("lm.jsonl", lm)):
            z.writestr(f"eval_bundle/eval_data/{name}", "".join(json.dumps(x) + "\n" for x in items))
    return buf.getvalue()


def test_bundle_is_downloaded_with_retries_resumed_after_a_drop_and_extracted(tmp_path, capsys):
    with FlakyFileServer({"eval_bundle.zip": bundle_zip()}, faults={"eval_bundle.zip": ["500", "truncate", "drop"]}) as srv:
        path = core_eval.ensure_eval_bundle(srv.url + "/eval_bundle.zip", base_dir=str(tmp_path), backoff=0.01)
        # not a terminal: the progress bar is plain lines, the last one at the whole bundle's size
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("downloading")]
        size = tqdm.format_sizeof(len(bundle_zip()))  # as the bar writes it, e.g. 2.49k
        assert lines and "100%" in lines[-1] and f"{size}/{size}" in lines[-1]
        # 500: retried; truncated (not a zip): fetched again from scratch; dropped: resumed with a Range request
        assert [r[2] for r in srv.requests_for("eval_bundle.zip")] == [500, 200, 200, 206]
        assert path == str(tmp_path / "eval_bundle")
        assert [t["label"] for t in core_eval.load_tasks(path)] == ["mc_task", "schema_task", "lm_task"]
        assert core_eval.ensure_eval_bundle(srv.url + "/eval_bundle.zip", base_dir=str(tmp_path)) == path
        assert len(srv.requests_for("eval_bundle.zip")) == 4  # already there: no new download
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".eval_bundle.") and n != ".eval_bundle.lock"]


def test_concurrent_callers_download_the_bundle_once(tmp_path):
    with FlakyFileServer({"eval_bundle.zip": bundle_zip()}) as srv:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            core_eval.ensure_eval_bundle(srv.url + "/eval_bundle.zip", base_dir=str(tmp_path)))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and len(set(results)) == 1
        assert len(srv.requests_for("eval_bundle.zip")) == 1


def test_unreachable_bundle_is_a_clear_error(tmp_path):
    with FlakyFileServer({}) as srv:
        with pytest.raises(NanochatError, match="eval_bundle.zip answered HTTP 404.*--skip-core"):
            core_eval.ensure_eval_bundle(srv.url + "/eval_bundle.zip", base_dir=str(tmp_path), retries=2, backoff=0.01)


@pytest.fixture()
def bundle(tmp_path):
    z = tmp_path / "b.zip"
    z.write_bytes(bundle_zip())
    with zipfile.ZipFile(z) as f:
        f.extractall(tmp_path)
    path = str(tmp_path / "eval_bundle")
    texts = [json.dumps(core_eval.load_task_data(path, t)) for t in core_eval.load_tasks(path)]
    return path, CharTokenizer.train_from_iterator(texts + ["\n "])


class _Config:
    sequence_len = 512


class OracleModel(torch.nn.Module):
    """Predicts the next token of any row that starts like one of `known` sequences, uniform otherwise."""

    def __init__(self, known, vocab):
        super().__init__()
        self.known, self.vocab, self.config = known, vocab, _Config()

    def forward(self, ids):
        logits = torch.zeros(ids.size(0), ids.size(1), self.vocab)
        for i, row in enumerate(ids.tolist()):
            for seq in self.known:
                if row[:len(seq)] == seq:
                    for t in range(len(seq) - 1):
                        logits[i, t, seq[t + 1]] = 20.0
        return logits


def test_fewshot_examples_are_other_items_and_the_scored_span_is_the_answer(bundle):
    path, tok = bundle
    mc_task = core_eval.load_tasks(path)[0]
    data = core_eval.load_task_data(path, mc_task)
    seqs, spans, gold = core_eval.render_item(mc_task, data, 3, tok)
    text = tok.decode(seqs[gold][1:])
    assert text.endswith(f"q3 color? {data[3]['choices'][gold]}") and text.count("color?") == 3
    assert tok.decode(seqs[gold][spans[gold][0]:spans[gold][1]]).strip() == data[3]["choices"][gold]


def known_sequences(path, tok, choose):
    """The token sequence of option choose(gold) of every item of every task."""
    known = []
    for task in core_eval.load_tasks(path):
        data = core_eval.load_task_data(path, task)
        for idx in range(len(data)):
            seqs, _, gold = core_eval.render_item(task, data, idx, tok)
            known.append(seqs[choose(gold)])
    return known


def test_a_model_that_knows_every_answer_scores_core_1(bundle):
    path, tok = bundle
    oracle = OracleModel(known_sequences(path, tok, lambda gold: gold), tok.get_vocab_size())
    result = core_eval.evaluate_core(oracle, tok, path, "cpu", log=lambda *a: None)
    assert result["results"] == {"mc_task": 1.0, "schema_task": 1.0, "lm_task": 1.0}
    assert result["core"] == pytest.approx(1.0)
    limited = core_eval.evaluate_core(oracle, tok, path, "cpu", max_per_task=2, log=lambda *a: None)
    assert limited["core"] == pytest.approx(1.0)


def test_centered_accuracy_subtracts_the_random_baseline(bundle):
    path, tok = bundle
    # a model that always believes the first option: right exactly when the answer is option 0
    first = OracleModel(known_sequences(path, tok, lambda gold: 0), tok.get_vocab_size())
    result = core_eval.evaluate_core(first, tok, path, "cpu", log=lambda *a: None)
    mc, schema, _ = make_items()
    mc_acc = sum(x["gold"] == 0 for x in mc) / len(mc)
    schema_acc = sum(x["gold"] == 0 for x in schema) / len(schema)
    assert 0 < mc_acc < 1 and 0 < schema_acc < 1
    assert result["results"]["mc_task"] == pytest.approx(mc_acc)
    assert result["centered"]["mc_task"] == pytest.approx((mc_acc - 0.25) / 0.75)
    assert result["centered"]["schema_task"] == pytest.approx((schema_acc - 0.5) / 0.5)
    assert result["core"] == pytest.approx(sum(result["centered"].values()) / 3)
    blank = core_eval.evaluate_core(OracleModel([], tok.get_vocab_size()), tok, path, "cpu", log=lambda *a: None)
    assert blank["results"]["lm_task"] == 0.0


def test_base_eval_reports_bpb_samples_and_core_or_why_core_was_skipped(tmp_path, monkeypatch, capsys):
    from tests.test_base_train import TINY
    from scripts import base_eval, base_train
    from nanochat import dataset
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    mc, schema, lm = make_items()
    docs = [f"q{i} color? red green blue gold then it rained count {i} {i + 1}" for i in range(60)]
    os.makedirs(tmp_path / "base_data")
    for s in range(2):
        dataset.write_shard(str(tmp_path / "base_data" / dataset.shard_name(s)), docs[s * 30:(s + 1) * 30], row_group_docs=10)
    CharTokenizer.train_from_iterator(docs + ["abcdefghijklmnopqrstuvwxyz0123456789 ?\n"]).save(str(tmp_path / "tokenizer"))
    base_train.main(TINY + ["--num-iterations", "1", "--model-tag", "e"])
    capsys.readouterr()
    common = ["--device", "cpu", "--device-batch-size", "2", "--split-tokens", "64", "--max-new-tokens", "4"]
    with FlakyFileServer({"eval_bundle.zip": bundle_zip()}) as srv:
        assert base_eval.main(common + ["--eval-bundle-url", srv.url + "/missing.zip"]) == 0
        out = capsys.readouterr().out
        assert "train bpb:" in out and "val bpb:" in out and "sample:" in out
        assert "CORE: skipped (bundle not available: " in out and "HTTP 404" in out
        assert base_eval.main(common + ["--eval-bundle-url", srv.url + "/eval_bundle.zip", "--core-max-per-task", "2"]) == 0
        out = capsys.readouterr().out
        assert "CORE: " in out and "mc_task" in out and "skipped" not in out
    report = open(tmp_path / "report" / "base-model-evaluation.md").read()
    assert "CORE" in report and "val bpb" in report
