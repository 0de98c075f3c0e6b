"""
Is a checkpoint step intact, and does it fit? The checks behind checkpoint_manager's one validated load
path (`open_step`), kept apart from saving, finding and loading.

- Checksums: meta.json records the sha256 of every other file of the step directory, and the COMPLETE
  marker holds meta.json's own; NANOCHAT_VERIFY_CHECKSUMS=0 skips them for very large checkpoints.
- Fit: the safetensors header (read without the data) against the tensor shapes a GPT with the meta's
  config has (built on the meta device: no memory, no compute), and the tokenizer copy against the meta's
  fingerprint and vocab size.

Every failure is one NanochatError naming the file and both sides of the disagreement.
"""

import hashlib
import os
import sys

from nanochat.common import NanochatError

# the files of a step directory that carry the checks
COMPLETE_MARKER = "COMPLETE"
WEIGHTS = "model.safetensors"
META = "meta.json"
VERIFY_ENV = "NANOCHAT_VERIFY_CHECKSUMS"  # "0": skip checksum verification (very large checkpoints)
_CHANGED = "its sha256 differs from the one recorded at save time"


def tell(line):
    """A line on stderr (rank 0 only), for things the user should know that do not stop the run; stderr keeps
    the stdout of chat_cli -p and friends clean."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Checksums: sha256 (hardware-accelerated on current CPUs; ~1 GB/s, see dev/BENCHMARKS.md)

def file_checksum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def step_files(step_dir):
    """Relative paths of every file in a step directory except meta.json and COMPLETE (which carry the checksums)."""
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel not in (META, COMPLETE_MARKER):
                out.append(rel)
    return sorted(out)


def verify_enabled(verify=None):
    """verify=None: on unless NANOCHAT_VERIFY_CHECKSUMS=0."""
    if verify is not None:
        return verify
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")



def verify_meta_checksum(step_dir):
    """meta.json against the checksum its step's COMPLETE marker holds (markers from before checksums hold none)."""
    path = os.path.join(step_dir, META)
    with open(os.path.join(step_dir, COMPLETE_MARKER), encoding="utf-8", errors="replace") as f:
        recorded = dict(line.split(" ", 1) for line in f.read().splitlines() if " " in line).get(META)
    if recorded is not None and recorded.strip() != file_checksum(path):
        raise NanochatError(f"checkpoint meta is corrupt ({_CHANGED}): {path}")


# -----------------------------------------------------------------------------
# Validation: everything is compared before a real model is built or any compute runs

def expected_shapes(config):
    """Parameter/buffer shapes a GPT with this config has, from a model on the meta device (no memory, no compute)."""
    import torch
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def checkpoint_shapes(path):
    """Tensor shapes from a safetensors header, without reading the data."""
    from safetensors import safe_open
    shapes = {}
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    except FileNotFoundError:
        raise NanochatError(f"checkpoint weights missing: {path}") from None
    except Exception as e:
        raise NanochatError(f"checkpoint weights are truncated or corrupt ({e.__class__.__name__}: {e}): "
                            f"{path}") from None
    return shapes


def make_config(meta, step_dir="?"):
    from nanochat.gpt import GPTConfig
    try:
        return GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise NanochatError(f"checkpoint meta has an unusable model_config ({e}): {step_dir}/meta.json") from None


def validate_checkpoint(step_dir, meta, tokenizer, config):
    """Raise NanochatError naming both sides if tokenizer, vocab size or tensor shapes disagree."""
    meta_path = os.path.join(step_dir, META)
    tok_path = os.path.join(step_dir, "tokenizer")
    fp_meta = meta.get("tokenizer_fingerprint")
    if fp_meta != tokenizer.fingerprint:
        raise NanochatError(
            f"tokenizer fingerprint mismatch: checkpoint meta {meta_path} says {str(fp_meta)[:16]} but the tokenizer "
            f"{getattr(tokenizer, 'source_dir', tok_path)} is {tokenizer.fingerprint[:16]}; "
            f"use the tokenizer the model was trained with")
    vocab_tok = tokenizer.get_vocab_size()
    if config.vocab_size != vocab_tok:
        raise NanochatError(
            f"vocab size mismatch: model config in {meta_path} has vocab_size {config.vocab_size} but the tokenizer "
            f"{tok_path} has {vocab_tok} ids; the model must be built (or extended) for this tokenizer")
    if "vocab_size" in meta and meta["vocab_size"] != vocab_tok:
        raise NanochatError(f"vocab size mismatch: meta {meta_path} records vocab_size {meta['vocab_size']} "
                            f"but the tokenizer {tok_path} has {vocab_tok}")
    weights = os.path.join(step_dir, WEIGHTS)
    have = checkpoint_shapes(weights)
    for alias, src in (meta.get("tied_weights") or {}).items():
        if src in have:
            have[alias] = have[src]
    want = expected_shapes(config)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise NanochatError(
            f"checkpoint tensors do not match the config in {meta_path}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'…' if len(extra) > 5 else ''} in {weights}")
    for k in sorted(want):
        if want[k] != have[k]:
            raise NanochatError(f"tensor shape mismatch for {k}: {weights} has {list(have[k])} "
                                f"but the config in {meta_path} needs {list(want[k])}")


_unverified_noted = set()


def verify_checksums(step_dir, meta, files=None):
    """Compare the listed files (default: every file the meta records) with the checksums taken at save time.
    A checkpoint saved before checksums were recorded is accepted, with a note (once per directory)."""
    recorded = meta.get("checksums")
    if not isinstance(recorded, dict):
        if step_dir not in _unverified_noted:
            _unverified_noted.add(step_dir)
            tell(f"note: {step_dir} was saved before checkpoints recorded checksums; its files are checked for "
                  f"presence, readability and shapes only")
        return
    for rel in (files if files is not None else sorted(recorded)):
        if rel not in recorded:
            continue  # a file this step never had (e.g. no optimizer state); presence is checked by the caller
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            raise NanochatError(f"checkpoint file missing: {path}")
        if file_checksum(path) != recorded[rel]:
            raise NanochatError(f"checkpoint file is corrupt ({_CHANGED}): {path}")


def missing_optimizer_message(path, meta):
    return (f"optimizer state missing: {path} (the checkpoint was saved by {meta.get('world_size', '?')} "
            f"process(es); resume with the same number)")
