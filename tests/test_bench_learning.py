"""dev/bench_learning: variants are parsed and checked before any training, budgets become the same
tokens (or seconds) for every variant, and a tiny end-to-end run prints one table of val bits/byte."""

import os

import pytest

from conftest import random_word_docs, write_word_shards
from dev import bench_learning as bl
from nanochat import dataset
from nanochat.common import NanochatError
from nanochat.tokenizer import CharTokenizer


def test_variant_is_a_name_then_base_train_flags():
    assert bl.parse_variant("lr2x: --matrix-lr 0.04") == ("lr2x", ["--matrix-lr", "0.04"])
    assert bl.parse_variant("baseline:") == ("baseline", [])


@pytest.mark.parametrize("text", ["--matrix-lr 0.04", ": --depth 6", "x: --num-iterations 5", "y: --resume",
                                  "z: --depth '6"])
def test_malformed_variant_or_one_that_sets_the_horizon_is_a_one_line_error(text):
    with pytest.raises(NanochatError, match="--variant"):
        bl.parse_variant(text)


def test_step_tokens_follow_the_variants_batch_shape_unless_it_sets_the_total():
    argv, step_tokens = bl.variant_argv([], eval_tokens=10_000)
    assert step_tokens == 16 * 256 and argv[argv.index("--eval-tokens") + 1] == "8192"  # whole device batches
    _, step_tokens = bl.variant_argv(["--max-seq-len", "512", "--device-batch-size", "8"], eval_tokens=65536)
    assert step_tokens == 8 * 512
    _, step_tokens = bl.variant_argv(["--total-batch-size", "8192"], eval_tokens=65536)
    assert step_tokens == 8192


def test_log_parsing_takes_the_last_val_bpb_and_every_step_time():
    log = ("step 00001/00002 | loss 8.3 | lrm 1.000 | grad norm 0.4 | 600 ms | 679 tok/s | eta 0m01s\n"
           "step 00001 | val bpb 2.5000\n"
           "step 00002/00002 | loss 8.2 | lrm 0.500 | grad norm 1.7 | 400 ms | 955 tok/s | eta 0m00s\n"
           "step 00002 | val bpb 2.3067\n")
    assert bl.parse_log(log) == (2.3067, [600, 400])


def test_table_reports_each_variant_against_the_first():
    rows = [dict(name="a", flags=[], steps=10, tokens=40960, seconds=10.0, bpb=2.0),
            dict(name="b", flags=["--matrix-lr", "0.04"], steps=10, tokens=40960, seconds=20.0, bpb=1.9)]
    table = bl.format_table(rows)
    assert "| a | `(profile)` | 10 | 40,960 | 10 | 4,096 | 2.0000 | +0.0000 |" in table
    assert "| b | `--matrix-lr 0.04` | 10 | 40,960 | 20 | 2,048 | 1.9000 | -0.1000 |" in table


def test_tiny_run_trains_each_variant_for_the_token_budget_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    docs = random_word_docs()
    write_word_shards(tmp_path, docs)
    CharTokenizer.train_from_iterator(docs).save(str(tmp_path / "tokenizer"))
    tiny = "--depth 1 --max-seq-len 32 --device-batch-size 2 --buffer-docs 8"
    assert bl.main(["--base-dir", str(tmp_path), "--tokens", "192", "--eval-tokens", "64",
                    "--log", str(tmp_path / "log"),
                    "--variant", f"small: {tiny}", "--variant", f"hot: {tiny} --matrix-lr 0.05"]) is None
    out = capsys.readouterr().out
    assert "| small | `" in out and "| hot | `" in out and "| 3 | 192 |" in out   # 192 tokens = 3 steps of 2 x 32
    assert "--matrix-lr 0.05" in open(tmp_path / "log").read()
    assert not os.path.exists(tmp_path / "base_checkpoints" / bl.MODEL_TAG)   # each variant's checkpoints are removed


def test_failed_variant_stops_with_the_log_path(tmp_path):
    os.makedirs(tmp_path / "base_data")
    dataset.write_shard(str(tmp_path / "base_data" / dataset.shard_name(0)), ["a b c"] * 10, row_group_docs=5)
    CharTokenizer.train_from_iterator(["a b c"]).save(str(tmp_path / "tokenizer"))
    with pytest.raises(NanochatError, match="base_train failed .*full log"):
        bl.main(["--base-dir", str(tmp_path), "--tokens", "64", "--log", str(tmp_path / "log"),
                 "--variant", "bad: --total-batch-size 100"])


def test_seconds_budget_sets_the_steps_from_a_probe_run_of_the_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    docs = [f"word{i % 7} and word{i % 5} " * 4 for i in range(60)]
    write_word_shards(tmp_path, docs, shards=2)
    CharTokenizer.train_from_iterator(docs).save(str(tmp_path / "tokenizer"))
    bl.main(["--base-dir", str(tmp_path), "--seconds", "0.3", "--probe-steps", "3", "--eval-tokens", "64",
             "--log", str(tmp_path / "log"), "--variant", "tiny: --depth 1 --max-seq-len 32 --device-batch-size 2"])
    log = open(tmp_path / "log").read()
    runs = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(runs) == 2 and runs[0].endswith("--num-iterations 3")   # the probe, then the measured run
    steps = int(runs[1].rsplit(" ", 1)[1])
    out = capsys.readouterr().out
    assert "budget: 0.3 s of training" in out and "| tiny | `" in out and f"| {steps:,} | {steps * 64:,} |" in out
