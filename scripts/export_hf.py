"""
Export a checkpoint to a Hugging Face folder that `transformers` loads:

    python -m scripts.export_hf --source base --out-dir ./my_model_hf
    python -m scripts.export_hf --checkpoint-dir ~/.cache/nanochat/base_checkpoints/d4 --step 1000 --out-dir ./hf

Needs the optional dependency: pip install -e '.[hf]'.

Both architectures export to a transformers model type that computes the same function:
- nanochat (the default) -> NanoChatForCausalLM (model type "nanochat", transformers >= 5): parameter-free
  RMSNorm after the embedding, before each sub-block, on queries/keys (after rotary) and at the end; ReLU² MLP;
  no biases; untied head; logit soft-capping; grouped-query attention. Its rotary rotates the other way
  (rotate_half is cat(x2, -x1)), which is the same as ours with the second half of every q/k head negated:
  the QK-norm and the dot product q·k cannot see that sign, so the export negates those rows of q_proj/k_proj.
- qwen2 -> Qwen2ForCausalLM, weight for weight.
Every GPTConfig field has its counterpart (rope theta, eps, softcap, GQA, intermediate size), so there is
nothing an export has to approximate. The exported vocabulary is the tokenizer's (the padding rows of our
embedding/head are dropped).

Writes config.json + generation_config.json, model.safetensors, the tokenizer as tokenizer.json (Hugging
Face `tokenizers`, byte-level BPE rebuilt from our merges, our split pattern) + tokenizer_config.json with a
chat template that renders a conversation to the same ids as Tokenizer.render_conversation, and a copy of
our own tokenizer folder in nanochat_tokenizer/. Then:

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

(Use PreTrainedTokenizerFast, not AutoTokenizer, for qwen2 exports: transformers 5 maps model type qwen2 to
Qwen2Tokenizer, which replaces our split pattern with Qwen's digit-by-digit one.)
Two things the chat template cannot do as render_conversation does: special-token strings typed inside a
message are read as special tokens (we encode them as plain text), and two adjacent text parts of one
assistant message are tokenized as one text (we tokenize each part alone). And transformers' generate()
has no calculator: after <|python_end|> the model goes on by itself where our Engine inserts the tool's output.
"""

import os
import shutil
import tempfile

import torch

from nanochat.common import ArgumentParser, NanochatError, atomic_write_json, run_main

INSTALL_HINT = "pip install -e '.[hf]'"

# our parameter name -> the transformers model's name, per arch; {i} is the layer index
NAME_MAPS = {
    "qwen2": {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "transformer.h.{i}.ln_1.weight": "model.layers.{i}.input_layernorm.weight",
        "transformer.h.{i}.ln_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "transformer.h.{i}.attn.c_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "transformer.h.{i}.attn.c_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
        "transformer.h.{i}.attn.c_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "transformer.h.{i}.attn.c_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
        "transformer.h.{i}.attn.c_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "transformer.h.{i}.attn.c_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
        "transformer.h.{i}.attn.c_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "transformer.h.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "transformer.h.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
        "transformer.h.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    },
    "nanochat": {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "lm_head.weight": "lm_head.weight",
        "transformer.h.{i}.attn.c_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "transformer.h.{i}.attn.c_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "transformer.h.{i}.attn.c_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "transformer.h.{i}.attn.c_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "transformer.h.{i}.mlp.c_fc.weight": "model.layers.{i}.mlp.fc1.weight",
        "transformer.h.{i}.mlp.c_proj.weight": "model.layers.{i}.mlp.fc2.weight",
    },
}
HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "nanochat": "NanoChatForCausalLM"}
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # padded to a multiple of 64 on our side
ROTARY_FLIPPED = (".attn.c_q.weight", ".attn.c_k.weight")  # nanochat: second half of each head negated


def import_transformers():
    """The transformers module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise NanochatError(f"exporting to Hugging Face needs the optional dependency transformers: "
                            f"{INSTALL_HINT}") from None
    return transformers


def _expanded_name_map(config):
    names = {}
    for ours, theirs in NAME_MAPS[config.arch].items():
        if "{i}" in ours:
            for i in range(config.n_layer):
                names[ours.format(i=i)] = theirs.format(i=i)
        else:
            names[ours] = theirs
    return names


def check_exportable(config):
    if config.arch not in NAME_MAPS:
        raise NanochatError(f"cannot export arch {config.arch!r} to Hugging Face; exportable archs: "
                            f"{', '.join(NAME_MAPS)}")
    extras = [name for name in ("value_embeds", "smear") if getattr(config, name)]
    if extras:
        raise NanochatError(f"cannot export a model with {' and '.join(extras)} to Hugging Face: transformers' "
                            f"{HF_ARCHITECTURES[config.arch]} has no such part (chat with it through "
                            f"scripts.chat_cli / chat_web, which serve it as trained)")


def _flip_rotary_halves(weight, head_dim):
    """Negate the second half of every head's rows of a q/k projection (its own inverse)."""
    rows, width = weight.shape
    w = weight.reshape(rows // head_dim, 2, head_dim // 2, width).clone()
    w[:, 1].neg_()
    return w.reshape(rows, width)


def _needs_flip(config, name):
    return config.arch == "nanochat" and name.endswith(ROTARY_FLIPPED)


def to_hf_state_dict(model):
    """Our GPT's weights under its transformers model's names, vocab rows trimmed to vocab_size."""
    cfg = model.config
    check_exportable(cfg)
    ours = model.state_dict()
    out = {}
    for name, hf_name in _expanded_name_map(cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF re-ties it to embed_tokens
        tensor = ours[name].detach()
        if name in VOCAB_ROWS:
            tensor = tensor[:cfg.vocab_size]
        if _needs_flip(cfg, name):
            tensor = _flip_rotary_halves(tensor, cfg.head_dim)
        out[hf_name] = tensor.to("cpu", copy=True).contiguous()
    return out


@torch.no_grad()
def load_hf_state_dict(model, hf_state):
    """Copy transformers-named weights (Qwen2ForCausalLM / NanoChatForCausalLM, per our arch) into our GPT
    (the padding rows of the vocab are zeroed)."""
    cfg = model.config
    check_exportable(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, hf_name in _expanded_name_map(cfg).items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if hf_name not in hf_state:
            raise NanochatError(f"Hugging Face weights lack {hf_name}")
        src = hf_state[hf_name]
        dst = params[name]
        if name in VOCAB_ROWS:
            dst.zero_()
            dst = dst[:src.size(0)]
        if dst.shape != src.shape:
            raise NanochatError(f"shape mismatch for {hf_name}: ours {tuple(dst.shape)}, theirs {tuple(src.shape)}")
        if _needs_flip(cfg, name):
            src = _flip_rotary_halves(src, cfg.head_dim)
        dst.copy_(src)


def _special_token_ids(tokenizer):
    """bos/eos for config.json and generation_config.json. Generation stops where our Engine stops:
    at <|assistant_end|> or <|bos|> (a new document)."""
    if tokenizer is None:
        return {}
    specials = _special_ids(tokenizer)
    bos = tokenizer.get_bos_token_id()
    end = specials.get("<|assistant_end|>")
    return dict(bos_token_id=bos, eos_token_id=[end, bos] if end is not None else bos)


def hf_config_dict(config, tokenizer=None, dtype="float32"):
    """config.json, built with the installed transformers' own config class (so rope settings land where
    that version expects them)."""
    transformers = import_transformers()
    check_exportable(config)
    special = _special_token_ids(tokenizer)
    if config.arch == "qwen2":
        hf = transformers.Qwen2Config(
            vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head, hidden_act="silu", max_position_embeddings=config.sequence_len,
            rms_norm_eps=config.rms_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
            use_sliding_window=False, attention_dropout=0.0, **special)
    else:
        if not hasattr(transformers, "NanoChatConfig"):
            raise NanochatError(f"transformers {transformers.__version__} has no NanoChat model type; "
                                f"upgrade it (pip install -U 'transformers>=5') to export a nanochat-arch model")
        # pad_token_id=None: a padding index would freeze that token's embedding row in fine-tuning.
        hf = transformers.NanoChatConfig(
            vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head, hidden_act="relu2", max_position_embeddings=config.sequence_len,
            rms_norm_eps=config.rms_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            final_logit_softcapping=config.softcap if config.softcap > 0 else None, attention_bias=False,
            attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=None, **special)
    hf.architectures = [HF_ARCHITECTURES[config.arch]]
    d = hf.to_dict()
    d["torch_dtype"] = dtype
    if config.arch == "qwen2":
        d.setdefault("rope_theta", config.rope_theta)  # read by older transformers versions
    return d


# -----------------------------------------------------------------------------
# Tokenizer: our byte-level BPE as a Hugging Face tokenizers file

def _special_ids(tokenizer):
    return {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table used by ByteLevel tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merge_of(token, ranks):
    """The pair of tokens that BPE merged to make `token`: run byte-level BPE on its bytes using
    only merges of lower rank; what is left is exactly two pieces."""
    parts = [bytes([b]) for b in token]
    rank = ranks[token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise NanochatError(f"tokenizer token {token!r} is not reachable by a single merge; cannot export it as BPE")
    return parts


def bpe_tokenizer_json(tokenizer):
    """A tokenizers JSON string for our RustBPETokenizer: same split pattern, same merges, same ids,
    special tokens as added tokens."""
    from tokenizers import Tokenizer, Regex, AddedToken, models, pre_tokenizers, decoders
    byte_char = _bytes_to_unicode()

    def to_str(b):
        return "".join(byte_char[x] for x in b)

    ranks = tokenizer.mergeable_ranks
    vocab = {to_str(b): i for b, i in ranks.items()}
    merges = []
    for token, _ in sorted(((b, i) for b, i in ranks.items() if len(b) > 1), key=lambda t: t[1]):
        left, right = _merge_of(token, ranks)
        merges.append((to_str(left), to_str(right)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = _special_ids(tokenizer)
    for name, _ in sorted(specials.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    for name, i in specials.items():
        if tok.token_to_id(name) != i:
            raise NanochatError(f"special token {name} would get id {tok.token_to_id(name)} instead of {i} in the "
                                f"Hugging Face tokenizer; cannot export this tokenizer as tokenizer.json")
    return tok.to_str()


# What Tokenizer.render_conversation does, as a Jinja chat template over the same special tokens: <|bos|>; a
# leading system message joined to the first user message with a blank line; user turns in
# <|user_start|>..<|user_end|>; assistant turns in <|assistant_start|>..<|assistant_end|>, their content a string
# or a list of parts (text, python in <|python_start|>..<|python_end|>, python_output in <|output_start|>..
# <|output_end|>); roles alternate user/assistant. add_generation_prompt primes the assistant's turn.
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}
  {%- set messages = messages[1:] -%}
{%- else -%}
  {%- set system_prefix = '' -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in messages -%}
  {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
    {{- raise_exception('roles must alternate user/assistant, starting with user (after an optional system)') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{- '<|user_start|>' + (system_prefix if loop.first else '') + message['content'] + '<|user_end|>' -}}
  {%- else -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          {{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
        {%- elif part['type'] == 'python_output' -%}
          {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
        {%- else -%}
          {{- raise_exception('assistant content parts are text, python or python_output') -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}
"""


def write_tokenizer_files(tokenizer, out_dir):
    """tokenizer.json + tokenizer_config.json (with the chat template when the tokenizer has our conversation
    special tokens) when the tokenizer kind allows it (bpe, hf); always a copy of our own tokenizer folder.
    Returns True if tokenizer.json was written."""
    from nanochat.tokenizer import SPECIAL_TOKENS
    tokenizer.save(os.path.join(out_dir, "nanochat_tokenizer"))
    if tokenizer.kind == "bpe":
        text = bpe_tokenizer_json(tokenizer)
    elif tokenizer.kind == "hf":
        text = tokenizer.tok.to_str()
    else:
        print(f"note: a {tokenizer.kind} tokenizer has no Hugging Face tokenizer.json equivalent here; "
              f"use nanochat_tokenizer/ with nanochat.tokenizer.load_tokenizer")
        return False
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    specials = _special_ids(tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>" if "<|assistant_end|>" in specials else None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    if set(SPECIAL_TOKENS) <= set(specials):
        config["chat_template"] = CHAT_TEMPLATE
    atomic_write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    return True


# -----------------------------------------------------------------------------
# The export itself

def export_model_to_hf(model, tokenizer, out_dir, overwrite=False):
    """Write `model` (our GPT, either arch) and `tokenizer` as a Hugging Face folder at out_dir.
    Written into a temp folder beside out_dir and renamed into place, so out_dir is never half-written."""
    from safetensors.torch import save_file
    cfg = model.config
    check_exportable(cfg)
    if tokenizer is not None and tokenizer.get_vocab_size() != cfg.vocab_size:
        raise NanochatError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model was built for "
                            f"{cfg.vocab_size}; export the checkpoint with the tokenizer it was trained with")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise NanochatError(f"{out_dir} already exists; choose another --out-dir or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".", dir=parent)
    try:
        state = {k: v.float() for k, v in to_hf_state_dict(model).items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(os.path.join(tmp, "config.json"), hf_config_dict(cfg, tokenizer))
        if tokenizer is not None:
            generation = _special_token_ids(tokenizer)
            # what generate() fills finished rows of a batch with (not in config.json: there a padding
            # index would freeze that token's embedding row in fine-tuning)
            generation["pad_token_id"] = generation["bos_token_id"]
            atomic_write_json(os.path.join(tmp, "generation_config.json"), generation)
            write_tokenizer_files(tokenizer, tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    parser = ArgumentParser(description="Export a nanochat checkpoint to a Hugging Face transformers folder")
    parser.add_argument("--source", default="base", help="base|mid|sft|rl (ignored with --checkpoint-dir)")
    parser.add_argument("--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last complete one)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="a checkpoint tag folder, instead of --source/--model-tag")
    parser.add_argument("--out-dir", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    args = parser.parse_args(argv)
    import_transformers()  # before any loading: a missing optional dependency is the first thing to say

    from nanochat import checkpoint_manager as cm
    if args.checkpoint_dir:
        step = args.step if args.step is not None else cm.find_last_step(args.checkpoint_dir)
        model, tokenizer, meta = cm.build_model(args.checkpoint_dir, step, "cpu", phase="eval")
    else:
        model, tokenizer, meta = cm.load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag,
                                               step=args.step)
    model = model.float()
    out = export_model_to_hf(model, tokenizer, args.out_dir, overwrite=args.overwrite)
    print(f"exported {model.config.arch} model ({model.num_params():,} params, step {meta.get('step')}) to {out}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained(...) "
          f"({HF_ARCHITECTURES[model.config.arch]}) and PreTrainedTokenizerFast.from_pretrained(...)")


if __name__ == "__main__":
    run_main(main)
