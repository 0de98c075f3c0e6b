"""
The shared tokenizer: text <-> token ids, the conversation special tokens, and
`render_conversation` (ids + supervision mask) for chat training.

Three kinds share one interface (see dev/CONTRACTS.md):
- RustBPETokenizer ("bpe"): byte-level BPE trained with `rustbpe`, encoded with `tiktoken`
  built from the learned mergeable ranks (fast, multithreaded batch encode).
- CharTokenizer ("char"): one id per character seen in the training corpus, for tiny experiments.
- HFTokenizer ("hf"): a Hugging Face `tokenizers` tokenizer.json (bring your own tokenizer), in
  nanochat/hf_tokenizer.py; growing a vocabulary is nanochat/vocab_extension.py.

A tokenizer lives in a directory: `manifest.json` {kind, pattern, vocab_size, special_tokens,
fingerprint, parent_fingerprint, original_vocab_size}, the kind's data file (ranks.tiktoken,
vocab.json or tokenizer.json) and `token_bytes.json`. The fingerprint is a sha256 over everything
that decides token ids (kind, split pattern, every token's bytes in id order, special tokens and
their ids); loading recomputes it, so a tokenizer edited after training is caught before any
data or checkpoint is built with it.
"""

import base64
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile

from nanochat.common import NanochatError, atomic_write_json, get_base_dir, read_json

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, written back into the stream
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (not 3):
# a smaller vocab spends fewer ids on 3-digit numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# CharTokenizer only: characters not in the training corpus encode to this id (and decode to U+FFFD),
# so unseen text never crashes training/eval and never silently aliases to a real character.
UNK_TOKEN = "<|unk|>"

MANIFEST = "manifest.json"
TOKEN_BYTES = "token_bytes.json"
RANKS_FILE = "ranks.tiktoken"
CHAR_VOCAB_FILE = "vocab.json"
HF_FILE = "tokenizer.json"


def default_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


# -----------------------------------------------------------------------------
# Fingerprint: sha256 over a canonical serialization of what decides token ids.

def compute_fingerprint(kind, pattern, pieces, special_tokens):
    """pieces: iterable of (id, bytes) for the non-special tokens (any order; hashed sorted by id).
    special_tokens: {name: id}."""
    h = hashlib.sha256()
    header = {"kind": kind, "pattern": pattern,
              "special_tokens": sorted([int(i), name] for name, i in special_tokens.items())}
    h.update(json.dumps(header, sort_keys=True, ensure_ascii=True).encode("ascii"))
    for token_id, data in sorted(pieces, key=lambda p: p[0]):
        h.update(b"\n%d:%d:" % (token_id, len(data)))
        h.update(data)
    return h.hexdigest()


def check_fingerprint(expected, actual, expected_from, actual_from):
    """Raise a NanochatError naming both fingerprints and where each came from, if they differ."""
    if expected != actual:
        raise NanochatError(
            f"tokenizer fingerprint mismatch: {expected_from} has {expected} but {actual_from} has {actual}; "
            f"use the tokenizer the data/checkpoint was built with, or rebuild them with this tokenizer")


# -----------------------------------------------------------------------------
# The shared interface: special tokens, encode wrappers, conversation rendering.

class _TokenizerBase:
    """What every kind shares; a kind adds its vocabulary, encoding and files."""
    kind = None
    pattern = None

    def __init__(self, special_tokens, parent_fingerprint=None, original_vocab_size=None):
        self.special_tokens = {name: int(i) for name, i in special_tokens.items()}  # name -> id
        self.parent_fingerprint = parent_fingerprint
        self._original_vocab_size = original_vocab_size

    # --- what subclasses provide: _encode_batch(texts, num_threads), decode(ids), _token_bytes_of(id),
    #     get_vocab_size(), fingerprint, _save_files(directory)

    @property
    def original_vocab_size(self):
        """Vocab size before the last extension (equal to the vocab size if never extended)."""
        return self._original_vocab_size if self._original_vocab_size is not None else self.get_vocab_size()

    def get_special_tokens(self):
        return set(self.special_tokens)

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; this tokenizer has {sorted(self.special_tokens)}")
        return self.special_tokens[name]

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def _as_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """text: str -> list[int]; list[str] -> list[list[int]]. prepend/append: an id or a special name.
        Special-token strings inside `text` are encoded as ordinary text, never as specials."""
        single = isinstance(text, str)
        if not single and not isinstance(text, (list, tuple)):
            raise TypeError(f"encode expects str or list of str, got {type(text).__name__}")
        rows = self._encode_batch([text] if single else list(text), num_threads)
        if prepend is not None or append is not None:
            head = [] if prepend is None else [self._as_id(prepend)]
            tail = [] if append is None else [self._as_id(append)]
            rows = [head + row + tail for row in rows]
        return rows[0] if single else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def token_bytes(self):
        """Byte length of every id's text (0 for special tokens), for bits-per-byte."""
        specials = set(self.special_tokens.values())
        return [0 if i in specials else self._token_bytes_of(i) for i in range(self.get_vocab_size())]

    # --- conversations

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize a chat conversation -> (ids, mask), mask[i] = 1 where the model is trained to predict
        ids[i] (the assistant's own tokens), 0 elsewhere (BOS, user turns, tool outputs, <|assistant_start|>)."""
        ids, mask = [], []

        def add(token_ids, supervised):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([int(supervised)] * len(token_ids))

        messages = _validated_messages(conversation)
        add(self.get_bos_token_id(), False)
        for message in messages:
            if message["role"] == "user":
                add(self.encode_special("<|user_start|>"), False)
                add(self.encode(message["content"]), False)
                add(self.encode_special("<|user_end|>"), False)
                continue
            add(self.encode_special("<|assistant_start|>"), False)
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, True)
                elif part["type"] == "python":
                    add(self.encode_special("<|python_start|>"), True)
                    add(text_ids, True)
                    add(self.encode_special("<|python_end|>"), True)
                else:  # python_output: written by the tool at inference time, never predicted
                    add(self.encode_special("<|output_start|>"), False)
                    add(text_ids, False)
                    add(self.encode_special("<|output_end|>"), False)
            add(self.encode_special("<|assistant_end|>"), True)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """For RL/eval: drop the final assistant message and prime the model with <|assistant_start|>."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is the assistant's")
        conversation = copy.deepcopy(conversation)
        conversation["messages"].pop()
        ids, _ = self.render_conversation(conversation, max_tokens=sys.maxsize)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, color=None):
        """A string showing every token with its mask, for debugging rendered conversations.
        color=None: ANSI colours (green = supervised, red = not) when stdout is a terminal;
        otherwise supervised tokens are shown as [token] and unsupervised as (token)."""
        if color is None:
            color = sys.stdout.isatty()
        out = []
        for token_id, m in zip(ids, mask):
            text = self.id_to_token(token_id).replace("\n", "\\n").replace("\t", "\\t")
            if color:
                out.append(f"\033[{42 if m else 41}m{text}\033[0m")
            else:
                out.append(f"[{text}]" if m else f"({text})")
        return "|".join(out) if not color else "".join(out)

    # --- save / load

    def manifest(self):
        return {
            "kind": self.kind,
            "pattern": self.pattern,
            "vocab_size": self.get_vocab_size(),
            "special_tokens": dict(self.special_tokens),
            "fingerprint": self.fingerprint,
            "parent_fingerprint": self.parent_fingerprint,
            "original_vocab_size": self.original_vocab_size,
        }

    def save(self, directory):
        """Write the tokenizer directory atomically: built in a temp dir beside it, then renamed into
        place, so a crash never leaves a half-written tokenizer behind."""
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + ".", suffix=".tmp", dir=parent)
        try:
            self._save_files(tmp)
            atomic_write_json(os.path.join(tmp, TOKEN_BYTES), self.token_bytes())
            atomic_write_json(os.path.join(tmp, MANIFEST), self.manifest())
            _replace_dir(tmp, directory)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno == 28:
                raise NanochatError(f"disk full while writing the tokenizer to {directory}; free some space") from e
            raise
        return directory


def _replace_dir(new, target):
    """Rename directory `new` to `target`, replacing an existing `target` with at most a moment in
    which `target` is absent (never half-written)."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".", suffix=".old", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _validated_messages(conversation):
    """Check the conversation's shape and return its messages with a leading system message merged
    into the first user message. Raises ValueError saying what is wrong."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("a conversation is a dict {'messages': [...]}")
    messages = list(conversation["messages"])
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {message['role']!r}; use system, user or assistant")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        if not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
            raise ValueError("system and user message content must be strings")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message roles must alternate user/assistant starting with user; "
                             f"message {i} is {message['role']!r} where {expected!r} was expected")
        content = message["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"user message {i} content must be a string, got {type(content).__name__}")
            continue
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"assistant message {i} content must be a string or a list of parts")
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
                raise ValueError(f"assistant message {i} has a part {part!r}; parts are "
                                 f"{{'type': 'text'|'python'|'python_output', 'text': str}}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"assistant message {i} has a {part['type']} part whose 'text' is not a string")
    return messages


# -----------------------------------------------------------------------------
# Byte-level BPE: trained with rustbpe, encoded with tiktoken.

class RustBPETokenizer(_TokenizerBase):
    kind = "bpe"

    def __init__(self, mergeable_ranks, special_tokens, pattern=SPLIT_PATTERN,
                 parent_fingerprint=None, original_vocab_size=None):
        """mergeable_ranks: {bytes: id}; special_tokens: {name: id}. Ids need not be contiguous per
        kind (an extended tokenizer has merges after the specials) but together cover 0..V-1."""
        super().__init__(special_tokens, parent_fingerprint, original_vocab_size)
        import tiktoken
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self._id_to_bytes = {i: b for b, i in self.mergeable_ranks.items()}
        all_ids = set(self._id_to_bytes) | set(self.special_tokens.values())
        n = len(self._id_to_bytes) + len(self.special_tokens)
        if len(all_ids) != n or all_ids != set(range(n)):
            raise NanochatError("BPE tokenizer ids are not exactly 0..V-1 (duplicate or missing ids); "
                                "retrain it with scripts.tok_train")
        self._vocab_size = n
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern,
                                     mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens)
        self.fingerprint = compute_fingerprint(self.kind, pattern, self._id_to_bytes.items(), self.special_tokens)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        """Train BPE on an iterator of strings. vocab_size counts the special tokens, which get the
        last ids. A corpus too small for vocab_size gives a smaller vocab (there is nothing left to merge)."""
        import rustbpe
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise NanochatError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                                f"+ {n_special} special tokens = {256 + n_special} at least")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size - n_special, pattern=pattern)
        ranks = {bytes(b): int(r) for b, r in trainer.get_mergeable_ranks()}
        offset = len(ranks)
        specials = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(ranks, specials, pattern=trainer.get_pattern())

    def get_vocab_size(self):
        return self._vocab_size

    def _encode_batch(self, texts, num_threads):
        if len(texts) == 1:
            return [self.enc.encode_ordinary(texts[0])]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def id_to_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id):
        return self.id_to_bytes(token_id).decode("utf-8", errors="replace")

    def _token_bytes_of(self, token_id):
        return len(self._id_to_bytes[token_id])

    def _save_files(self, directory):
        lines = [f"{base64.b64encode(b).decode('ascii')} {i}" for i, b in sorted(self._id_to_bytes.items())]
        with open(os.path.join(directory, RANKS_FILE), "w", encoding="ascii") as f:
            f.write("\n".join(lines) + "\n")

    @classmethod
    def _load(cls, directory, manifest):
        path = os.path.join(directory, RANKS_FILE)
        ranks = {}
        try:
            with open(path, "r", encoding="ascii") as f:
                for line in f:
                    if line.strip():
                        b64, rank = line.split()
                        ranks[base64.b64decode(b64, validate=True)] = int(rank)
        except FileNotFoundError:
            raise NanochatError(f"tokenizer file missing: {path}; retrain it with python -m scripts.tok_train") from None
        except (ValueError, UnicodeDecodeError):
            raise NanochatError(f"tokenizer file is corrupt: {path}; retrain it with python -m scripts.tok_train") from None
        return cls(ranks, manifest["special_tokens"], pattern=manifest["pattern"],
                   parent_fingerprint=manifest.get("parent_fingerprint"),
                   original_vocab_size=manifest.get("original_vocab_size"))


# -----------------------------------------------------------------------------
# Character-level: one id per character of the training corpus.

class CharTokenizer(_TokenizerBase):
    """Ids: the corpus's characters in sorted order, then <|unk|>, then the 9 special tokens; characters
    added later by scripts.tok_extend get ids after those. Unknown characters encode to <|unk|> (which
    decodes to U+FFFD) rather than raising: val text may hold characters the train split never had."""
    kind = "char"

    def __init__(self, id_to_char, special_tokens, parent_fingerprint=None, original_vocab_size=None):
        """id_to_char: {id: one-character str}; special_tokens: {name: id}; together they cover 0..V-1."""
        super().__init__(special_tokens, parent_fingerprint, original_vocab_size)
        self.id_to_char = {int(i): c for i, c in id_to_char.items()}
        self._char_to_id = {c: i for i, c in self.id_to_char.items()}
        if len(self._char_to_id) != len(self.id_to_char) or any(not isinstance(c, str) or len(c) != 1
                                                                 for c in self.id_to_char.values()):
            raise NanochatError("char tokenizer vocabulary has duplicate or multi-character entries; retrain it")
        if UNK_TOKEN not in self.special_tokens:
            raise NanochatError(f"char tokenizer has no {UNK_TOKEN} token; retrain it with scripts.tok_train")
        self._id_to_special = {i: name for name, i in self.special_tokens.items()}
        all_ids = set(self.id_to_char) | set(self._id_to_special)
        n = len(self.id_to_char) + len(self.special_tokens)
        if len(all_ids) != n or all_ids != set(range(n)):
            raise NanochatError("char tokenizer ids are not exactly 0..V-1; retrain it with scripts.tok_train")
        self._vocab_size = n
        self._unk = self.special_tokens[UNK_TOKEN]
        self.fingerprint = compute_fingerprint(
            self.kind, None, ((i, c.encode("utf-8", errors="surrogatepass")) for i, c in self.id_to_char.items()),
            self.special_tokens)

    @classmethod
    def train_from_iterator(cls, text_iterator):
        chars = set()
        for text in text_iterator:
            chars.update(text)
        chars = sorted(chars)
        names = [UNK_TOKEN] + SPECIAL_TOKENS
        return cls(dict(enumerate(chars)), {name: len(chars) + i for i, name in enumerate(names)})

    def get_vocab_size(self):
        return self._vocab_size

    def _encode_batch(self, texts, num_threads):
        lookup, unk = self._char_to_id, self._unk
        return [[lookup.get(c, unk) for c in text] for text in texts]

    def decode(self, ids):
        return "".join(self.id_to_token(i) for i in ids)

    def id_to_token(self, token_id):
        token_id = int(token_id)
        if token_id == self._unk:
            return "\ufffd"
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self.id_to_char[token_id]

    def _token_bytes_of(self, token_id):
        return len(self.id_to_char[token_id].encode("utf-8", errors="surrogatepass"))

    def _save_files(self, directory):
        # one entry per id: the character, or null where the id is a special token
        table = [self.id_to_char.get(i) for i in range(self._vocab_size)]
        with open(os.path.join(directory, CHAR_VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump(table, f, ensure_ascii=True)

    @classmethod
    def _load(cls, directory, manifest):
        table = read_json(os.path.join(directory, CHAR_VOCAB_FILE), "char tokenizer vocabulary")
        if not isinstance(table, list):
            raise NanochatError(f"char tokenizer vocabulary is corrupt in {directory}; retrain it")
        return cls({i: c for i, c in enumerate(table) if c is not None}, manifest["special_tokens"],
                   parent_fingerprint=manifest.get("parent_fingerprint"),
                   original_vocab_size=manifest.get("original_vocab_size"))


# -----------------------------------------------------------------------------
# Loading

def _tokenizer_class(kind):
    """The class behind a manifest's kind (None if unknown); the HF adapter is imported only when used."""
    if kind == "hf":
        from nanochat.hf_tokenizer import HFTokenizer
        return HFTokenizer
    return {"bpe": RustBPETokenizer, "char": CharTokenizer}.get(kind)


def load_tokenizer(directory=None):
    """Load a tokenizer directory, checking its manifest's fingerprint against its files."""
    directory = os.path.abspath(directory or default_tokenizer_dir())
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise NanochatError(f"no tokenizer in {directory}; train one with python -m scripts.tok_train")
    manifest = read_json(manifest_path, "tokenizer manifest")
    if not isinstance(manifest, dict) or _tokenizer_class(manifest.get("kind")) is None or \
            not isinstance(manifest.get("special_tokens"), dict):
        raise NanochatError(f"tokenizer manifest is corrupt or of unknown kind in {directory}; "
                            f"retrain it with python -m scripts.tok_train")
    tokenizer = _tokenizer_class(manifest["kind"])._load(directory, manifest)
    if tokenizer.fingerprint != manifest.get("fingerprint") or tokenizer.get_vocab_size() != manifest.get("vocab_size"):
        raise NanochatError(
            f"tokenizer manifest fingerprint {manifest.get('fingerprint')} does not match its files "
            f"({tokenizer.fingerprint}) in {directory}: the tokenizer was modified; retrain it with scripts.tok_train")
    return tokenizer


def get_tokenizer():
    return load_tokenizer(default_tokenizer_dir())


def get_token_bytes(device="cpu", tokenizer=None):
    """LongTensor (vocab_size,) of each id's byte length (0 for specials), for bits-per-byte."""
    import torch
    tokenizer = tokenizer or get_tokenizer()
    return torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=device)
