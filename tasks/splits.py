"""
Held-out splits for the generated offline tasks: an item belongs to a split by a hash of its identity
(a word, a problem's text), so train, val and test never share an item whatever the sizes or seeds.
"""

import hashlib

SPLITS = ("train", "val", "test")


def split_of(key):
    """'test' for 1 in 10 keys, 'val' for 1 in 10, 'train' for the rest; stable across runs/machines."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big") % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split
