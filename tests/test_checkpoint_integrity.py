"""Checkpoint integrity: every kind of damaged file is one line naming that file, in every command that
loads it (base_train --resume as the user runs it, inference, a post-training --resume, export, doctor);
a bad newest step lists the steps that pass; incomplete steps are reported; doctor with no flags fails on
a checkpoint/tokenizer mismatch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanochat import checkpoint_manager as cm
from nanochat import doctor
from nanochat.common import NanochatError
from nanochat.tokenizer import CharTokenizer
from scripts import base_train, chat_cli, export_hf
from conftest import private_copy, tiny_base_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir with data, a char tokenizer and a base run 'r' saved at steps 2 and 4 (built once)."""
    return tiny_base_run(tmp_path_factory.mktemp("trained"), num_iterations=4, save_every=2)


@pytest.fixture()
def base(trained, tmp_path, monkeypatch):
    """A private copy of the trained base dir, as NANOCHAT_BASE_DIR."""
    return private_copy(trained, tmp_path, monkeypatch)


def step_dir(base, step, stage="base_checkpoints", tag="r"):
    return base / stage / tag / cm.step_dirname(step)


# --- the damage, each applied to one file of a step directory; returns the file the error must name

def truncate_weights(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def delete_weights(d):
    (d / "model.safetensors").unlink()
    return d / "model.safetensors"


def flip_4k_of_weights(d):
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # well past the JSON header: the file stays readable, only values change
    data[middle:middle + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    return path


def reshape_weights(d):
    path = d / "model.safetensors"
    state = load_file(str(path))
    name = next(k for k in state if k.endswith("c_fc.weight"))
    state[name] = torch.zeros(state[name].shape[0] // 2, state[name].shape[1])
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def truncate_optimizer(d):
    path = d / "optim_rank0.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return path


def corrupt_meta(d):
    path = d / "meta.json"
    path.write_text(path.read_text()[:-40])
    return path


def edit_meta(d):
    """Valid JSON, different content: only the checksum in COMPLETE can tell."""
    path = d / "meta.json"
    meta = json.loads(path.read_text())
    meta["train_args"]["matrix_lr"] = 0.5
    path.write_text(json.dumps(meta))
    return path


WEIGHT_DAMAGE = [truncate_weights, delete_weights, flip_4k_of_weights, reshape_weights]
ALL_DAMAGE = WEIGHT_DAMAGE + [truncate_optimizer, corrupt_meta, edit_meta]


def run_module(base, module, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_naming(message, path):
    assert "\n" not in message.strip() and str(path) in message, message


@pytest.mark.parametrize("damage", ALL_DAMAGE, ids=lambda f: f.__name__)
def test_base_train_resume_names_the_damaged_file_in_one_line_and_lists_the_good_steps(base, damage):
    bad = damage(step_dir(base, 4))
    proc = run_module(base, "scripts.base_train", "--resume", "--model-tag", "r", "--device", "cpu")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(bad) in last, proc.stderr
    assert "steps that pass the checks: 2 (pick one with --resume-step N)" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ALL_DAMAGE, ids=lambda f: f.__name__)
def test_every_loader_names_the_damaged_file(base, damage, tmp_path, capsys):
    # a post-training stage resuming (mid/sft/rl share start_or_resume): the run copied in as a mid checkpoint
    shutil.copytree(base / "base_checkpoints" / "r", base / "mid_checkpoints" / "r")
    bad_mid = damage(step_dir(base, 4, "mid_checkpoints"))
    with pytest.raises(NanochatError) as e:
        cm.start_or_resume("mid", "base", "cpu", resume=True, model_tag="r")
    assert_one_line_naming(str(e.value), bad_mid)
    assert "steps that pass the checks: 2" in str(e.value)
    # doctor with no flags
    assert doctor.main([]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mid checkpoint ")]
    assert "MISMATCH" in rows[0] and str(bad_mid) in rows[0]
    if damage is truncate_optimizer:
        return  # inference and export do not read the optimizer state
    bad = damage(step_dir(base, 4))
    # inference (chat_cli, chat_web, chat_eval and base_eval all load through load_model)
    with pytest.raises(NanochatError) as e:
        chat_cli.main(["-i", "base", "-g", "r", "-p", "hi", "--device", "cpu"])
    assert_one_line_naming(str(e.value), bad)
    # a post-training stage starting from it
    with pytest.raises(NanochatError) as e:
        cm.start_or_resume("mid", "base", "cpu", model_tag="r")
    assert_one_line_naming(str(e.value), bad)
    assert "(pick one with -s/--step N)" in str(e.value)
    # export
    with pytest.raises(NanochatError) as e:
        export_hf.main(["--source", "base", "--model-tag", "r", "--out-dir", str(tmp_path / "hf")])
    assert_one_line_naming(str(e.value), bad)


def test_base_train_resumes_from_a_chosen_good_step_when_the_newest_is_bad(base):
    flip_4k_of_weights(step_dir(base, 4))
    assert base_train.main(["--resume", "--model-tag", "r", "--device", "cpu", "--resume-step", "2",
                            "--num-iterations", "3", "--keep-last", "0"]) == 0
    assert cm.list_complete_steps(str(base / "base_checkpoints" / "r")) == [2, 3, 4]


def test_checksum_verification_can_be_switched_off_for_very_large_checkpoints(base, monkeypatch, capsys):
    # 4 KB of zeros: finite weights that only the checksum can tell from the saved ones (0xFF would be NaNs,
    # which the run itself would stop on)
    path = step_dir(base, 4) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(NanochatError, match="sha256 differs"):
        cm.load_model("base", "cpu", model_tag="r")
    assert doctor.main(["--no-verify"]) == 0
    assert "checksums not verified" in capsys.readouterr().out
    assert base_train.main(["--resume", "--model-tag", "r", "--device", "cpu", "--no-verify",
                            "--num-iterations", "5"]) == 0
    monkeypatch.setenv(cm.VERIFY_ENV, "0")
    _, _, meta = cm.load_model("base", "cpu", model_tag="r")
    assert meta["step"] == 5


def test_checkpoints_saved_before_checksums_still_load_and_say_so_once(base, capsys):
    d = step_dir(base, 4)
    meta = json.loads((d / "meta.json").read_text())
    del meta["checksums"]
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "COMPLETE").write_text("step 4\n")  # the old marker held no checksum
    for _ in range(2):
        _, _, meta = cm.load_model("base", "cpu", model_tag="r")
        assert meta["step"] == 4
    assert capsys.readouterr().err.count("saved before checkpoints recorded checksums") == 1


def test_a_step_without_complete_is_reported_by_loaders_resume_and_doctor(base, capsys):
    (step_dir(base, 4) / "COMPLETE").unlink()
    incomplete = str(step_dir(base, 4))
    # a loader falls back to step 2, with a warning line naming the incomplete step
    _, _, meta = cm.load_model("base", "cpu", model_tag="r")
    assert meta["step"] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and incomplete in err and "using step 2" in err
    # asking for it is an error naming it
    proc = run_module(base, "scripts.base_train", "--resume", "--model-tag", "r", "--device", "cpu",
                      "--resume-step", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert incomplete in proc.stderr.strip().splitlines()[-1] and "no COMPLETE marker" in proc.stderr
    # doctor lists it, and refuses it when asked about it by path
    doctor.main([])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("incomplete steps")][0]
    assert "warn" in row and incomplete in row
    assert doctor.main(["--checkpoint", incomplete]) == 1
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint ")][0]
    assert "MISMATCH" in row and "no COMPLETE marker" in row and incomplete in row
    assert doctor.main(["--checkpoint", str(step_dir(base, 2))]) == 0


def test_doctor_without_flags_fails_when_the_tokenizer_is_not_the_one_the_newest_checkpoint_used(base, capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "everything agrees" in out and "checksums verified" in out, out
    # a retrained tokenizer (as tok_train --overwrite would leave it)
    shutil.rmtree(base / "tokenizer")
    retrained = CharTokenizer.train_from_iterator(["the cat sat on the mat, quickly!"])
    retrained.save(str(base / "tokenizer"))
    bad = run_module(base, "nanochat.doctor")
    assert bad.returncode == 1
    row = [line for line in bad.stdout.splitlines() if line.startswith("base checkpoint vs tokenizer")][0]
    assert "MISMATCH" in row and retrained.fingerprint[:16] in row and "everything agrees" not in bad.stdout


def test_chat_cli_run_as_a_user_prints_one_line_naming_the_damaged_weights(base):
    bad = flip_4k_of_weights(step_dir(base, 4))
    proc = run_module(base, "scripts.chat_cli", "-i", "base", "-g", "r", "-p", "hi", "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "pick one with --step N" in lines[0], proc.stderr


def test_a_truncated_optimizer_state_is_named_even_with_checksums_off(base, monkeypatch):
    bad = truncate_optimizer(step_dir(base, 4))
    monkeypatch.setenv(cm.VERIFY_ENV, "0")
    with pytest.raises(NanochatError) as e:
        base_train.main(["--resume", "--model-tag", "r", "--device", "cpu"])
    assert_one_line_naming(str(e.value), bad)
    assert "truncated or corrupt" in str(e.value) and "steps that pass the checks: 2" in str(e.value)
