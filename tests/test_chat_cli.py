"""
scripts.chat_cli: answers from a saved checkpoint (its tokenizer comes along), streams, takes
`clear`/`quit`, decodes with a bf16 weight copy when asked, and a missing checkpoint is a one-line
error. A base model (or any model with --raw) continues the text as given, exactly as GPT.generate
does greedily.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from nanochat.engine import Engine, StreamDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, char_tokenizer, tiny_gpt, save_tiny_checkpoint):
    base = tmp_path_factory.mktemp("base")
    model = tiny_gpt(char_tokenizer, sequence_len=128)
    save_tiny_checkpoint(base / "chatsft_checkpoints" / "tiny", 5, model, char_tokenizer)
    return base, model, char_tokenizer


def run_cli(base, *args, stdin=""):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def expected_answer(model, tokenizer, history, **engine_options):
    """What greedy decoding says after `history` (a list of user messages, each answered greedily)."""
    engine = Engine(model, tokenizer, **engine_options)
    sp = tokenizer.encode_special
    tokens, text = [tokenizer.get_bos_token_id()], None
    for message in history:
        tokens += [sp("<|user_start|>")] + tokenizer.encode(message) + [sp("<|user_end|>"), sp("<|assistant_start|>")]
        results, _ = engine.generate_batch(tokens, max_tokens=20, temperature=0.0)
        out = results[0][len(tokens):]
        decoder = StreamDecoder(tokenizer)
        text = "".join(decoder.push(t) for t in out) + decoder.flush()
        tokens += out + [engine.assistant_end]
    return text


def test_one_prompt_answers_from_the_checkpoint_and_exits(checkpoint):
    base, model, tokenizer = checkpoint
    result = run_cli(base, "-i", "sft", "-p", "the fox?", "-t", "0", "--max-tokens", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = expected_answer(model, tokenizer, ["the fox?"])
    assert result.stdout == expected + "\n"


def test_bf16_weights_answer_as_an_engine_with_a_bf16_weight_copy_does(checkpoint):
    base, model, tokenizer = checkpoint
    result = run_cli(base, "-i", "sft", "-p", "the fox?", "-t", "0", "--max-tokens", "20", "--device", "cpu",
                     "--weights-dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_answer(model, tokenizer, ["the fox?"], weights_dtype=torch.bfloat16) + "\n"
    assert "bfloat16 copy of the weights" in result.stderr  # the answer alone may equal fp32's on a tiny model


def test_interactive_session_keeps_history_clears_and_quits(checkpoint):
    base, model, tokenizer = checkpoint
    result = run_cli(base, "-i", "sft", "-g", "tiny", "-s", "5", "-t", "0", "--max-tokens", "20", "--device", "cpu",
                     stdin="hello\nthe dog\nclear\nthe dog\nquit\nnever answered\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == expected_answer(model, tokenizer, ["hello"])
    assert lines[1] == expected_answer(model, tokenizer, ["hello", "the dog"])  # answered with history
    assert lines[2] == "(new conversation)"
    assert lines[3] == expected_answer(model, tokenizer, ["the dog"])  # after clear: no history
    assert lines[4:] == [""]  # quit: nothing more was answered
    assert lines[1] != lines[3]  # the history really changed the answer (else the checks above prove little)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_cli(tmp_path, "-i", "rl", "-p", "hi", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no rl checkpoints")


def greedy_continuation(model, tokenizer, text, max_tokens):
    """GPT.generate's greedy continuation of BOS + text (the naive reference, no KV cache), up to
    the first id that ends a text, decoded."""
    bos = tokenizer.get_bos_token_id()
    ends = {bos, tokenizer.encode_special("<|assistant_end|>")}
    ids = list(itertools.takewhile(lambda t: t not in ends,
                                   model.generate([bos] + tokenizer.encode(text), max_tokens, temperature=0.0)))
    specials = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    assert ids and specials.isdisjoint(ids)  # plain text, so comparing decoded text compares every id
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, char_tokenizer, tiny_gpt, save_tiny_checkpoint):
    """One model saved as a base and as an sft checkpoint; its greedy continuations of "the cat"
    and "lazy" are plain text (random models often write special tokens)."""
    base = tmp_path_factory.mktemp("base")
    model = tiny_gpt(char_tokenizer)
    for stage in ("base", "chatsft"):
        save_tiny_checkpoint(base / f"{stage}_checkpoints" / "tiny", 1, model, char_tokenizer)
    return base, model, char_tokenizer


def test_a_base_model_continues_the_prompt_exactly_as_gpt_generate_does(base_checkpoint):
    base, model, tokenizer = base_checkpoint
    want = greedy_continuation(model, tokenizer, "the cat", 20)
    flags = ["-p", "the cat", "-t", "0", "--max-tokens", "20", "--device", "cpu"]
    result = run_cli(base, "-i", "base", *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout == want + "\n"
    raw = run_cli(base, "-i", "sft", "--raw", *flags)  # --raw does the same for any stage's model
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == want + "\n"


def test_raw_interactive_mode_continues_each_line_on_its_own(base_checkpoint):
    base, model, tokenizer = base_checkpoint
    result = run_cli(base, "-i", "base", "-t", "0", "--max-tokens", "20", "--device", "cpu",
                     stdin="the cat\nlazy\n\nquit\nnever continued\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == [greedy_continuation(model, tokenizer, "the cat", 20),
                                         greedy_continuation(model, tokenizer, "lazy", 20), ""]
