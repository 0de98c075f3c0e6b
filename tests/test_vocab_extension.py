"""Growing a trained model's vocabulary end to end on a tiny model: train with tokenizer V0, extend the
vocabulary by 81 tokens (a second language's tokens + new specials), grow the checkpoint, train on
with the old rows frozen, and check that the doctor tells a good setup from a mismatched one."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import WORDS, random_word_docs, write_word_shards
from nanochat import checkpoint_manager as cm
from nanochat import doctor, pretokenized
from nanochat.common import NanochatError
from nanochat.engine import Engine
from nanochat.tokenizer import RustBPETokenizer, load_tokenizer
from nanochat.vocab_extension import extend_tokenizer
from scripts import base_train, extend_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 81


VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight", "value_embeds.0.weight")  # one row per token id
GREEK_WORDS = "καλημέρα κόσμε γάτα σκύλος θάλασσα ήλιος βιβλίο σπίτι δρόμος φίλος νερό ψωμί".split()


def greek_docs(n, seed):
    return random_word_docs(GREEK_WORDS, n, seed, length=(5, 25))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocab_ext")
    old_env = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        # --- V0: an English BPE tokenizer and a base model trained a few steps on English shards (with a
        # value embedding: a third table of one row per token, which the extension and the freeze must follow)
        docs = random_word_docs(WORDS + ["house", "tree"])
        write_word_shards(base, docs)
        v0_tok = RustBPETokenizer.train_from_iterator(iter(docs), vocab_size=256 + 9 + 40)
        v0_tok.save(str(base / "tokenizer"))
        assert base_train.main(["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "2",
                                "--total-batch-size", "128", "--eval-tokens", "128", "--sample-every", "0",
                                "--device", "cpu", "--num-iterations", "3", "--model-tag", "v0",
                                "--value-embeds"]) == 0

        # --- extend: a Greek tokenizer's missing tokens, topped up with specials to exactly 81 new ids
        greek = RustBPETokenizer.train_from_iterator(iter(greek_docs(200, 1)), vocab_size=256 + 9 + 60)
        only_greek = extend_tokenizer(v0_tok, from_tokenizer=greek)
        n_lang = only_greek.get_vocab_size() - v0_tok.get_vocab_size()
        assert 0 < n_lang <= NEW_TOKENS
        specials = [f"<|tool_{i}|>" for i in range(NEW_TOKENS - n_lang)]
        ext_tok = extend_tokenizer(v0_tok, add_special=specials, from_tokenizer=greek)
        ext_dir = str(base / "tokenizer_ext")
        ext_tok.save(ext_dir)

        # --- grow the checkpoint, then mid-train it (old rows frozen by default)
        assert extend_checkpoint.main(["-i", "base", "-g", "v0", "--tokenizer-dir", ext_dir]) == 0
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "scripts.mid_train", "-g", "v0-ext", "--offline", "--device", "cpu",
                               "--num-iterations", "3", "--device-batch-size", "2", "--max-seq-len", "64",
                               "--eval-every", "0", "--eval-steps", "1", "--weight-decay", "0.1"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield base, v0_tok, ext_tok, ext_dir, n_lang, proc.stdout
    finally:
        if old_env is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old_env


def test_extension_appends_81_ids_and_renumbers_none(scenario):
    base, v0_tok, ext_tok, _, n_lang, _ = scenario
    v0 = v0_tok.get_vocab_size()
    assert ext_tok.get_vocab_size() == v0 + NEW_TOKENS
    assert ext_tok.parent_fingerprint == v0_tok.fingerprint and ext_tok.original_vocab_size == v0
    assert all(ext_tok.id_to_bytes(i) == v0_tok.id_to_bytes(i) for i in range(v0) if i not in v0_tok.special_tokens.values())
    greek = "καλημέρα κόσμε γάτα"
    ids = ext_tok.encode(greek)
    assert any(i >= v0 for i in ids) and ext_tok.decode(ids) == greek
    english = "the big red cat sat on the mat"
    assert ext_tok.encode(english) == v0_tok.encode(english)


def test_extended_checkpoint_loads_with_old_rows_copied_and_new_rows_initialised(scenario):
    _, v0_tok, ext_tok, _, _, _ = scenario
    v0 = v0_tok.get_vocab_size()
    old_model, _, _ = cm.load_model("base", "cpu", model_tag="v0")
    model, tok, meta = cm.load_model("base", "cpu", model_tag="v0-ext")
    assert tok.fingerprint == ext_tok.fingerprint and model.config.vocab_size == v0 + NEW_TOKENS
    assert meta["extended_from"]["original_vocab_size"] == v0
    for name in VOCAB_ROWS:
        old_w, new_w = old_model.state_dict()[name], model.state_dict()[name]
        assert torch.equal(new_w[:v0], old_w[:v0])
        # a new language token starts as the mean of the byte rows that spell it
        t = v0  # the first appended token comes from the Greek tokenizer
        byte_ids = [v0_tok.mergeable_ranks[bytes([b])] for b in ext_tok.id_to_bytes(t)]
        assert torch.allclose(new_w[t], old_w[byte_ids].mean(dim=0), atol=1e-6)


def test_training_with_freeze_keeps_old_rows_bit_identical_and_moves_new_rows(scenario):
    _, v0_tok, _, _, _, out = scenario
    v0 = v0_tok.get_vocab_size()
    grown, _, _ = cm.load_model("base", "cpu", model_tag="v0-ext")
    trained, _, _ = cm.load_model("mid", "cpu", model_tag="v0-ext")
    assert f"rows < {v0}" in out  # mid_train said what it froze
    for name in VOCAB_ROWS:
        assert torch.equal(trained.state_dict()[name][:v0], grown.state_dict()[name][:v0]), name
    new_rows = slice(v0, v0 + NEW_TOKENS)
    assert not torch.equal(trained.state_dict()["lm_head.weight"][new_rows], grown.state_dict()["lm_head.weight"][new_rows])
    # the blocks trained too (the freeze is only for the old vocabulary rows)
    assert not torch.equal(trained.state_dict()["transformer.h.0.mlp.c_fc.weight"],
                           grown.state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_generation_can_emit_the_new_tokens(scenario):
    _, v0_tok, _, _, _, _ = scenario
    v0 = v0_tok.get_vocab_size()
    model, tok, _ = cm.load_model("mid", "cpu", model_tag="v0-ext")
    engine = Engine(model, tok)
    prompt = tok.encode("καλημέρα", prepend="<|bos|>")
    results, _ = engine.generate_batch(prompt, num_samples=16, max_tokens=32, temperature=1.5, seed=0)
    emitted = {t for row in results for t in row[len(prompt):]}
    assert any(t >= v0 for t in emitted)


def test_a_checkpoint_whose_vocab_disagrees_with_its_tokenizer_fails_before_any_compute(scenario, monkeypatch):
    base, v0_tok, _, ext_dir, _, _ = scenario
    # swap the extended tokenizer into the *unextended* checkpoint: sizes disagree
    step_dir = base / "base_checkpoints" / "v0" / cm.step_dirname(3)
    broken = base / "base_checkpoints" / "broken"
    shutil.copytree(step_dir, broken / cm.step_dirname(3))
    shutil.rmtree(broken / cm.step_dirname(3) / "tokenizer")
    shutil.copytree(ext_dir, broken / cm.step_dirname(3) / "tokenizer")
    from nanochat.gpt import GPT
    monkeypatch.setattr(GPT, "forward", lambda *a, **k: pytest.fail("forward ran before the mismatch was caught"))
    with pytest.raises(NanochatError, match="fingerprint mismatch"):
        cm.load_model("base", "cpu", model_tag="broken")
    # and growing a checkpoint with a tokenizer that does not descend from its own is refused
    unrelated = RustBPETokenizer.train_from_iterator(iter(greek_docs(50, 2)), vocab_size=256 + 9 + 80)
    with pytest.raises(NanochatError, match="was not extended from"):
        extend_checkpoint.check_descends(v0_tok, unrelated, "checkpoint tokenizer", "unrelated tokenizer")


def test_doctor_flags_a_mismatched_setup_and_passes_a_good_one(scenario):
    base, v0_tok, _, ext_dir, _, _ = scenario
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=REPO)
    good = subprocess.run([sys.executable, "-m", "nanochat.doctor", "--tokenizer", ext_dir,
                           "--checkpoint", str(base / "mid_checkpoints" / "v0-ext"), "--freeze-until-index",
                           str(v0_tok.get_vocab_size())], cwd=REPO, env=env, capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "MISMATCH" not in good.stdout and "everything agrees" in good.stdout
    bad = subprocess.run([sys.executable, "-m", "nanochat.doctor", "--tokenizer", ext_dir,
                          "--checkpoint", str(base / "base_checkpoints" / "v0"), "--freeze-until-index", "100000"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    rows = {line.split()[0]: line for line in bad.stdout.splitlines() if "MISMATCH" in line}
    assert "scripts.extend_checkpoint" in bad.stdout  # it says what to do
    assert any(line.startswith("checkpoint vs tokenizer") for line in bad.stdout.splitlines() if "MISMATCH" in line)
    assert "freeze" in rows


def test_doctor_rejects_pretokenized_shards_of_another_tokenizer(scenario):
    base, v0_tok, _, ext_dir, _, _ = scenario
    ext = load_tokenizer(ext_dir)
    out_dir = pretokenized.pretokenized_dir(v0_tok.fingerprint)
    pretokenized.pretokenize(v0_tok, data_dir=str(base / "base_data"), out_dir=out_dir)
    checks = doctor.check_all(tokenizer_dir=ext_dir, pretok_dir=out_dir)
    row = [r for r in checks.rows if r[0] == "pre-tokenized shards"][0]
    assert row[1] == doctor.FAIL and v0_tok.fingerprint[:16] in row[2] and ext.fingerprint[:16] in row[2]
