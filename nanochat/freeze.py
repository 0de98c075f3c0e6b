"""
Freezing the first N rows of the token embedding and the output head.

After growing a trained model's vocabulary (scripts/tok_extend + checkpoint extension), the old
rows already encode what pretraining learned; later stages (mid_train, chat_sft) should teach the
new rows without disturbing the old ones. `--freeze-until-index N` keeps rows < N of the
embedding (wte), of the output head (lm_head) and of any value embeddings bit-identical through training:

1. a gradient hook zeroes the gradient of rows < N, so they contribute nothing to the
   optimizer's moments (and nothing to gradient-norm clipping);
2. after every optimizer step the rows are copied back from a snapshot taken at start-up,
   which also undoes weight decay and any momentum left in the optimizer state from earlier
   training. Masking only the gradient is not enough for that: AdamW's decoupled weight decay
   and a resumed momentum buffer still move a row whose gradient is zero.

Default when the flag is not given (see `resolve_freeze_index`): the tokenizer's
`original_vocab_size` if the tokenizer was extended (its manifest records a parent fingerprint
and a smaller original vocab), else nothing is frozen. `--freeze-until-index 0` disables it.
"""

import json
import os

import torch
import torch.nn as nn

from nanochat.common import NanochatError


# -----------------------------------------------------------------------------
# Which index to freeze up to

def tokenizer_original_vocab_size(tokenizer, tokenizer_dir=None):
    """The vocab size before an extension, or None if the tokenizer was never extended.
    Read from the tokenizer object if it exposes it, else from its manifest.json."""
    original = getattr(tokenizer, "original_vocab_size", None)
    if original is None and tokenizer_dir is not None:
        manifest_path = os.path.join(tokenizer_dir, "manifest.json")
        if os.path.exists(manifest_path):
            with open(manifest_path, "r", encoding="utf-8") as f:
                manifest = json.load(f)
            original = manifest.get("original_vocab_size")
    if original is None or int(original) >= tokenizer.get_vocab_size():
        return None  # not extended: no new rows, nothing to protect the old ones from
    return int(original)


def resolve_freeze_index(flag_value, tokenizer, tokenizer_dir=None):
    """The row index to freeze up to (0 = nothing frozen).
    flag_value: None (flag not given -> the original vocab size of an extended tokenizer, else 0)
    or an int >= 0. An index above the tokenizer's vocab size is an error, never clamped."""
    vocab_size = tokenizer.get_vocab_size()
    if flag_value is None:
        original = tokenizer_original_vocab_size(tokenizer, tokenizer_dir)
        return original or 0
    index = int(flag_value)
    if index < 0:
        raise NanochatError(f"--freeze-until-index must be >= 0 (got {index}); use 0 to freeze nothing")
    if index > vocab_size:
        raise NanochatError(f"--freeze-until-index {index} is above the vocab size {vocab_size}; "
                            f"use a value between 0 and {vocab_size}")
    return index


# -----------------------------------------------------------------------------
# Which parameters hold one row per token

def vocab_parameters(model):
    """The embedding and output-head weights (one row per token id), deduplicated when tied, and any
    value-embedding tables. Looks for model.transformer.wte / model.lm_head first, then any nn.Embedding."""
    found = []
    candidates = []
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(transformer, "wte"):
        candidates.append(("wte", transformer.wte))
    if hasattr(model, "lm_head"):
        candidates.append(("lm_head", model.lm_head))
    value_embeds = getattr(model, "value_embeds", None)
    if candidates and value_embeds is not None:
        candidates += [(f"value_embeds.{key}", table) for key, table in value_embeds.items()]
    if not candidates:
        candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    seen = set()
    for name, module in candidates:
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        found.append((name, weight))
    if not found:
        raise NanochatError("could not find the embedding/output layers to freeze in this model; "
                            "drop --freeze-until-index")
    return found


# -----------------------------------------------------------------------------
# The freeze itself

class FrozenRows:
    """Keep rows < until_index of the embedding and output head unchanged.

    Usage in a training loop:
        frozen = FrozenRows(model, until_index, vocab_size)
        ... loss.backward(); opt.step() for each optimizer; frozen.restore() ...
    """

    def __init__(self, model, until_index, vocab_size=None):
        vocab_size = vocab_size if vocab_size is not None else getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is not None and until_index > vocab_size:
            raise NanochatError(f"--freeze-until-index {until_index} is above the vocab size {vocab_size}; "
                                f"use a value between 0 and {vocab_size}")
        if until_index < 0:
            raise NanochatError(f"--freeze-until-index must be >= 0 (got {until_index})")
        self.until_index = int(until_index)
        self.params = vocab_parameters(model) if self.until_index > 0 else []
        self.snapshots = []
        self.handles = []
        for name, weight in self.params:
            if weight.shape[0] < self.until_index:
                raise NanochatError(f"--freeze-until-index {self.until_index} is above the {name} rows "
                                    f"({weight.shape[0]}); use a smaller index")
            self.snapshots.append(weight.detach()[: self.until_index].clone())
            self.handles.append(weight.register_hook(self._zero_frozen_grad))

    def _zero_frozen_grad(self, grad):
        grad = grad.clone()
        grad[: self.until_index] = 0
        return grad

    @torch.no_grad()
    def restore(self):
        """Copy the frozen rows back (call after every optimizer step): undoes weight decay and
        momentum-driven updates so the rows stay bit-identical."""
        for (_, weight), snapshot in zip(self.params, self.snapshots):
            weight[: self.until_index].copy_(snapshot)

    @torch.no_grad()
    def unchanged(self):
        """True if every frozen row still equals its snapshot bit for bit."""
        return all(torch.equal(weight[: self.until_index], snapshot)
                   for (_, weight), snapshot in zip(self.params, self.snapshots))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def describe(self):
        if self.until_index == 0:
            return "no rows frozen"
        names = ", ".join(name for name, _ in self.params)
        return f"rows < {self.until_index} of {names} frozen"
