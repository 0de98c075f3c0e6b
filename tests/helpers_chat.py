"""
Test helpers for the chat server: a tiny random model behind scripts.chat_web's app, served by
uvicorn on 127.0.0.1 in a background thread.

    with ChatServer(create_app([tiny_worker()])) as server:
        server.url  # http://127.0.0.1:PORT
"""

import math
import socket
import threading
import time
import types

import torch
import torch.nn.functional as F
import uvicorn

from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import CharTokenizer

CORPUS = "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 0123456789 +-*/=?,"


def tiny_model(tokenizer, seed=0, sequence_len=256):
    torch.manual_seed(seed)
    model = GPT(config_from_depth(1, vocab_size=tokenizer.get_vocab_size(), sequence_len=sequence_len))
    model.init_weights()
    with torch.no_grad():  # non-degenerate random weights (nanochat's init zeroes output projections)
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    return model.eval()


def tiny_tokenizer():
    return CharTokenizer.train_from_iterator([CORPUS])


def long_talker(tokenizer, prompt, min_tokens, sequence_len=512):
    """A tiny model whose greedy answer to `prompt` runs at least `min_tokens` without a stop token
    (random models often stop early; we try seeds until one rambles)."""
    for seed in range(50):
        model = tiny_model(tokenizer, seed=seed, sequence_len=sequence_len)
        engine = Engine(model, tokenizer)
        results, _ = engine.generate_batch(prompt, max_tokens=min_tokens, temperature=0.0)
        if len(results[0]) - len(prompt) >= min_tokens:
            return model
    raise AssertionError("no seed gave a long greedy answer")


class SuccessorModel(torch.nn.Module):
    """A stand-in for GPT whose greedy next id is a fixed function of the last id: `successor`
    maps id -> next id (anything else -> <|assistant_end|>). It has just what Engine uses (config,
    lm_head, forward with a KV cache), so a test can make a model write exactly what it wants,
    special tokens included."""

    def __init__(self, tokenizer, successor, sequence_len=128):
        super().__init__()
        vocab = tokenizer.get_vocab_size()
        self.config = types.SimpleNamespace(sequence_len=sequence_len, vocab_size=vocab, n_layer=1, n_kv_head=1,
                                            head_dim=1)
        self.lm_head = torch.nn.Linear(1, vocab, bias=False)
        table = torch.full((vocab,), tokenizer.encode_special("<|assistant_end|>"), dtype=torch.long)
        for a, b in successor.items():
            table[a] = b
        self.register_buffer("table", table)

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:  # keep the cache's position honest, as the real model does
            kv_cache.insert_kv(0, torch.zeros(B, 1, T, 1), torch.zeros(B, 1, T, 1))
        return F.one_hot(self.table[ids], self.config.vocab_size).float() * 100.0


def successor_chain(ids):
    """{ids[i]: ids[i+1]}: a SuccessorModel fed ids[0] writes the rest of `ids`."""
    return dict(zip(ids[:-1], ids[1:]))


class ChatServer:
    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test chat server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
