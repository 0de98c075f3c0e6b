"""tok_train protects what depends on it: it does not replace a tokenizer that checkpoints were trained with
(unless --overwrite), and it does not import a lossy Hugging Face tokenizer (unless --allow-lossy)."""

import os
import subprocess
import sys

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import CharTokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["the cat sat on the mat", "a dog ran far away"]


def run_tok_train(base, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.tok_train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def write_hf_tokenizer(path, lossy):
    """A small tokenizer.json: a byte-level BPE (gives back any text) or a word-level one with [UNK]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if lossy:
        tok = Tokenizer(models.WordLevel({"the": 0, "cat": 1, "sat": 2, "[UNK]": 3}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))
    return str(path)


def test_tok_train_refuses_to_replace_a_tokenizer_checkpoints_were_trained_with(tmp_path):
    tok = CharTokenizer.train_from_iterator(CORPUS)
    tok.save(str(tmp_path / "tokenizer"))
    model = GPT(config_from_depth(1, tok.get_vocab_size(), sequence_len=16, n_embd=32, n_head=2))
    model.init_weights()
    cm.save_checkpoint(str(tmp_path / "base_checkpoints" / "d1"), 7, model.state_dict(), None,
                       {"model_config": model.config.to_dict()}, tok)
    hf = write_hf_tokenizer(tmp_path / "hf.json", lossy=False)
    refused = run_tok_train(tmp_path, "--tokenizer", f"hf:{hf}")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert os.path.join("base_checkpoints", "d1", "step_000007") in refused.stderr and "--overwrite" in refused.stderr
    assert load_tokenizer(tmp_path / "tokenizer").fingerprint == tok.fingerprint  # untouched
    replaced = run_tok_train(tmp_path, "--tokenizer", f"hf:{hf}", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert load_tokenizer(tmp_path / "tokenizer").kind == "hf"


def test_a_lossy_hugging_face_tokenizer_needs_allow_lossy(tmp_path):
    hf = write_hf_tokenizer(tmp_path / "unk.json", lossy=True)
    refused = run_tok_train(tmp_path, "--tokenizer", f"hf:{hf}")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "lossy" in refused.stderr and "--allow-lossy" in refused.stderr
    assert "decodes back as '[UNK]" in refused.stderr
    assert not os.path.exists(tmp_path / "tokenizer")
    accepted = run_tok_train(tmp_path, "--tokenizer", f"hf:{hf}", "--allow-lossy")
    assert accepted.returncode == 0, accepted.stderr
    assert "lossy" in accepted.stdout and load_tokenizer(tmp_path / "tokenizer").kind == "hf"
