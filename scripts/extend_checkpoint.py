"""
Grow a trained checkpoint to an extended tokenizer (one made by scripts.tok_extend), without
touching what the model already knows.

    python -m scripts.tok_extend --from-tokenizer ~/.cache/nanochat/tokenizer_ko --output-dir ~/.cache/nanochat/tokenizer_ext
    python -m scripts.extend_checkpoint -i base --tokenizer-dir ~/.cache/nanochat/tokenizer_ext
    python -m scripts.mid_train -g d4-ext      # rows < the original vocab stay frozen by default

What it does:
- checks that the extended tokenizer really descends from the checkpoint's tokenizer: its manifest
  names the checkpoint's fingerprint as parent, and every old id still means the same token;
- grows the embedding (wte) and output head (lm_head) from the old to the new vocab size. Old rows
  are copied bit for bit. A new row starts as the mean of the rows of the bytes that spell the new
  token (byte-level BPE: the 256 byte tokens of the parent), so a new word starts out "like its
  spelling"; a token with no byte spelling (a special token, or any new token of a char tokenizer)
  starts as the mean of all old rows. Padding rows (the model rounds the vocab up to a multiple of
  64) are zero;
- grows the AdamW state of those two matrices with zero moments for the new rows (single-process
  checkpoints; a checkpoint written by several ranks keeps its weights and drops the sharded
  optimizer state, with a message — later stages build fresh optimizers anyway);
- saves a new checkpoint (default tag `<tag>-ext`) carrying the extended tokenizer, whose manifest
  records the original vocab size: mid_train and chat_sft freeze rows below it by default
  (`--freeze-until-index`).
"""

import os

import torch

from nanochat.checkpoint_manager import (STAGE_DIRS, checkpoints_root, find_latest_tag, find_last_step,
                                         load_checkpoint, make_config, save_checkpoint, step_dirname,
                                         validate_checkpoint)
from nanochat.common import ArgumentParser, NanochatError, get_base_dir, print0, run_main
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import load_tokenizer


def parse_args(argv=None):
    parser = ArgumentParser(description="Grow a checkpoint's embedding and output head to an extended tokenizer")
    parser.add_argument("-i", "--source", default="base", choices=sorted(STAGE_DIRS), help="checkpoint family")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--tokenizer-dir", default=None, help="the extended tokenizer (default <base>/tokenizer)")
    parser.add_argument("--output-tag", default=None, help="tag of the new checkpoint (default <tag>-ext)")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# Checks: the new tokenizer must keep every old id

def check_descends(old, new, old_from, new_from):
    """Raise NanochatError unless `new` is an extension of `old` that renumbers nothing."""
    v0, v1 = old.get_vocab_size(), new.get_vocab_size()
    if new.fingerprint == old.fingerprint:
        raise NanochatError(f"the tokenizer {new_from} is the checkpoint's own (fingerprint {old.fingerprint[:16]}); "
                            f"extend it first with python -m scripts.tok_extend")
    if new.parent_fingerprint != old.fingerprint:
        raise NanochatError(
            f"the tokenizer {new_from} (parent fingerprint {str(new.parent_fingerprint)[:16]}) was not extended from the "
            f"checkpoint's tokenizer {old_from} ({old.fingerprint[:16]}); run scripts.tok_extend on the checkpoint's tokenizer")
    if new.kind != old.kind or v1 <= v0:
        raise NanochatError(f"the tokenizer {new_from} ({new.kind}, {v1} ids) does not extend {old_from} ({old.kind}, {v0} ids)")
    for name, i in old.special_tokens.items():
        if new.special_tokens.get(name) != i:
            raise NanochatError(f"special token {name} moved from id {i} to {new.special_tokens.get(name)} in {new_from}")
    spell = (lambda t, i: t.id_to_bytes(i)) if hasattr(old, "id_to_bytes") else (lambda t, i: t.id_to_token(i))
    specials = set(old.special_tokens.values())
    for i in range(v0):
        if i not in specials and spell(old, i) != spell(new, i):
            raise NanochatError(f"id {i} means {spell(old, i)!r} in {old_from} but {spell(new, i)!r} in {new_from}; "
                                f"an extension must not renumber existing ids")


# -----------------------------------------------------------------------------
# New rows

def byte_spelling_ids(old, new, token_id):
    """Ids (in the old tokenizer) of the single bytes that spell new token `token_id`, or [] if it has none."""
    if old.kind != "bpe" or token_id in set(new.special_tokens.values()):
        return []
    return [old.mergeable_ranks[bytes([b])] for b in new.id_to_bytes(token_id)]


@torch.no_grad()
def grow_rows(weight, old, new, padded_rows):
    """weight (V0_padded, d) -> (V1_padded, d): old rows copied, new rows initialised, padding zero."""
    v0, v1 = old.get_vocab_size(), new.get_vocab_size()
    out = torch.zeros(padded_rows, weight.shape[1], dtype=weight.dtype)
    out[:v0] = weight[:v0]
    mean_all = weight[:v0].float().mean(dim=0)
    for t in range(v0, v1):
        pieces = byte_spelling_ids(old, new, t)
        out[t] = (weight[pieces].float().mean(dim=0) if pieces else mean_all).to(weight.dtype)
    return out


@torch.no_grad()
def grow_optimizer_state(optimizer_states, old_rows, new_rows):
    """Zero-pad, along dim 0, every optimizer state tensor that has the shape of an old vocab matrix."""
    for opt_state in optimizer_states:
        for param_state in opt_state.get("state", {}).values():
            for key, value in list(param_state.items()):
                if torch.is_tensor(value) and value.ndim == 2 and value.shape[0] == old_rows:
                    grown = torch.zeros(new_rows, value.shape[1], dtype=value.dtype)
                    grown[:old_rows] = value
                    param_state[key] = grown
    return optimizer_states


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)

    # --- find and validate the source checkpoint
    root = checkpoints_root(args.source)
    tag = args.model_tag or find_latest_tag(root)
    if tag is None:
        raise NanochatError(f"no {args.source} checkpoints in {root}; train one first")
    checkpoint_dir = os.path.join(root, tag)
    step = args.step if args.step is not None else find_last_step(checkpoint_dir)
    step_dir = os.path.join(checkpoint_dir, step_dirname(step))
    state, _, meta = load_checkpoint(checkpoint_dir, step, "cpu")
    old_tok_dir = os.path.join(step_dir, "tokenizer")
    old = load_tokenizer(old_tok_dir)
    config = make_config(meta, step_dir)
    validate_checkpoint(step_dir, meta, old, config)

    # --- the extended tokenizer must descend from the checkpoint's
    new_tok_dir = os.path.abspath(args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))
    new = load_tokenizer(new_tok_dir)
    check_descends(old, new, old_tok_dir, new_tok_dir)
    v0, v1 = old.get_vocab_size(), new.get_vocab_size()
    new_config = GPTConfig.from_dict({**config.to_dict(), "vocab_size": v1})
    print0(f"extending {step_dir}: vocab {v0:,} -> {v1:,} ({v1 - v0:,} new rows), "
           f"tokenizer {old.fingerprint[:16]} -> {new.fingerprint[:16]}")

    # --- grow the embedding, the head and any value embeddings (tied weights are grown once)
    old_rows, new_rows = config.padded_vocab_size, new_config.padded_vocab_size
    value_embeds = sorted(name for name in state if name.startswith("value_embeds."))  # per-token tables too
    for name in ["transformer.wte.weight", "lm_head.weight"] + value_embeds:
        if name in state and not (name == "lm_head.weight" and config.tie_embeddings):
            state[name] = grow_rows(state[name], old, new, new_rows)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]

    # --- optimizer state (single-process checkpoints)
    world_size = int(meta.get("world_size", 1))
    optimizer_states = None
    if world_size == 1 and os.path.exists(os.path.join(step_dir, "optim_rank0.pt")):
        _, optimizer_states, _ = load_checkpoint(checkpoint_dir, step, "cpu", load_optimizer=True)
        optimizer_states = grow_optimizer_state(optimizer_states, old_rows, new_rows)
    elif world_size > 1:
        print0(f"note: the optimizer state was sharded over {world_size} ranks; the extended checkpoint carries none "
               f"(mid_train/chat_sft start fresh optimizers; base_train --resume from it is not possible)")

    # --- save the extended checkpoint, carrying the new tokenizer
    out_tag = args.output_tag or f"{tag}-ext"
    out_dir = os.path.join(root, out_tag)
    new_meta = dict(meta)
    new_meta.update(model_config=new_config.to_dict(), vocab_size=v1, tokenizer_fingerprint=new.fingerprint,
                    extended_from={"checkpoint": step_dir, "parent_fingerprint": old.fingerprint,
                                   "original_vocab_size": v0, "new_row_init": "mean of the byte rows spelling the token"})
    new_meta.pop("dataloader_state", None)  # the old data position means nothing under a new tokenization
    final = save_checkpoint(out_dir, step, state, optimizer_states, new_meta, new, rank=0)
    print0(f"saved {final}; train on with e.g. python -m scripts.mid_train -g {out_tag} "
           f"(rows < {v0:,} frozen by default)")
    try:
        from nanochat.report import get_report
        get_report().log(section="Checkpoint extension", data=[{
            "source": step_dir, "output": final, "original_vocab_size": v0, "vocab_size": v1,
            "parent_fingerprint": old.fingerprint, "fingerprint": new.fingerprint}])
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    run_main(main)
