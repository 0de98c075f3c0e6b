"""
A slow, obviously-correct byte-level BPE in pure Python: the specification rustbpe is tested against.

Training: split each document with the pattern (Python's `regex` module), count the chunks, then
repeat `vocab_size - 256` times: count every adjacent pair over all chunks (weighted by how often
the chunk occurs), merge the most frequent pair everywhere (non-overlapping, left to right), and
break ties by the smaller pair (left id, then right id). Stops early when no pair is left.
Encoding: per chunk, repeatedly merge the adjacent pair with the lowest merge id, leftmost first.
"""

from collections import Counter

import regex

DEFAULT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def split(text, pattern=DEFAULT_PATTERN):
    return regex.findall(pattern, text)


def merge_word(word, pair, new_id):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train(texts, vocab_size, pattern=DEFAULT_PATTERN):
    """Returns the merges, in order: merge k is the pair that became token 256 + k."""
    chunk_counts = Counter(chunk for text in texts for chunk in split(text, pattern))
    words = {tuple(chunk.encode("utf-8")): n for chunk, n in chunk_counts.items()}
    merges = []
    for new_id in range(256, vocab_size):
        pair_counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        # highest count first, then the smallest pair
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            merged[merge_word(word, best, new_id)] += n
        words = merged
    return merges


def token_bytes(merges):
    vocab = [bytes([b]) for b in range(256)]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    return vocab


def encode(text, merges, pattern=DEFAULT_PATTERN):
    ranks = {pair: 256 + i for i, pair in enumerate(merges)}
    ids = []
    for chunk in split(text, pattern):
        word = list(chunk.encode("utf-8"))
        while len(word) >= 2:
            candidates = [(ranks[p], i) for i, p in enumerate(zip(word, word[1:])) if p in ranks]
            if not candidates:
                break
            new_id, i = min(candidates)
            word[i : i + 2] = [new_id]
        ids.extend(word)
    return ids
