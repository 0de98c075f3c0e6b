"""--resume means "continue that run": the run's own arguments come from its checkpoint; the horizon and
cadence flags may change (applied and logged); a flag that would silently change the run is refused unless
--override-args. Same rules for base_train and the post-training stages."""

import json
import os
import random
import shutil

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import dataset
from nanochat.common import ArgumentParser, NanochatError
from nanochat.tokenizer import CharTokenizer
from scripts import base_train, mid_train
from conftest import TINY_TRAIN_ARGS as TINY  # the shared tiny-run flags


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir with data, a char tokenizer and a base run 'r' (2 steps, saved at 1 and 2)."""
    base = tmp_path_factory.mktemp("resume")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        rng = random.Random(0)
        words = "the a cat dog sat on mat and ran far away big small red blue".split()
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(150)]
        os.makedirs(base / "base_data")
        for s in range(3):
            shard = str(base / "base_data" / dataset.shard_name(s))
            dataset.write_shard(shard, docs[s * 50:(s + 1) * 50], row_group_docs=10)
        CharTokenizer.train_from_iterator(docs).save(str(base / "tokenizer"))
        torch.set_num_threads(1)
        assert base_train.main(TINY + ["--num-iterations", "2", "--save-every", "1", "--eval-every", "0",
                                       "--model-tag", "r"]) == 0
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    return base


@pytest.fixture()
def base(trained, tmp_path, monkeypatch):
    copy = tmp_path / "base"
    shutil.copytree(trained, copy)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(copy))
    return copy


def final_meta(base, step, tag="r"):
    return json.loads((base / "base_checkpoints" / tag / cm.step_dirname(step) / "meta.json").read_text())


def test_flags_given_on_the_command_line_are_told_apart_from_defaults_even_when_equal_to_them():
    parser = ArgumentParser()
    parser.add_argument("--total-batch-size", type=int, default=524288)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--resume", action="store_true")
    args, explicit = cm.parse_args_noting_explicit(parser, ["--total-batch-size", "524288", "--resume"])
    assert vars(args) == {"total_batch_size": 524288, "depth": 20, "resume": True}
    assert explicit == {"total_batch_size", "resume"}


def test_a_flag_that_would_change_the_run_is_refused_and_names_both_values(base, monkeypatch):
    from nanochat.gpt import GPT
    monkeypatch.setattr(GPT, "forward", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(NanochatError) as e:
        base_train.main(["--resume", "--model-tag", "r", "--device", "cpu", "--total-batch-size", "524288",
                         "--max-seq-len", "64"])
    msg = str(e.value)
    assert "--total-batch-size 524288 (the run used 128)" in msg and "--max-seq-len 64 (the run used 32)" in msg
    assert "--override-args" in msg


def test_horizon_and_cadence_flags_are_applied_on_resume_and_logged(base, capsys):
    assert base_train.main(["--resume", "--model-tag", "r", "--device", "cpu", "--num-iterations", "3",
                            "--save-every", "3"]) == 0
    out = capsys.readouterr().out
    assert "--num-iterations 2 -> 3" in out and "--save-every 1 -> 3" in out
    meta = final_meta(base, 3)
    assert meta["train_args"]["num_iterations"] == 3 and meta["train_args"]["total_batch_size"] == 128
    assert [s for s, _ in meta["loop_state"]["loss_history"]] == [1, 2, 3]


def test_override_args_lets_a_flag_change_the_run_deliberately(base, capsys):
    assert base_train.main(["--resume", "--model-tag", "r", "--device", "cpu", "--num-iterations", "3",
                            "--total-batch-size", "256", "--override-args"]) == 0
    assert "--total-batch-size 128 -> 256" in capsys.readouterr().out
    assert final_meta(base, 3)["train_args"]["total_batch_size"] == 256


def test_resume_step_and_override_args_need_resume(base):
    with pytest.raises(NanochatError, match="only apply with --resume"):
        base_train.main(TINY + ["--resume-step", "1"])


def test_post_training_resume_takes_the_run_arguments_and_refuses_changes(base, capsys):
    # a mid run whose saved arguments are known: the base run's folder copied in as mid_checkpoints/r
    ckdir = base / "mid_checkpoints" / "r"
    shutil.copytree(base / "base_checkpoints" / "r", ckdir)
    saved = final_meta(base, 2)["train_args"]
    args = mid_train.parse_args(["--resume", "--num-iterations", "5"])
    assert args.device_batch_size == saved["device_batch_size"] == 2 and args.max_seq_len == 32
    assert args.num_iterations == 5 and args.resume_step == 2
    assert "--num-iterations 2 -> 5" in capsys.readouterr().out
    with pytest.raises(NanochatError, match=r"--device-batch-size 4 \(the run used 2\)"):
        mid_train.parse_args(["--resume", "--device-batch-size", "4"])
    assert mid_train.parse_args(["--resume", "--device-batch-size", "4", "--override-args"]).device_batch_size == 4
    assert mid_train.parse_args(["--resume", "--resume-step", "1"]).resume_step == 1


def test_resuming_a_run_that_does_not_exist_names_the_tag_and_what_to_do(base):
    with pytest.raises(NanochatError, match="no mid checkpoint tagged 'nope' in .*run without --resume first"):
        mid_train.parse_args(["--resume", "--output-tag", "nope"])
    with pytest.raises(NanochatError, match="no base checkpoint tag 'nope'"):
        base_train.main(["--resume", "--model-tag", "nope", "--device", "cpu"])
