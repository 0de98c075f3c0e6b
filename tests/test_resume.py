"""--resume means "continue that run": the run's own arguments come from its checkpoint; the horizon and
cadence flags may change (applied and logged); a flag that would silently change the run is refused unless
--override-args. Same rules for base_train and the post-training stages."""

import json
import shutil

import pytest

from nanochat import checkpoint_manager as cm
from nanochat.common import ArgumentParser, NanochatError
from scripts import base_train, mid_train
from conftest import TINY_TRAIN_ARGS as TINY, private_copy, tiny_base_run


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir with data, a char tokenizer and a base run 'r' (2 steps, saved at 1 and 2)."""
    return tiny_base_run(tmp_path_factory.mktemp("trained"), num_iterations=2, save_every=1)


@pytest.fixture()
def base(trained, tmp_path, monkeypatch):
    """A private copy of the trained base dir, as NANOCHAT_BASE_DIR."""
    return private_copy(trained, tmp_path, monkeypatch)


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
