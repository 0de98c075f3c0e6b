"""
The pretraining data loader: documents -> BOS-aligned packed rows -> (inputs, targets) on the device.

- Source: parquet row groups of the split (text mode, tokenized in a background thread with the
  tokenizer's batch encode, BOS prepended) or pre-tokenized shards (`python -m nanochat.dataset
  --pretokenize`; documents are BOS-separated runs of ids, cut into fixed-size blocks). Either way
  the source is a list of "groups" of documents; rank r of w reads groups r, r+w, r+2w, ...
- Packing (best fit): a buffer of `buffer_docs` documents; each row of T+1 tokens is filled by
  repeatedly taking the longest buffered document that still fits, so every row starts with BOS
  (each document begins with one). Only when no document fits the remaining space is one cropped
  (the shortest, wasting least) to its first token plus a window of the rest, and the tokens outside the
  window are dropped. The window moves with the pass over the data: pass 0 takes the document's start,
  pass e the text about e rows further on, so a long document is not the same few hundred tokens in
  every epoch (a small model on a small corpus goes through it several times). Only the train split
  moves its windows: the val split always crops to a document's start, whatever pass its packing
  buffer has reached, so a validation figure means the same rows in every run.
- Exact resume: a document is named by (epoch, group, index in group). `state_dict()` records the
  position of the next unread document and the names of the buffered ones; `load_state_dict()`
  re-reads those documents, so a resumed run produces exactly the batches an uninterrupted one would.
- The train split repeats forever (epochs); so does val (evaluators take a fixed number of batches
  from a fresh loader, so evaluation is deterministic).
"""

import bisect
import queue
import threading

import numpy as np
import torch

from nanochat.common import NanochatError

STATE_VERSION = 1


def cropped_window(doc, size, epoch, stride):
    """`size` tokens of a document longer than that: its first token (BOS) and the window of size - 1
    tokens that starts epoch * stride tokens into the rest (wrapping around, never past its end)."""
    width = size - 1
    last_start = len(doc) - 1 - width  # >= 1: the document does not fit
    start = (epoch * stride) % (last_start + 1)
    return np.concatenate([doc[:1], doc[1 + start:1 + start + width]])


# -----------------------------------------------------------------------------
# Sources: a numbered list of document groups, each readable on its own (for resume).

class ParquetTextSource:
    """Row groups of the split's parquet shards, numbered across files as dataset.iter_row_groups
    does; rank r takes r, r+w, ... Row groups are read directly by index so that any one can be
    re-read on resume (to rebuild the packing buffer) without scanning the ones before it."""

    kind = "text"

    def __init__(self, tokenizer, split, rank, world_size, data_dir=None, num_threads=4):
        import pyarrow.parquet as pq
        from nanochat import dataset
        files = dataset.split_files(split, data_dir)
        groups = []
        for path in files:
            num = pq.ParquetFile(path).metadata.num_row_groups
            groups.extend((path, i) for i in range(num))
        self.groups = groups[rank::world_size]
        if not self.groups:
            raise NanochatError(f"the {split} split has {len(groups)} row groups, fewer than the {world_size} ranks; "
                                f"use fewer processes or more data")
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.num_threads = num_threads
        self.fingerprint = tokenizer.fingerprint

    def __len__(self):
        return len(self.groups)

    def read_texts(self, k):
        import pyarrow.parquet as pq
        path, rg = self.groups[k]
        return pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()

    def read_group(self, k):
        """Documents of group k as int32 arrays, each starting with BOS."""
        texts = self.read_texts(k)
        rows = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads) if texts else []
        return [np.asarray(r, dtype=np.int32) for r in rows]


class PretokenizedSource:
    """Pre-tokenized shards: every file is cut into blocks of `block_tokens`; a block's documents are
    those whose BOS lies inside it (the last may run into the next block)."""

    kind = "pretokenized"

    def __init__(self, arrays, bos_id, rank, world_size, fingerprint, block_tokens=1 << 20):
        self.arrays = arrays
        self.bos = bos_id
        self.fingerprint = fingerprint
        groups = []
        for f, arr in enumerate(arrays):
            groups.extend((f, s, min(s + block_tokens, len(arr))) for s in range(0, len(arr), block_tokens))
        self.groups = groups[rank::world_size]
        if not self.groups:
            raise NanochatError(f"pre-tokenized data has {len(groups)} blocks, fewer than the {world_size} ranks; use fewer processes")

    def __len__(self):
        return len(self.groups)

    def _next_bos(self, arr, pos):
        """First BOS at or after pos (or len(arr))."""
        step = 1 << 16
        while pos < len(arr):
            hits = np.flatnonzero(arr[pos:pos + step] == self.bos)
            if len(hits):
                return pos + int(hits[0])
            pos += step
        return len(arr)

    def read_group(self, k):
        f, start, end = self.groups[k]
        arr = self.arrays[f]
        starts = (start + np.flatnonzero(arr[start:end] == self.bos)).tolist()
        if not starts:
            return []
        bounds = starts + [self._next_bos(arr, end)]
        return [np.asarray(arr[a:b], dtype=np.int32) for a, b in zip(bounds[:-1], bounds[1:])]


# -----------------------------------------------------------------------------
# The loader

class DistributedDataLoader:
    """Iterate to get (inputs, targets), both (B, T) int64 on `device`; inputs[:, 0] is BOS and
    targets[:, t] == inputs[:, t+1]."""

    def __init__(self, source, B, T, device="cpu", buffer_docs=256, prefetch_groups=4, resume_state=None,
                 moving_crops=True):
        if B <= 0 or T <= 0:
            raise ValueError("B and T must be positive")
        self.source = source
        self.B, self.T = B, T
        self.row_len = T + 1
        self.device = torch.device(device)
        self.buffer_docs = buffer_docs
        self.moving_crops = moving_crops  # a cropped document's window moves with the pass (see above)
        self.prefetch_groups = prefetch_groups
        # position of the next unread document: (epoch, group k, doc j in group k)
        self.epoch, self.k, self.j = 0, 0, 0
        # the packing buffer, sorted by key (length, epoch, k, j); docs[i] belongs to keys[i]
        self.keys, self.docs = [], []
        self.tokens_kept = 0      # tokens that went into rows
        self.tokens_cropped = 0   # tokens dropped from cropped documents
        self._thread = None
        self._queue = None
        self._stop = None
        self._current = None      # (epoch, k, docs) of the group being read
        if resume_state is not None:
            self.load_state_dict(resume_state)

    # --- state -----------------------------------------------------------------------

    def state_dict(self):
        return {
            "version": STATE_VERSION, "source": self.source.kind, "fingerprint": self.source.fingerprint,
            "num_groups": len(self.source), "row_len": self.row_len, "buffer_docs": self.buffer_docs,
            "epoch": self.epoch, "k": self.k, "j": self.j,
            "buffer": [list(key[1:]) for key in self.keys],
            "tokens_kept": self.tokens_kept, "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state):
        """Continue exactly where the run that saved `state` stopped."""
        mine = self.state_dict()
        for field in ("version", "source", "fingerprint", "num_groups", "row_len", "buffer_docs"):
            if state.get(field) != mine[field]:
                raise NanochatError(
                    f"cannot resume the data loader: its saved {field} is {state.get(field)!r} but this run has {mine[field]!r} "
                    f"(same data, tokenizer, --max-seq-len and number of processes are needed to resume exactly)")
        self._shutdown()
        self.epoch, self.k, self.j = state["epoch"], state["k"], state["j"]
        self.tokens_kept, self.tokens_cropped = state["tokens_kept"], state["tokens_cropped"]
        self.keys, self.docs = [], []
        cache = {}
        for epoch, k, j in state["buffer"]:
            if k not in cache:
                cache[k] = self.source.read_group(k)
            self._insert((len(cache[k][j]), epoch, k, j), cache[k][j])

    # --- background reading/tokenizing of groups ----------------------------------------

    def _start(self):
        self._queue = queue.Queue(maxsize=self.prefetch_groups)
        self._stop = threading.Event()
        start_epoch, start_k = self.epoch, self.k

        def produce():
            epoch, k, empty_run = start_epoch, start_k, 0
            try:
                while not self._stop.is_set():
                    docs = self.source.read_group(k)
                    empty_run = 0 if docs else empty_run + 1
                    if empty_run > len(self.source):
                        raise NanochatError("the data split has no documents; check the shards")
                    while not self._stop.is_set():
                        try:
                            self._queue.put((epoch, k, docs), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    k += 1
                    if k == len(self.source):
                        epoch, k = epoch + 1, 0
            except BaseException as e:  # hand the error to the consumer (unless it has gone away)
                while not self._stop.is_set():
                    try:
                        self._queue.put(e, timeout=0.1)
                        break
                    except queue.Full:
                        continue

        self._thread = threading.Thread(target=produce, name="dataloader-tokenize", daemon=True)
        self._thread.start()

    def _shutdown(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        self._thread = self._queue = self._stop = None
        self._current = None

    def close(self):
        self._shutdown()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:
            pass

    def _next_doc(self):
        """Take the next document of the stream: (key, tokens)."""
        if self._thread is None:
            self._start()
        while True:
            if self._current is None or self._current[1] != self.k or self._current[0] != self.epoch:
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                assert item[:2] == (self.epoch, self.k), "data loader groups arrived out of order"
                self._current = item
            docs = self._current[2]
            if self.j < len(docs):
                key, doc = (len(docs[self.j]), self.epoch, self.k, self.j), docs[self.j]
                self.j += 1
                if self.j == len(docs):
                    self._advance_group()
                return key, doc
            self._advance_group()

    def _advance_group(self):
        self.j = 0
        self.k += 1
        if self.k == len(self.source):
            self.epoch, self.k = self.epoch + 1, 0

    # --- best-fit packing --------------------------------------------------------------

    def _insert(self, key, doc):
        i = bisect.bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.docs.insert(i, doc)

    def _pop(self, i):
        self.keys.pop(i)
        return self.docs.pop(i)

    def _fill_row(self, out):
        """Fill out (row_len,) int32 with whole documents, best fit first; crop one only if none fits."""
        pos = 0
        while pos < self.row_len:
            while len(self.keys) < self.buffer_docs:
                self._insert(*self._next_doc())
            space = self.row_len - pos
            # the longest document of length <= space (keys sort by length first)
            i = bisect.bisect_right(self.keys, (space, float("inf"))) - 1
            if i >= 0:
                doc = self._pop(i)
                out[pos:pos + len(doc)] = doc
                pos += len(doc)
                self.tokens_kept += len(doc)
            else:
                key = self.keys[0]
                doc = self._pop(0)  # nothing fits: crop the shortest, wasting least
                epoch = key[1] if self.moving_crops else 0
                out[pos:] = cropped_window(doc, space, epoch=epoch, stride=self.row_len - 1)
                self.tokens_kept += space
                self.tokens_cropped += len(doc) - space
                pos = self.row_len

    def next_batch(self):
        rows = np.empty((self.B, self.row_len), dtype=np.int32)
        for b in range(self.B):
            self._fill_row(rows[b])
        batch = torch.from_numpy(rows).to(torch.int64)  # (B, T+1)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        inputs = batch[:, :-1].to(self.device, non_blocking=True)
        targets = batch[:, 1:].to(self.device, non_blocking=True)
        return inputs, targets

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def waste_fraction(self):
        total = self.tokens_kept + self.tokens_cropped
        return self.tokens_cropped / total if total else 0.0


# -----------------------------------------------------------------------------
# Constructors

def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", rank=0, world_size=1, resume_state=None,
                                       buffer_docs=256, num_threads=4, data_dir=None):
    """Text mode: stream the split's parquet shards and tokenize on the fly."""
    source = ParquetTextSource(tokenizer, split, rank, world_size, data_dir=data_dir, num_threads=num_threads)
    return DistributedDataLoader(source, B, T, device=device, buffer_docs=buffer_docs, resume_state=resume_state,
                                 moving_crops=split == "train")


def pretokenized_distributed_data_loader(pretok_dir, tokenizer, model_vocab_size, B, T, split, device="cpu", rank=0,
                                         world_size=1, resume_state=None, buffer_docs=256, block_tokens=1 << 20):
    """Pre-tokenized mode: refuses shards written by another tokenizer (fingerprint) and ids >= model_vocab_size
    (both checked by pretokenized.load_pretokenized before any data is used)."""
    from nanochat import pretokenized
    arrays = pretokenized.load_pretokenized(pretok_dir, tokenizer.fingerprint, model_vocab_size, split=split)
    source = PretokenizedSource(arrays, tokenizer.get_bos_token_id(), rank, world_size, tokenizer.fingerprint,
                                block_tokens=block_tokens)
    return DistributedDataLoader(source, B, T, device=device, buffer_docs=buffer_docs, resume_state=resume_state,
                                 moving_crops=split == "train")
