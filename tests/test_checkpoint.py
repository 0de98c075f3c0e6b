"""Checkpoints: self-contained, atomic, pruned, and validated before anything is built."""

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanochat import checkpoint_manager as cm
from nanochat.common import NanochatError
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog 0123456789"


@pytest.fixture()
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def tiny(tok, arch="nanochat", **kw):
    torch.manual_seed(0)
    model = GPT(config_from_depth(1, tok.get_vocab_size(), arch=arch, sequence_len=16, n_embd=32, n_head=2, **kw))
    model.init_weights()
    return model


def save(model, tok, ckdir, step, keep_last=2, **meta):
    meta = {"model_config": model.config.to_dict(), "arch": model.config.arch, "train_args": {}, "metrics": {}, **meta}
    opt = torch.optim.AdamW(model.parameters())
    return cm.save_checkpoint(str(ckdir), step, model.state_dict(), [opt.state_dict()], meta, tok, keep_last=keep_last)


def test_saved_checkpoint_loads_back_with_identical_weights_and_tokenizer(base):
    tok = CharTokenizer.train_from_iterator([TEXT])
    model = tiny(tok)
    ckdir = base / "base_checkpoints" / "d1"
    step_dir = save(model, tok, ckdir, 5)
    assert sorted(os.listdir(step_dir)) == ["COMPLETE", "meta.json", "model.safetensors", "optim_rank0.pt", "tokenizer"]
    loaded, tok2, meta = cm.load_model("base", device="cpu", phase="eval")
    assert tok2.fingerprint == tok.fingerprint and meta["step"] == 5 and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    idx = torch.tensor([tok.encode(TEXT[:12])])
    assert torch.equal(model.eval()(idx), loaded(idx))


def test_tied_embeddings_are_stored_once_and_stay_tied_after_loading(base):
    tok = CharTokenizer.train_from_iterator([TEXT])
    model = tiny(tok, arch="qwen2", tie_embeddings=True)
    ckdir = base / "base_checkpoints" / "q"
    step_dir = save(model, tok, ckdir, 1)
    from safetensors import safe_open
    with safe_open(os.path.join(step_dir, "model.safetensors"), "pt") as f:
        assert len([k for k in f.keys() if k in ("lm_head.weight", "transformer.wte.weight")]) == 1
    loaded, _, _ = cm.build_model(str(ckdir), 1, "cpu")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_bf16_weights_are_loaded_as_fp32_on_cpu(base):
    tok = CharTokenizer.train_from_iterator([TEXT])
    model = tiny(tok)
    ckdir = base / "base_checkpoints" / "d1"
    meta = {"model_config": model.config.to_dict()}
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    cm.save_checkpoint(str(ckdir), 3, bf16, None, meta, tok)
    state, _, _ = cm.load_checkpoint(str(ckdir), 3, "cpu")
    assert all(v.dtype == torch.float32 for v in state.values())
    loaded, _, _ = cm.build_model(str(ckdir), 3, "cpu")
    assert loaded.transformer.wte.weight.dtype == torch.float32


def test_keep_last_prunes_older_steps_and_readers_ignore_incomplete_ones(base):
    tok = CharTokenizer.train_from_iterator([TEXT])
    model = tiny(tok)
    ckdir = base / "ck"
    for step in (1, 2, 3):
        save(model, tok, ckdir, step, keep_last=2)
    assert cm.list_complete_steps(str(ckdir)) == [2, 3]
    # a crashed save: a temp dir and a step dir without the COMPLETE marker
    (ckdir / ".step_000009.tmp-123").mkdir()
    (ckdir / "step_000010").mkdir()
    (ckdir / "step_000010" / "model.safetensors").write_bytes(b"partial")
    assert cm.find_last_step(str(ckdir)) == 3
    with pytest.raises(NanochatError, match="incomplete"):
        cm.build_model(str(ckdir), 10, "cpu")
    save(model, tok, ckdir, 4, keep_last=2)
    assert cm.list_complete_steps(str(ckdir)) == [3, 4]
    assert not (ckdir / ".step_000009.tmp-123").exists()


def test_keep_last_below_two_is_refused(base):
    tok = CharTokenizer.train_from_iterator([TEXT])
    with pytest.raises(NanochatError, match="keep at least 2"):
        save(tiny(tok), tok, base / "ck", 1, keep_last=1)


def test_missing_checkpoints_name_the_stage_to_run(base):
    with pytest.raises(NanochatError, match="scripts.base_train"):
        cm.load_model("base", device="cpu")
    with pytest.raises(NanochatError, match="scripts.chat_sft"):
        cm.load_model("sft", device="cpu")


def forbid_building(monkeypatch):
    """Any attempt to materialise or run a real model fails the test. The callers edit a saved checkpoint by
    hand, so checksum verification is switched off to reach the deeper check they are about."""
    monkeypatch.setenv(cm.VERIFY_ENV, "0")
    def boom(*a, **k):
        raise AssertionError("a model was built or run before validation finished")
    monkeypatch.setattr(GPT, "init_weights", boom)
    monkeypatch.setattr(GPT, "forward", boom)


def test_vocab_size_mismatch_is_reported_with_both_sizes_before_building(base, monkeypatch):
    tok = CharTokenizer.train_from_iterator([TEXT])
    model = tiny(tok)
    ckdir = base / "ck"
    step_dir = save(model, tok, ckdir, 1)
    meta = json.load(open(os.path.join(step_dir, "meta.json")))
    meta["model_config"]["vocab_size"] = 887
    json.dump(meta, open(os.path.join(step_dir, "meta.json"), "w"))
    forbid_building(monkeypatch)
    with pytest.raises(NanochatError) as e:
        cm.build_model(str(ckdir), 1, "cpu")
    assert "887" in str(e.value) and str(tok.get_vocab_size()) in str(e.value)


def test_tokenizer_fingerprint_mismatch_names_both_fingerprints(base, monkeypatch):
    tok = CharTokenizer.train_from_iterator([TEXT])
    other = CharTokenizer.train_from_iterator([TEXT + "!"])
    ckdir = base / "ck"
    step_dir = save(tiny(tok), tok, ckdir, 1)
    other.save(os.path.join(step_dir, "tokenizer"))  # someone swapped the tokenizer copy
    forbid_building(monkeypatch)
    with pytest.raises(NanochatError) as e:
        cm.build_model(str(ckdir), 1, "cpu")
    assert tok.fingerprint[:16] in str(e.value) and other.fingerprint[:16] in str(e.value)


def test_tensor_shape_mismatch_names_the_tensor_and_both_shapes(base, monkeypatch):
    tok = CharTokenizer.train_from_iterator([TEXT])
    model = tiny(tok)
    ckdir = base / "ck"
    step_dir = save(model, tok, ckdir, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(64, 32)
    save_file(state, os.path.join(step_dir, "model.safetensors"))
    forbid_building(monkeypatch)
    with pytest.raises(NanochatError) as e:
        cm.build_model(str(ckdir), 1, "cpu")
    assert "transformer.h.0.mlp.c_fc.weight" in str(e.value) and "[64, 32]" in str(e.value) and "[128, 32]" in str(e.value)


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(cm.capture_rng_state()))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    cm.restore_rng_state(state)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])
