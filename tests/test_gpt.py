"""The GPT model: sizing and validation, padded vocab, loss, KV-cache protocol, naive generate,
optimizer groups, the optional value embeddings and smear, exact agreement of the qwen2 block with transformers' Qwen2ForCausalLM, and
the Hugging Face export."""

import json
import os

import pytest
import torch

from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig, config_from_depth, heads_for_width, value_embed_layers

EXTRAS = dict(value_embeds=True, smear=True)


def tiny(arch="nanochat", vocab_size=300, seed=0, **overrides):
    overrides.setdefault("sequence_len", 64)
    cfg = config_from_depth(2, vocab_size, arch=arch, **overrides)
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    return model


def randomize_(model, seed=1):
    """Random weights everywhere (init zeroes the output projections, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class ReferenceKVCache:
    """The smallest cache that follows the protocol engine.py's KVCache implements."""

    def __init__(self, n_layer):
        self.n_layer, self.pos = n_layer, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.prev_embed = None  # a smear model keeps the last position's embedding here

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        if layer == self.n_layer - 1:
            self.pos += k.size(2)
        return self.k[layer], self.v[layer]


# -----------------------------------------------------------------------------
# Sizing and validation

def test_config_from_depth_follows_width_64_per_layer_and_128_per_head():
    cfg = config_from_depth(20, 65536)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (20, 1280, 10, 10, 128)
    cfg = config_from_depth(4, 8192)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (256, 2, 128)
    for depth in range(1, 40):
        width = 64 * depth
        n_head = heads_for_width(width)
        assert width % n_head == 0 and (width // n_head) % 2 == 0 and n_head >= -(-width // 128)


def test_config_overrides_apply_and_arch_defaults_resolve():
    cfg = config_from_depth(4, 1000, n_head=4, n_kv_head=2, sequence_len=128)
    assert (cfg.n_head, cfg.n_kv_head, cfg.sequence_len, cfg.softcap, cfg.rope_theta) == (4, 2, 128, 15.0, 10000.0)
    q = config_from_depth(4, 1000, arch="qwen2")
    assert (q.rope_theta, q.rms_eps, q.softcap) == (1e6, 1e-6, 0.0)
    assert GPTConfig.from_dict(q.to_dict()) == q


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_head=3), "not divisible"),
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(arch="llama"), "unknown arch"),
    (dict(tie_embeddings=True), "tied embeddings"),
    (dict(arch="qwen2", value_embeds=True), "value_embeds is only supported with --arch nanochat"),
    (dict(arch="qwen2", smear=True), "smear is only supported with --arch nanochat"),
    (dict(smear=1), "smear must be true or false"),
])
def test_invalid_config_raises_a_clear_error(kwargs, message):
    base = dict(sequence_len=32, vocab_size=100, n_layer=1, n_head=2, n_embd=64)
    base.update(kwargs)
    with pytest.raises(NanochatError, match=message):
        GPTConfig(**base)


def test_vocab_is_padded_for_the_head_but_logits_cover_only_the_tokenizer_vocab():
    model = tiny(vocab_size=300)
    assert model.config.padded_vocab_size == 320
    assert model.lm_head.weight.shape[0] == 320 and model.transformer.wte.weight.shape[0] == 320
    logits = model(torch.randint(0, 300, (2, 10)))
    assert logits.shape == (2, 10, 300) and logits.dtype == torch.float32


def test_nanochat_init_zeroes_output_projections_and_has_no_biases():
    model = tiny()
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


def test_softcap_bounds_nanochat_logits():
    model = randomize_(tiny())
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    logits = model(torch.randint(0, 300, (1, 8)))
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


# -----------------------------------------------------------------------------
# Loss

def test_loss_ignores_minus_one_targets_and_reductions_agree():
    model = randomize_(tiny())
    idx = torch.randint(0, 300, (2, 12))
    targets = torch.randint(0, 300, (2, 12))
    targets[0, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 12) and (per_token[0, :5] == 0).all()
    valid = targets != -1
    assert torch.allclose(model(idx, targets, loss_reduction="sum"), per_token[valid].sum(), rtol=1e-5)
    assert torch.allclose(model(idx, targets), per_token[valid].mean(), rtol=1e-5)
    logits = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    assert torch.allclose(model(idx, targets), manual, rtol=1e-5)


@pytest.mark.parametrize("extras", [{}, EXTRAS])
def test_a_bf16_autocast_training_step_on_cpu_matches_fp32_closely(extras):
    """base_train --dtype bfloat16 on a CPU: the forward and backward run under autocast (the fused fp32
    loss kernel steps aside) and give the fp32 loss and gradients to bf16 precision."""
    model = randomize_(tiny(**extras))
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    loss32 = model(idx, targets=idx)
    loss32.backward()
    grad32 = model.lm_head.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(idx, targets=idx)
    loss16.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.02)
    assert torch.allclose(model.lm_head.weight.grad, grad32, atol=0.05 * grad32.abs().max().item())


def test_a_few_optimizer_steps_reduce_the_loss_on_a_fixed_batch():
    for arch in ("nanochat", "qwen2"):
        model = tiny(arch)
        optimizers = model.setup_optimizers()
        idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
        first = None
        for _ in range(8):
            loss = model(idx[:, :-1], idx[:, 1:])
            first = loss.item() if first is None else first
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        assert loss.item() < first - 0.5, (arch, first, loss.item())


# -----------------------------------------------------------------------------
# KV cache protocol and generation

@pytest.mark.parametrize("arch, extras", [("nanochat", {}), ("qwen2", {}), ("nanochat", EXTRAS)])
def test_cached_prefill_then_decode_equals_uncached_logits(arch, extras):
    model = randomize_(tiny(arch, n_head=4, n_kv_head=2, **extras)).eval()
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = ReferenceKVCache(model.config.n_layer)
        chunks = [model(idx[:, :7], kv_cache=cache),      # prefill
                  model(idx[:, 7:12], kv_cache=cache)]    # several tokens after a cached prefix
        for t in range(12, 20):                            # token by token
            chunks.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == 20
    cached = torch.cat(chunks, dim=1)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


@pytest.mark.parametrize("arch", ["nanochat", "qwen2"])
def test_last_only_prefill_gives_the_last_row_of_the_logits_and_the_same_cache(arch):
    model = randomize_(tiny(arch, n_head=4, n_kv_head=2)).eval()
    idx = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full_cache, last_cache = ReferenceKVCache(model.config.n_layer), ReferenceKVCache(model.config.n_layer)
        full = model(idx, kv_cache=full_cache)
        last = model(idx, kv_cache=last_cache, last_only=True)
        assert last.shape == (2, 1, model.config.vocab_size)
        assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)  # a 1-row matmul rounds its own way
        nxt = idx[:, :1]  # the next step sees the same cache either way
        assert torch.equal(model(nxt, kv_cache=last_cache), model(nxt, kv_cache=full_cache))


def test_generate_is_deterministic_per_seed_and_greedy_matches_argmax():
    model = randomize_(tiny()).eval()
    prompt = [1, 5, 9]
    a = list(model.generate(prompt, 6, temperature=1.0, seed=7))
    b = list(model.generate(prompt, 6, temperature=1.0, seed=7))
    assert a == b and len(a) == 6 and all(0 <= t < 300 for t in a)
    greedy = list(model.generate(prompt, 5, temperature=0.0))
    ids = list(prompt)
    for _ in range(5):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    top1 = list(model.generate(prompt, 5, temperature=1.0, top_k=1, seed=3))
    assert top1 == greedy


def test_generate_rejects_prompt_ids_outside_the_vocab():
    model = tiny(vocab_size=300)
    with pytest.raises(NanochatError, match="outside the model's vocab"):
        next(model.generate([1, 300], 3))


def test_generate_windows_context_past_sequence_len():
    model = randomize_(tiny(sequence_len=16)).eval()
    out = list(model.generate(list(range(1, 15)), 10, temperature=0.0))
    assert len(out) == 10


# -----------------------------------------------------------------------------
# Accounting and optimizer groups

@pytest.mark.parametrize("arch, extras", [("nanochat", {}), ("qwen2", {}), ("nanochat", EXTRAS)])
def test_estimate_flops_matches_the_flops_a_training_step_actually_runs(arch, extras):
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(arch, **extras)
    T = model.config.sequence_len
    x, y = torch.randint(0, 300, (2, 1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    # counted: every matmul and attention kernel of one forward + backward over T tokens (norms and
    # elementwise ops are not counted, and are a negligible part of the estimate too)
    assert counter.get_total_flops() == pytest.approx(model.estimate_flops() * T, rel=0.02)


@pytest.mark.parametrize("arch", ["nanochat", "qwen2"])
def test_setup_optimizers_puts_block_matrices_in_muon_and_the_rest_in_adamw(arch):
    from nanochat.optim import Muon, AdamW
    model = tiny(arch)
    adamw, muon = model.setup_optimizers(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not muon_ids & adam_ids and len(muon_ids | adam_ids) == len(list(model.parameters()))
    for block in model.transformer.h:
        for p in block.parameters():
            assert (id(p) in muon_ids) == (p.ndim == 2)
    assert id(model.transformer.wte.weight) in adam_ids and id(model.lm_head.weight) in adam_ids
    scale = (model.config.n_embd / 768) ** -0.5
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.2 * scale)
    for opt in (adamw, muon):
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]


def test_value_embeddings_and_smear_are_learned_by_adamw_with_their_own_rates():
    from nanochat.gpt import SMEAR_LR
    model = tiny(**EXTRAS)
    adamw, muon = model.setup_optimizers(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    lr_of = {id(p): g["lr"] for g in adamw.param_groups for p in g["params"]}
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert len(lr_of) + len(muon_ids) == len(list(model.parameters()))
    scale = (model.config.n_embd / 768) ** -0.5
    assert [lr_of[id(t.weight)] for t in model.value_embeds.values()] == [pytest.approx(0.1 * scale)] * 1
    assert lr_of[id(model.smear_gate.weight)] == lr_of[id(model.smear_lambda)] == SMEAR_LR
    gates = [b.attn.ve_gate for b in model.transformer.h if b.attn.ve_gate is not None]
    assert len(gates) == 1 and id(gates[0].weight) in muon_ids  # a 2-D matrix inside a block


# -----------------------------------------------------------------------------
# Value embeddings and smear

@pytest.mark.parametrize("extras", [{}, dict(value_embeds=True), dict(smear=True)])
def test_no_position_sees_a_later_token(extras):
    """Changing token t changes no logits before t (a leak would make val loss meaninglessly low)."""
    model = randomize_(tiny(**extras)).eval()
    idx = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        base = model(idx)
        for t in (1, 8, 15):
            changed = idx.clone()
            changed[0, t] = (changed[0, t] + 1) % 300
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t])
            assert not torch.allclose(out[:, t], base[:, t])


def test_value_embeddings_go_to_every_other_layer_ending_with_the_last():
    assert value_embed_layers(1) == [0]
    assert value_embed_layers(3) == [0, 2]
    assert value_embed_layers(4) == [1, 3]
    model = tiny(value_embeds=True)
    assert sorted(model.value_embeds) == ["1"]
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [False, True]
    assert model.value_embeds["1"].weight.shape == (model.config.padded_vocab_size,
                                                    model.config.n_kv_head * model.config.head_dim)


def test_a_value_embedding_adds_a_token_dependent_term_to_the_values():
    """With the tables zeroed, the model computes what the same weights without value embeddings
    compute; with trained (here random) tables, its logits differ."""
    plain = randomize_(tiny())
    ve = tiny(value_embeds=True)
    ve.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for table in ve.value_embeds.values():
            table.weight.zero_()
        assert torch.allclose(ve(idx), plain(idx), atol=1e-6)
        for table in ve.value_embeds.values():
            table.weight.normal_(0.0, 1.0)
        assert (ve(idx) - plain(idx)).abs().max() > 1e-2


def test_smear_lets_a_position_see_the_previous_token_before_any_attention():
    """With every block an identity (zero output projections), position t's logits depend on token t
    alone; with smear open, also on token t-1, and only on it (not on t-2)."""
    model = tiny(smear=True)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    a = torch.tensor([[5, 6, 7, 8]])
    b = torch.tensor([[9, 6, 7, 8]])   # token 0 changed
    c = torch.tensor([[5, 9, 7, 8]])   # token 1 changed
    with torch.no_grad():
        assert torch.equal(model(a)[:, 2:], model(c)[:, 2:])  # at init the smear is closed (lambda 0)
        model.smear_lambda.fill_(1.0)
        la, lb, lc = model(a), model(b), model(c)
    assert not torch.allclose(la[:, 2], lc[:, 2])  # position 2 sees token 1
    assert torch.equal(la[:, 2:], lb[:, 2:])          # ...but not token 0
    assert torch.equal(la[:, 0], lc[:, 0])            # and position 0 has nothing before it


# -----------------------------------------------------------------------------
# Qwen2 == transformers' Qwen2ForCausalLM

def hf_qwen2(tie=False, vocab_size=300):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    hf_cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, max_position_embeddings=64, attn_implementation="eager")
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits biases and norms to constants: randomise so they are tested too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def our_qwen2(tie=False, vocab_size=300):
    cfg = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    arch="qwen2", intermediate_size=160, tie_embeddings=tie)
    model = GPT(cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_logits_match_transformers_with_weights_copied_from_hf(tie):
    from scripts.export_hf import load_hf_state_dict
    hf = hf_qwen2(tie)
    ours = our_qwen2(tie)
    load_hf_state_dict(ours, hf.state_dict())
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = hf(idx).logits
        mine = ours(idx)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max() <= 1e-4


def test_qwen2_logits_match_transformers_with_weights_copied_to_hf():
    from scripts.export_hf import to_hf_state_dict
    hf = hf_qwen2()
    ours = randomize_(our_qwen2(), seed=4)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(0.3)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() <= 1e-4


# -----------------------------------------------------------------------------
# Hugging Face export

def train_tiny_bpe(texts, num_merges):
    """A few byte-level BPE merges learned in pure Python (no rustbpe build needed): {bytes: rank}."""
    import regex
    from nanochat.tokenizer import SPLIT_PATTERN
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for t in texts for chunk in regex.findall(SPLIT_PATTERN, t)]
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(num_merges):
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda pair: (counts[pair], pair))
        ranks[best[0] + best[1]] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    return ranks


@pytest.fixture
def bpe_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS
    text = ["The quick brown fox jumps over the lazy dog. Numbers 12345 and émojis 🙂!\n",
            "Hello world, hello nanochat; don't stop   believing.\tTabs\r\nand CRLF.",
            ] * 5
    ranks = train_tiny_bpe(text, 60)
    return RustBPETokenizer(ranks, {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)})


def test_export_hf_loads_in_transformers_with_identical_logits_and_tokenizer(tmp_path, bpe_tokenizer):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from scripts.export_hf import export_model_to_hf
    tok = bpe_tokenizer
    cfg = config_from_depth(2, tok.get_vocab_size(), arch="qwen2", sequence_len=64, n_kv_head=1)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    randomize_(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)
    out = export_model_to_hf(model.eval(), tok, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == tok.get_vocab_size()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    idx = torch.randint(0, tok.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() <= 1e-4
    # (AutoTokenizer in transformers 5 swaps in Qwen2Tokenizer's own digit-splitting pre-tokenizer for
    # model_type qwen2, so the exported tokenizer is loaded as what it is: a PreTrainedTokenizerFast.)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(out)
    for s in ["The quick brown fox", "hello   world!\n\nnew  line", "don't 12345 émojis 🙂 zzz"]:
        assert hf_tok.encode(s, add_special_tokens=False) == tok.encode(s), s
        assert hf_tok.decode(tok.encode(s)) == s
    assert hf_tok.convert_tokens_to_ids("<|assistant_end|>") == tok.encode_special("<|assistant_end|>")


def test_rotary_tables_grow_past_ten_times_sequence_len_consistently():
    model = randomize_(tiny(sequence_len=2)).eval()  # tables start at 20 positions
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = ReferenceKVCache(model.config.n_layer)
    with torch.inference_mode():
        stepwise = torch.cat([model(idx[:, t:t + 1], kv_cache=cache) for t in range(30)], dim=1)
    full = model(idx)  # outside inference mode, after the tables grew inside it
    assert model.cos.size(1) >= 30
    assert torch.allclose(stepwise, full, atol=1e-4)
    full.sum().backward()  # the grown tables are usable for training


def test_export_cli_turns_a_saved_qwen2_checkpoint_into_a_loadable_hf_folder(tmp_path, bpe_tokenizer,
                                                                             save_tiny_checkpoint):
    from transformers import AutoModelForCausalLM
    from scripts.export_hf import main
    torch.manual_seed(0)
    model = randomize_(GPT(config_from_depth(1, bpe_tokenizer.get_vocab_size(), arch="qwen2", sequence_len=32)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)
    ckpt_dir = str(tmp_path / "ckpt" / "qwen2")
    save_tiny_checkpoint(ckpt_dir, 5, model.eval(), bpe_tokenizer)
    out = tmp_path / "exported"
    main(["--checkpoint-dir", ckpt_dir, "--out-dir", str(out)])
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, bpe_tokenizer.get_vocab_size(), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() <= 1e-4
    with pytest.raises(NanochatError, match="already exists"):
        main(["--checkpoint-dir", ckpt_dir, "--out-dir", str(out)])


@pytest.mark.parametrize("extras", [dict(value_embeds=True), dict(smear=True)])
def test_export_refuses_a_model_whose_parts_transformers_cannot_hold(tmp_path, extras):
    from scripts.export_hf import export_model_to_hf, to_hf_state_dict
    from nanochat.tokenizer import CharTokenizer
    model = tiny(**extras)
    with pytest.raises(NanochatError, match=f"cannot export a model with {next(iter(extras))}"):
        to_hf_state_dict(model)
    tokenizer = CharTokenizer.train_from_iterator(["abc"])
    with pytest.raises(NanochatError, match="cannot export"):
        export_model_to_hf(model, tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before writing anything
