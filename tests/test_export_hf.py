"""Exporting the default (nanochat) architecture to transformers' NanoChatForCausalLM: the exported model
computes our logits, greedy generate() continues a prompt as our Engine does, the chat template renders a
conversation to render_conversation's ids, and without transformers export_hf says how to install it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import NanochatError
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import RustBPETokenizer
from scripts.export_hf import export_model_to_hf, load_hf_state_dict, main

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NanoChatForCausalLM"):
    pytest.skip("this transformers has no NanoChat model type", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun, and the quick fox runs "
        "over the hill to the river. Numbers like 12, 345 and 6789 come and go. Hello world, hello nanochat; "
        "don't stop   believing.\tTabs\r\nand CRLF, émojis 🙂 too.\n\n")


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter([TEXT] * 20), 256 + 9 + 120)


def random_model(tok, seed=0, **overrides):
    """Random weights everywhere (nanochat's init zeroes the output projections, which would hide bugs).
    4 query heads sharing 2 key/value heads, and a rope theta and softcap that are not the defaults, so a
    setting that does not reach config.json shows up in the logits."""
    kwargs = dict(sequence_len=64, n_embd=64, n_head=4, n_kv_head=2, rope_theta=500.0, softcap=8.0)
    kwargs.update(overrides)
    cfg = config_from_depth(2, tok.get_vocab_size(), **kwargs)
    torch.manual_seed(seed)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.size(-1) ** 0.5)
    return model.eval()


def trained_model(tok, steps=60):
    """A model fitted for a few steps to TEXT, so it continues that text with meaningful greedy tokens."""
    model = random_model(tok, seed=3).train()
    ids = torch.tensor([tok.encode(TEXT, prepend="<|bos|>")[:65]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 1.0  # it has learned the text
    return model.eval()


def load_exported(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return model, transformers.PreTrainedTokenizerFast.from_pretrained(path)


def test_exported_default_model_is_NanoChatForCausalLM_with_our_logits_on_random_ids(tmp_path, tok):
    model = random_model(tok)
    out = export_model_to_hf(model, tok, tmp_path / "hf")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert config["vocab_size"] == tok.get_vocab_size()  # padding rows dropped
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    # generate() stops where our Engine stops
    assert generation["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
    hf, _ = load_exported(out)
    assert type(hf).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, tok.get_vocab_size(), (2, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4
    assert theirs.abs().max() <= 8.0 + 1e-5  # our soft-cap, not transformers' default of 15


def test_exported_trained_model_matches_our_logits_on_real_text_and_generates_the_same_greedy_tokens(tmp_path, tok):
    model = trained_model(tok)
    hf, hf_tok = load_exported(export_model_to_hf(model, tok, tmp_path / "hf"))
    text_ids = torch.tensor([tok.encode("The lazy dog sleeps in the sun, and the quick fox", prepend="<|bos|>")])
    with torch.no_grad():
        assert (model(text_ids) - hf(text_ids).logits).abs().max() <= 1e-4

    prompt = tok.encode("The quick brown fox", prepend="<|bos|>")
    assert hf_tok.encode("The quick brown fox", add_special_tokens=False) == prompt[1:]
    (ours,), _ = Engine(model, tok).generate_batch(prompt, max_tokens=20, temperature=0.0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0].tolist()
    stops = {tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")}
    if theirs[-1] in stops:  # transformers keeps the stop token; our Engine drops it
        theirs = theirs[:-1]
    assert len(ours) - len(prompt) >= 10  # a real continuation, not an immediate stop
    assert theirs == ours
    assert hf_tok.decode(theirs[len(prompt):]) == tok.decode(ours[len(prompt):])


CONVERSATION = {"messages": [
    {"role": "system", "content": "You are a quick fox."},
    {"role": "user", "content": "Hello world, what is 12 + 345?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me  compute: "},
        {"type": "python", "text": "12 + 345"},
        {"type": "python_output", "text": "357"},
        {"type": "text", "text": "\nIt is 357."},
    ]},
    {"role": "user", "content": "don't\n\nstop   believing"},
    {"role": "assistant", "content": "The lazy dog sleeps. 🙂"},
]}


def test_chat_template_gives_render_conversation_ids_for_a_multi_turn_conversation(tmp_path, tok):
    _, hf_tok = load_exported(export_model_to_hf(random_model(tok), tok, tmp_path / "hf"))
    ids, _ = tok.render_conversation(CONVERSATION)
    assert hf_tok.apply_chat_template(CONVERSATION["messages"], tokenize=True)["input_ids"] == ids
    # priming the assistant's reply, as chat completion does
    expected = tok.render_for_completion(CONVERSATION)
    primed = hf_tok.apply_chat_template(CONVERSATION["messages"][:-1], tokenize=True, add_generation_prompt=True)
    assert primed["input_ids"] == expected
    # without a system message
    no_system = {"messages": CONVERSATION["messages"][1:]}
    assert (hf_tok.apply_chat_template(no_system["messages"], tokenize=True)["input_ids"]
            == tok.render_conversation(no_system)[0])


def test_chat_template_refuses_roles_that_do_not_alternate(tmp_path, tok):
    _, hf_tok = load_exported(export_model_to_hf(random_model(tok), tok, tmp_path / "hf"))
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_weights_from_a_transformers_NanoChat_model_load_into_ours_with_equal_logits(tok):
    cfg = transformers.NanoChatConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        final_logit_softcapping=8.0, rms_norm_eps=1e-6, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.NanoChatForCausalLM(cfg).eval()
    ours = random_model(tok, seed=5)
    load_hf_state_dict(ours, hf.state_dict())
    idx = torch.randint(0, tok.get_vocab_size(), (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() <= 1e-4


def test_export_cli_turns_a_saved_default_checkpoint_into_a_loadable_hf_folder(tmp_path, tok):
    from nanochat.checkpoint_manager import save_checkpoint
    model = random_model(tok)
    ckpt_dir = str(tmp_path / "ckpt" / "d2")
    save_checkpoint(ckpt_dir, 5, model.state_dict(), None, {"model_config": model.config.to_dict()}, tok)
    out = tmp_path / "exported"
    main(["--checkpoint-dir", ckpt_dir, "--out-dir", str(out)])
    hf, _ = load_exported(out)
    idx = torch.randint(0, tok.get_vocab_size(), (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() <= 1e-4
    with pytest.raises(NanochatError, match="already exists"):
        main(["--checkpoint-dir", ckpt_dir, "--out-dir", str(out)])


def test_a_transformers_without_NanoChat_is_told_to_upgrade_and_nothing_is_written(tmp_path, tok, monkeypatch):
    import types
    import scripts.export_hf as export_hf
    old = types.SimpleNamespace(__version__="4.57.6", Qwen2Config=transformers.Qwen2Config)  # the last 4.x
    monkeypatch.setattr(export_hf, "import_transformers", lambda: old)
    with pytest.raises(NanochatError, match=r"transformers 4.57.6 has no NanoChat model type; upgrade it"):
        export_model_to_hf(random_model(tok), tok, tmp_path / "hf")
    assert os.listdir(tmp_path) == []  # no out dir, no temp dir left behind


def test_export_without_transformers_is_a_one_line_error_naming_the_hf_extra(tmp_path):
    # transformers made unimportable for the child process only
    code = ("import sys; sys.modules['transformers'] = None; from scripts.export_hf import main; "
            "from nanochat.common import run_main; run_main(main)")
    env = dict(os.environ, PYTHONPATH=REPO, NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    result = subprocess.run([sys.executable, "-c", code, "--source", "base", "--out-dir", str(tmp_path / "hf")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "transformers" in result.stderr and "pip install -e '.[hf]'" in result.stderr
    assert not (tmp_path / "hf").exists()
