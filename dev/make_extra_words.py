"""
Write tasks/words_extra.txt: the extra train-split words of the spelling tasks.

The spelling tasks ask about the words of tasks/words.txt, split into train/val/test by a hash of
the word. A small model can only spell a held-out word if it has seen the letters of that word's
tokens, so the train split also gets the prose words and identifiers that occur at least twice in
the comments and docstrings of Python's standard library and in its language reference (the same
text the embedded corpus is made of), minus every word of words.txt. The list depends on the
Python version; the committed file was made with CPython 3.11.

    python -m dev.make_extra_words              # rewrites tasks/words_extra.txt
"""

import argparse
import collections
import os
import re
import sysconfig

from tasks.spellingbee import EXTRA_TRAIN_WORDS_PATH, load_words

WORD = re.compile(r"(?<![A-Za-z0-9_])[a-z]{3,14}(?![A-Za-z0-9_])")
DOCSTRING = re.compile(r'"""(.*?)"""', re.S)
COMMENT = re.compile(r"#(.*)")
HEADER = """\
# Extra lower-case words for the spelling tasks' train split only (val/test stay the words.txt ones):
# prose words and identifiers seen at least twice in the comments and docstrings of Python's
# standard library and in its language reference, minus every word of words.txt. Made by
# python -m dev.make_extra_words.
"""


def stdlib_prose():
    """The language reference, then every stdlib module's docstrings and comments (tests excluded)."""
    from pydoc_data.topics import topics
    yield from topics.values()
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__", "test", "tests", "idlelib"))
        for name in sorted(files):
            if not name.endswith((".py", ".txt", ".rst")):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            yield "\n".join(DOCSTRING.findall(text) + COMMENT.findall(text))


def main():
    parser = argparse.ArgumentParser(description="Write the spelling tasks' extra train-split words.")
    parser.add_argument("--min-count", type=int, default=2, help="occurrences a word needs")
    parser.add_argument("--out", default=EXTRA_TRAIN_WORDS_PATH)
    args = parser.parse_args()
    counts = collections.Counter()
    for text in stdlib_prose():
        counts.update(WORD.findall(text))
    known = set(load_words())
    words = sorted((w for w, c in counts.items() if c >= args.min_count and w not in known),
                   key=lambda w: (-counts[w], w))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(HEADER + "".join(w + "\n" for w in words))
    print(f"{len(words)} words -> {args.out}")


if __name__ == "__main__":
    main()
