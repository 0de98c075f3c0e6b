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

import torch
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
