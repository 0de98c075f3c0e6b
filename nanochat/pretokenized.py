"""
Pre-tokenized shards: the token ids of every shard on disk, tied to one tokenizer by its fingerprint,
so training reads tokens instead of encoding text on the fly.

    python -m nanochat.dataset --pretokenize   # -> <base>/base_data_tok/<fingerprint[:16]>/

Layout: train_00000.bin, ..., val_00000.bin (uint16 ids, uint32 for vocabularies over 65536, each document
prefixed with BOS) and meta.json, written last, so its presence means the directory is complete.
`load_pretokenized` checks the files against the model's tokenizer fingerprint and vocab size.
"""

import contextlib
import itertools
import os
import sys

from nanochat.common import NanochatError, atomic_path, atomic_write_json, get_base_dir, read_json
from nanochat.dataset import default_data_dir, iter_file_row_groups, make_readable, split_files
from nanochat.progress import progress

PRETOK_META = "meta.json"
# tokens sampled per check when verifying a file's recorded max_id against its data
_VERIFY_BLOCK = 1 << 16
_VERIFY_BLOCKS = 8


def pretokenized_dir(fingerprint, base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "base_data_tok", fingerprint[:16])


def token_dtype(vocab_size):
    return "uint16" if vocab_size < 65536 else "uint32"


def pretokenize(tokenizer, data_dir=None, out_dir=None, overwrite=False):
    """Encode every shard (each document prefixed with BOS) into train_XXXXX.bin / val_00000.bin
    and write meta.json last; meta.json's presence means the directory is complete."""
    import numpy as np
    data_dir = data_dir or default_data_dir()
    fingerprint = tokenizer.fingerprint
    out_dir = out_dir or pretokenized_dir(fingerprint)
    meta_path = os.path.join(out_dir, PRETOK_META)
    groups = [("train", split_files("train", data_dir)), ("val", split_files("val", data_dir))]
    sources = [(os.path.basename(p), os.path.getsize(p)) for _, paths in groups for p in paths]
    if os.path.exists(meta_path) and not overwrite:
        meta = read_json(meta_path, "pre-tokenized shard metadata")
        done = [(f.get("source"), f.get("source_bytes")) for f in meta.get("files", [])]
        if meta.get("fingerprint") == fingerprint and done == sources:
            print(f"already pre-tokenized in {out_dir}; pass --overwrite to redo it", flush=True)
            return out_dir
    vocab_size = tokenizer.get_vocab_size()
    bos = tokenizer.get_bos_token_id()
    dtype = token_dtype(vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(meta_path)  # the directory is incomplete until the new meta.json lands
    shards = [(split, k, path) for split, paths in groups for k, path in enumerate(paths)]
    files = []
    bar = progress(total=len(shards), desc="pre-tokenizing shards", unit="shard", stream=sys.stdout)
    for split, k, path in shards:
        name = f"{split}_{k:05d}.bin"
        num_tokens, max_id = 0, -1
        with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "wb") as f:
            for texts in iter_file_row_groups(path):
                ids = tokenizer.encode(texts, prepend=bos)
                if not ids:
                    continue
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
                if flat.size:
                    if flat.min() < 0 or flat.max() >= vocab_size:
                        raise NanochatError(f"tokenizer produced id {int(flat.max())} outside its vocab of "
                                            f"{vocab_size}; the tokenizer is broken, retrain it")
                    max_id = max(max_id, int(flat.max()))
                    f.write(flat.astype(dtype).tobytes())
                    num_tokens += flat.size
            make_readable(tmp)
        files.append({"name": name, "split": split, "source": os.path.basename(path),
                      "source_bytes": os.path.getsize(path), "num_tokens": num_tokens, "max_id": max_id})
        bar.set_postfix_str(f"{sum(f['num_tokens'] for f in files):,} tokens", refresh=False)
        bar.update(1)
    bar.close()
    meta = {"fingerprint": fingerprint, "vocab_size": vocab_size, "dtype": dtype, "bos_id": bos,
            "data_dir": os.path.abspath(data_dir), "files": files}
    atomic_write_json(meta_path, meta)
    make_readable(meta_path)
    print(f"pre-tokenized {sum(f['num_tokens'] for f in files):,} tokens ({dtype}) into {out_dir}", flush=True)
    return out_dir


def load_pretokenized(directory, expected_fingerprint, model_vocab_size, split="train"):
    """Memory-mapped token arrays of one split, after checking that they were made by the
    expected tokenizer and that every id fits the model's vocab. Raises NanochatError otherwise."""
    import numpy as np
    meta_path = os.path.join(directory, PRETOK_META)
    if not os.path.exists(meta_path):
        raise NanochatError(f"no pre-tokenized shards in {directory} (meta.json missing); "
                            f"run `python -m nanochat.dataset --pretokenize`")
    meta = read_json(meta_path, "pre-tokenized shard metadata")
    if meta.get("fingerprint") != expected_fingerprint:
        raise NanochatError(f"pre-tokenized shards in {directory} were made by tokenizer {meta.get('fingerprint')} "
                            f"but the model uses tokenizer {expected_fingerprint}; run "
                            f"`python -m nanochat.dataset --pretokenize` with the model's tokenizer")
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise NanochatError(f"{meta_path} has unknown dtype {dtype!r}; delete {directory} and pre-tokenize again")
    arrays = []
    for entry in meta["files"]:
        if entry.get("split") != split:
            continue
        path = os.path.join(directory, entry["name"])
        if entry["max_id"] >= model_vocab_size:
            raise NanochatError(f"{path} holds token id {entry['max_id']} but the model's vocab size is "
                                f"{model_vocab_size}; the model and the data disagree on the tokenizer")
        itemsize = np.dtype(dtype).itemsize
        if not os.path.exists(path) or os.path.getsize(path) != entry["num_tokens"] * itemsize:
            raise NanochatError(f"{path} is missing or not {entry['num_tokens']} tokens long; "
                                f"delete {directory} and pre-tokenize again")
        if entry["num_tokens"] == 0:
            continue
        tokens = np.memmap(path, dtype=dtype, mode="r")
        _verify_tokens(tokens, entry, meta, path, model_vocab_size)
        arrays.append(tokens)
    if not arrays:
        raise NanochatError(f"no {split} tokens in {directory}; pre-tokenize again")
    return arrays


def _verify_tokens(tokens, entry, meta, path, model_vocab_size):
    """Cheap spot check that the bytes match the metadata: a few blocks spread over the file must
    not hold ids above the recorded max_id, and the file must start with BOS."""
    n = len(tokens)
    starts = sorted({min(n - 1, (n * k) // _VERIFY_BLOCKS) for k in range(_VERIFY_BLOCKS)}
                    | {max(0, n - _VERIFY_BLOCK)})
    seen = max(int(tokens[s:s + _VERIFY_BLOCK].max()) for s in starts)
    limit = min(entry["max_id"], model_vocab_size - 1)
    if seen > limit:
        raise NanochatError(f"{path} holds token id {seen}, above its recorded max id {entry['max_id']} "
                            f"(model vocab {model_vocab_size}); the file is corrupt: delete it and pre-tokenize again")
