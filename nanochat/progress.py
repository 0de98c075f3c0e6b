"""
Progress of long jobs (downloads, tokenizer training, evaluation): one helper built on tqdm.

On a terminal it is tqdm's live bar. Anywhere else (a log file, CI, `tee`) a bar redrawn with carriage
returns turns into one unreadable line, so there the same bar is written as plain lines, one per update,
at most one every `log_every_s` seconds (plus the final state). Under torchrun only rank 0 shows progress.

    for doc in progress(docs, total=len(docs), desc="tokenizing", unit="doc"):
        ...
    with progress(total=n_bytes, desc="shard_00001.parquet", unit="B", unit_scale=True) as bar:
        bar.update(len(chunk))
"""

import os
import sys

from tqdm import tqdm


class _LineStream:
    """A file for tqdm that turns each redraw ('\\r' + bar) into one finished line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def is_interactive(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def progress(iterable=None, total=None, desc=None, unit="it", unit_scale=False, stream=None, log_every_s=10.0,
             disable=None):
    """A tqdm bar over `iterable` (or a manual one with .update(n)): live on a terminal, plain lines elsewhere."""
    stream = stream if stream is not None else sys.stderr
    if disable is None:
        disable = int(os.environ.get("RANK", "0")) != 0
    common = dict(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=disable)
    if is_interactive(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    return tqdm(iterable, file=_LineStream(stream), mininterval=log_every_s, maxinterval=max(log_every_s, 1.0),
                ascii=True, ncols=100, **common)
