"""nanochat's byte-level BPE trainer: the Rust extension built from this directory (src/*.rs).

Same surface as PyPI rustbpe 0.1.0: `Tokenizer().train_from_iterator(iterator, vocab_size,
buffer_size=8192, pattern=None)`, `get_pattern()`, `get_mergeable_ranks()`, `encode(text)`,
`batch_encode(texts)`, `decode(ids)`, `vocab_size`. Plus `split_text(text, pattern=None)` and
`DEFAULT_PATTERN` (GPT-4's split with numbers in groups of at most two digits).
"""

try:
    from .rustbpe import *  # noqa: F401,F403  (the compiled extension, put here by `pip install -e .`)
except ImportError as e:
    raise ImportError(
        f"the rustbpe extension is not built in {__path__[0]} ({e}); run `pip install -e .` from the repository root"
    ) from e
