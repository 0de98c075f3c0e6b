"""
Grow a tokenizer's vocabulary without renumbering any existing id (new tokens for a new language or
domain); `scripts.tok_extend` is its command line and `scripts.extend_checkpoint` grows a model to match.

Every existing id keeps its token; new tokens get ids V0, V0+1, ... after everything there was,
so a model's embedding rows < V0 still mean what they meant. For BPE this puts new merges *after*
the special tokens; tiktoken does not need ranks to be contiguous, only unique. Tokens of a second
BPE tokenizer are appended in that tokenizer's own rank order, skipping bytes we already have: each
of its tokens was learned as the merge of two of its earlier tokens, which by then are either ours
already or appended before it, so every appended token is (like every trained one) the merge of two
lower-ranked tokens, i.e. a valid tiktoken mergeable rank. Text is still encoded by rank, so old
merges come first, and a text chunk that contains no new token's bytes encodes exactly as before.
"""

from nanochat.common import NanochatError
from nanochat.hf_tokenizer import HFTokenizer
from nanochat.tokenizer import CharTokenizer, RustBPETokenizer


def extend_tokenizer(tokenizer, add_special=(), from_tokenizer=None):
    """Return a new tokenizer = `tokenizer` + `from_tokenizer`'s missing tokens + the new special names.
    Tokens/specials already present are not duplicated. Records parent fingerprint and original size."""
    v0 = tokenizer.get_vocab_size()
    next_id = v0
    specials = dict(tokenizer.special_tokens)
    lineage = {"parent_fingerprint": tokenizer.fingerprint, "original_vocab_size": v0}
    if from_tokenizer is not None and from_tokenizer.kind != tokenizer.kind:
        raise NanochatError(f"cannot add tokens of a {from_tokenizer.kind} tokenizer to a {tokenizer.kind} one; "
                            f"train the second tokenizer with the same --tokenizer kind")
    for name in add_special:
        if not (isinstance(name, str) and name.startswith("<|") and name.endswith("|>") and len(name) > 4):
            raise NanochatError(f"special token {name!r} must look like <|name|>")

    if tokenizer.kind == "bpe":
        ranks = dict(tokenizer.mergeable_ranks)
        if from_tokenizer is not None:
            if from_tokenizer.pattern != tokenizer.pattern:
                raise NanochatError("the second tokenizer was trained with a different split pattern; "
                                    "retrain it with the same pattern as the one being extended")
            for token, _ in sorted(from_tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1]):
                if token in ranks:
                    continue
                if not any(token[:k] in ranks and token[k:] in ranks for k in range(1, len(token))):
                    raise NanochatError("the second tokenizer is not a byte-level BPE (a token is not the merge of "
                                        "two earlier ones); train it with python -m scripts.tok_train")
                ranks[token] = next_id
                next_id += 1
        for name in add_special:
            if name not in specials:
                specials[name] = next_id
                next_id += 1
        return RustBPETokenizer(ranks, specials, pattern=tokenizer.pattern, **lineage)

    if tokenizer.kind == "char":
        id_to_char = dict(tokenizer.id_to_char)
        if from_tokenizer is not None:
            have = set(id_to_char.values())
            for _, c in sorted(from_tokenizer.id_to_char.items()):
                if c not in have:
                    id_to_char[next_id] = c
                    have.add(c)
                    next_id += 1
        for name in add_special:
            if name not in specials:
                specials[name] = next_id
                next_id += 1
        return CharTokenizer(id_to_char, specials, **lineage)

    # hf: only special tokens (the file's own vocabulary and merges are not ours to reorder)
    if from_tokenizer is not None:
        raise NanochatError("adding a second tokenizer's tokens is supported for bpe and char tokenizers, not hf")
    names = sorted(specials, key=lambda name: (specials[name], name)) + [n for n in add_special if n not in specials]
    return HFTokenizer(tokenizer.json_text, special_names=list(dict.fromkeys(names)), **lineage)
