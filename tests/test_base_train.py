"""base_train end to end on a tiny model (CPU): checkpoints, exact resume, kill -9 during a save,
the seed scenario's mismatches, and the non-finite stop."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import dataset, pretokenized
from nanochat.common import NanochatError
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import AdamW, Muon
from nanochat.tokenizer import CharTokenizer
from scripts import base_train
from conftest import TINY_TRAIN_ARGS as TINY  # the shared tiny-run flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def base(tmp_path, monkeypatch):
    """<base> with 3 small parquet shards (2 train, 1 val) and a char tokenizer."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    rng = random.Random(0)
    words = "the a cat dog sat on mat and ran far away big small red blue".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(150)]
    os.makedirs(tmp_path / "base_data")
    for s in range(3):
        dataset.write_shard(str(tmp_path / "base_data" / dataset.shard_name(s)), docs[s * 50:(s + 1) * 50], row_group_docs=10)
    CharTokenizer.train_from_iterator(docs).save(str(tmp_path / "tokenizer"))
    return tmp_path


def loss_history(base, tag, step):
    meta = json.load(open(base / "base_checkpoints" / tag / cm.step_dirname(step) / "meta.json"))
    return meta["loop_state"]["loss_history"]


def test_three_steps_on_tiny_data_write_a_loadable_checkpoint(base):
    assert base_train.main(TINY + ["--num-iterations", "3", "--model-tag", "smoke"]) == 0
    model, tok, meta = cm.load_model("base", device="cpu", model_tag="smoke")
    assert meta["step"] == 3 and len(meta["loop_state"]["loss_history"]) == 3
    assert model.config.vocab_size == tok.get_vocab_size()
    assert meta["metrics"]["val_bpb"] > 0 and meta["tokenizer_fingerprint"] == tok.fingerprint
    logits = model(torch.tensor([tok.encode("the cat", prepend="<|bos|>")]))
    assert torch.isfinite(logits).all()
    # the report card's validation curve is plotted against tokens seen (3 steps x 128 tokens)
    val_curve = json.load(open(base / "report" / "series" / "val-bpb.json"))
    assert val_curve["x_label"] == "tokens" and val_curve["steps"][-1] == 3 * 128


def test_resume_with_only_the_tag_continues_the_run_with_its_own_arguments_bit_exactly(base, capsys):
    args = TINY + ["--num-iterations", "6", "--save-every", "3", "--eval-every", "0", "--model-tag", "r"]
    base_train.main(args)
    straight = loss_history(base, "r", 6)
    shutil.rmtree(base / "base_checkpoints" / "r" / cm.step_dirname(6))  # as if stopped after the save of step 3
    capsys.readouterr()
    base_train.main(["--resume", "--model-tag", "r", "--device", "cpu"])  # batch, shape, schedule: the run's own
    out = capsys.readouterr().out
    assert "128 tokens/step" in out and "step 00006/00006" in out
    resumed = loss_history(base, "r", 6)
    assert resumed == straight  # every loss bit-exact, the resumed steps 4..6 included


# base_train in a subprocess whose save of step 4 stops (and says so) once its files are written into the temp
# directory, just before the COMPLETE marker: the moment a kill -9 does the most harm.
STALL_IN_SAVE_OF_STEP_4 = """
import sys, time
from nanochat import checkpoint_manager as cm
from nanochat.common import run_main
from scripts import base_train
real_fsync_tree = cm._fsync_tree
def stalling_fsync_tree(path):
    real_fsync_tree(path)
    if ".step_000004.tmp" in path:
        print("stalled inside the save of step 4", flush=True)
        time.sleep(120)
cm._fsync_tree = stalling_fsync_tree
run_main(base_train.main, sys.argv[1:])
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_and_resume_uses_it(base, capsys):
    args = TINY + ["--num-iterations", "4", "--save-every", "2", "--eval-every", "0", "--model-tag", "k"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", STALL_IN_SAVE_OF_STEP_4] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    try:
        for line in proc.stdout:
            if "stalled inside the save" in line or time.time() > deadline:
                break
        assert "stalled inside the save" in line, "the run never reached the save of step 4"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ckdir = base / "base_checkpoints" / "k"
    assert cm.list_complete_steps(str(ckdir)) == [2]
    assert any(n.startswith(".step_000004.tmp") for n in os.listdir(ckdir))  # the killed save's leftovers
    _, _, meta = cm.load_model("base", device="cpu", model_tag="k")
    assert meta["step"] == 2
    assert base_train.main(args + ["--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert cm.list_complete_steps(str(ckdir)) == [2, 4]
    assert not any(n.startswith(".step_") for n in os.listdir(ckdir))


def forbid_forward(monkeypatch):
    calls = []

    def no_forward(self, *a, **k):
        calls.append(1)
        raise AssertionError("a forward pass ran before the mismatch was reported")
    monkeypatch.setattr(GPT, "forward", no_forward)
    return calls


def test_seed_scenario_887_vocab_model_with_2535_tokenizer_and_foreign_data_fails_before_any_forward(base, monkeypatch):
    # the checkpoint: a model for tokenizer A (887 ids)
    tok_a = CharTokenizer.train_from_iterator(["".join(chr(0x4E00 + i) for i in range(877))])
    assert tok_a.get_vocab_size() == 887
    model = GPT(config_from_depth(1, 887, sequence_len=32))
    model.init_weights()
    optimizer_state = [torch.optim.AdamW(model.parameters()).state_dict()]
    cm.save_checkpoint(str(base / "base_checkpoints" / "d1"), 5, model.state_dict(), optimizer_state,
                       {"model_config": model.config.to_dict(), "arch": "nanochat"}, tok_a)
    # the tokenizer in use: B (2535 ids)
    tok_b = CharTokenizer.train_from_iterator(["".join(chr(0x3400 + i) for i in range(2525))])
    assert tok_b.get_vocab_size() == 2535
    shutil.rmtree(base / "tokenizer")
    tok_b.save(str(base / "tokenizer"))
    # pre-tokenized data from a third tokenizer C
    tok_c = CharTokenizer.train_from_iterator(dataset.iter_documents("train"))
    pretok = pretokenized.pretokenize(tok_c, out_dir=str(base / "pretok_c"))
    calls = forbid_forward(monkeypatch)
    with pytest.raises(NanochatError) as e:
        base_train.main(TINY + ["--num-iterations", "2", "--resume", "--data", "pretokenized", "--pretok-dir", pretok])
    msg = str(e.value)
    assert "887" in msg and "2535" in msg
    for tok in (tok_a, tok_b, tok_c):
        assert tok.fingerprint[:16] in msg
    assert not calls
    # and without the checkpoint, the foreign data alone is refused the same way
    with pytest.raises(NanochatError) as e:
        base_train.main(TINY + ["--num-iterations", "2", "--data", "pretokenized", "--pretok-dir", pretok])
    assert tok_c.fingerprint[:16] in str(e.value) and tok_b.fingerprint[:16] in str(e.value)
    assert not calls


def test_non_finite_loss_stops_the_run_before_the_optimizer_update(base, monkeypatch):
    real_forward = GPT.forward
    micro_steps = []

    def nan_from_second_step(self, idx, targets=None, **k):
        out = real_forward(self, idx, targets, **k)
        if targets is not None and self.training:
            micro_steps.append(1)
            if len(micro_steps) > 2:  # 2 micro-batches per step: the second step goes bad
                return out * float("nan")
        return out
    monkeypatch.setattr(GPT, "forward", nan_from_second_step)
    updates = []
    for cls in (AdamW, Muon):
        real_step = cls.step
        monkeypatch.setattr(cls, "step", lambda self, _s=real_step: (updates.append(type(self).__name__), _s(self)))
    with pytest.raises(NanochatError, match="non-finite loss") as e:
        base_train.main(TINY + ["--num-iterations", "5", "--save-every", "1", "--eval-every", "0", "--model-tag", "nan"])
    assert sorted(updates) == ["AdamW", "Muon"]  # only the first, finite step updated the weights
    assert "last good checkpoint is step 1" in str(e.value)
    assert cm.list_complete_steps(str(base / "base_checkpoints" / "nan")) == [1]


def test_total_batch_size_that_does_not_divide_is_a_clear_error(base):
    with pytest.raises(NanochatError, match="not a multiple"):
        base_train.main(TINY + ["--total-batch-size", "100"])


def test_bits_per_byte_counts_only_text_tokens_and_converts_nats_to_bits():
    from nanochat.loss_eval import evaluate_bpb

    class ConstantLoss(torch.nn.Module):
        def forward(self, x, y, loss_reduction="mean"):
            return torch.full(y.shape, 2.0)  # 2 nats for every target

    token_bytes = torch.tensor([0, 1, 3])  # id 0 is a special token (no bytes)
    y = torch.tensor([[0, 1, 2, 2], [1, -1, 0, 2]])
    bpb = evaluate_bpb(ConstantLoss(), iter([(y, y)]), 1, token_bytes)
    counted = sum(1 for t in y.flatten().tolist() if t >= 0 and token_bytes[t] > 0)
    total_bytes = sum(int(token_bytes[t]) for t in y.flatten().tolist() if t >= 0)
    assert bpb == pytest.approx(2.0 * counted / (math.log(2) * total_bytes))
