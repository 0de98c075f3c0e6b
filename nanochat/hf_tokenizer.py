"""
Bring your own tokenizer: a Hugging Face `tokenizers` tokenizer.json behind nanochat's tokenizer
interface (kind "hf"). Our conversation special tokens map to the file's own tokens of the same name
when it has them and are appended otherwise; the fingerprint covers the canonical JSON and the
special ids, so the same file always gives the same fingerprint. `round_trip_failure` tells a lossy
tokenizer (one that maps text to [UNK]) from a faithful one before anything is trained with it.
"""

import functools
import json
import os

from nanochat.common import NanochatError
from nanochat.tokenizer import HF_FILE, SPECIAL_TOKENS, _TokenizerBase, compute_fingerprint


@functools.lru_cache(maxsize=1)
def _gpt2_unicode_to_byte():
    """Inverse of the printable-unicode alphabet byte-level BPE (GPT-2, Qwen, ...) uses to write bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


class HFTokenizer(_TokenizerBase):
    """Our 9 conversation tokens are mapped to the file's own tokens of the same name if it has them,
    else added as special tokens after its vocabulary. Special-token strings in text encode as text."""
    kind = "hf"

    def __init__(self, json_text, special_names=None, expected_special_tokens=None,
                 parent_fingerprint=None, original_vocab_size=None):
        """special_names: our special tokens, in the order missing ones are appended (default SPECIAL_TOKENS);
        expected_special_tokens: {name: id} from a manifest, checked against what the file gives."""
        try:
            from tokenizers import AddedToken, Tokenizer
        except ImportError:
            raise NanochatError("hf: tokenizers need the `tokenizers` package; pip install tokenizers") from None
        try:
            tok = Tokenizer.from_str(json_text)
        except Exception as e:
            raise NanochatError(f"not a valid Hugging Face tokenizer.json ({str(e)[:120]})") from None
        self.json_text = json_text
        names = list(special_names) if special_names else list(SPECIAL_TOKENS)
        for name in names:  # one at a time, so ids follow the order of `names`
            if tok.token_to_id(name) is None:
                tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        mapped = {name: tok.token_to_id(name) for name in names}
        if expected_special_tokens is not None and mapped != {k: int(v) for k, v in expected_special_tokens.items()}:
            raise NanochatError("HF tokenizer special-token ids differ from its manifest; re-import it with "
                                "python -m scripts.tok_train --tokenizer hf:PATH")
        super().__init__(mapped, parent_fingerprint, original_vocab_size)
        tok.encode_special_tokens = True  # "<|bos|>" typed by a user stays text, as with tiktoken's encode_ordinary
        self.tok = tok
        self._vocab_size = max(max(tok.get_vocab(with_added_tokens=True).values()) + 1, tok.get_vocab_size(True))
        self._decoder_type = (json.loads(json_text).get("decoder") or {}).get("type")
        canonical = json.dumps(json.loads(json_text), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        self.fingerprint = compute_fingerprint(self.kind, None, [(0, canonical.encode("ascii"))], self.special_tokens)

    @classmethod
    def from_file(cls, path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise NanochatError(f"Hugging Face tokenizer file not found: {path}; pass hf:PATH/tokenizer.json") from None
        except UnicodeDecodeError:
            raise NanochatError(f"{path} is not UTF-8 JSON; pass a Hugging Face tokenizer.json") from None
        return cls(text)

    def get_vocab_size(self):
        return self._vocab_size

    def _encode_batch(self, texts, num_threads):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id):
        token = self.tok.id_to_token(int(token_id))
        if token is None:
            return "\ufffd"
        if self._decoder_type == "ByteLevel":
            table = _gpt2_unicode_to_byte()
            if all(c in table for c in token):
                return bytes(table[c] for c in token).decode("utf-8", errors="replace")
        return token

    def _token_bytes_of(self, token_id):
        token = self.tok.id_to_token(token_id)
        if token is None:
            return 0
        if self._decoder_type == "ByteLevel":
            table = _gpt2_unicode_to_byte()
            if all(c in table for c in token):
                return len(token)  # one character per byte
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return 1  # sentencepiece byte fallback
        return len(token.replace("\u2581", " ").replace("##", "").encode("utf-8"))

    def _save_files(self, directory):
        with open(os.path.join(directory, HF_FILE), "w", encoding="utf-8") as f:
            f.write(self.json_text)

    def round_trip_failure(self, texts):
        """(text, what it decodes back to) for the first text that does not survive encode -> decode, else None.
        A file whose model maps unknown text to [UNK] (or normalises it: lowercasing, accent stripping) is lossy:
        a model trained on its ids can never write that text back."""
        for text in texts:
            back = self.decode(self.encode(text))
            if back != text:
                return text, back
        return None

    @classmethod
    def _load(cls, directory, manifest):
        path = os.path.join(directory, HF_FILE)
        if not os.path.exists(path):
            raise NanochatError(f"tokenizer file missing: {path}; re-import it with scripts.tok_train --tokenizer hf:PATH")
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        specials = manifest["special_tokens"]
        names = sorted(specials, key=lambda name: (int(specials[name]), name))  # re-add in id order
        return cls(text, special_names=names, expected_special_tokens=specials,
                   parent_fingerprint=manifest.get("parent_fingerprint"),
                   original_vocab_size=manifest.get("original_vocab_size"))
