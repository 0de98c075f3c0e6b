"""
The chat server over HTTP: time to first token and tokens/s for 1 and for 8 concurrent clients.

A real client (http.client, one thread per client, streaming the SSE answer of POST
/chat/completions) on loopback against a real server process. By default the server is
scripts.chat_web's app with a random-weights model (depth --depth, vocab --vocab-size, a
CharTokenizer), started here in a subprocess on 127.0.0.1; --url benchmarks any running server
instead (e.g. `python -m scripts.chat_web -i sft` on port 8000).

    python -m dev.bench_chat_web                        # d4 random model, 1 and 8 clients
    python -m dev.bench_chat_web --url http://127.0.0.1:8000 --clients 1,8 --max-tokens 128

Per request: time to first token (request sent -> first token event), tokens (token events; one
per generated token for a CharTokenizer), and decode tokens/s after the first token. Per phase:
aggregate tokens/s (all tokens / the phase's wall time). The server decodes one request at a time
per replica (a FIFO queue), so with 8 clients the time to first token includes the wait in line.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

from nanochat.common import NanochatError, run_main

QUESTION = "why is the sky blue? answer in a few sentences."


# -----------------------------------------------------------------------------
# Server side (this file run with --serve): a random model behind scripts.chat_web's app

def serve(depth, vocab_size):
    import math
    import socket

    import torch
    import uvicorn

    from nanochat.gpt import GPT, config_from_depth
    from nanochat.tokenizer import SPECIAL_TOKENS, CharTokenizer
    from scripts.chat_web import Worker, create_app

    n_chars = vocab_size - 1 - len(SPECIAL_TOKENS)  # CharTokenizer: one id per character, <|unk|>, specials
    tokenizer = CharTokenizer.train_from_iterator(["".join(chr(0x4E00 + i) for i in range(n_chars))
                                                   + " abcdefghijklmnopqrstuvwxyz?.,"])
    torch.manual_seed(0)
    model = GPT(config_from_depth(depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=2048))
    model.init_weights()
    with torch.no_grad():  # non-degenerate random weights (the init zeroes output projections)
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    model.eval()
    app = create_app([Worker(model, tokenizer)], model_name=f"random-d{depth}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)  # the parent reads the port
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


# -----------------------------------------------------------------------------
# Client side

def one_request(url, max_tokens, seed):
    """POST one chat request and read its stream -> (seconds to first token, tokens, total seconds)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
                       "temperature": 1.0, "top_k": 0, "seed": seed})
    t0 = time.perf_counter()
    conn.request("POST", "/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise NanochatError(f"{url}/chat/completions answered {response.status}: {response.read()[:200]!r}")
    first, tokens = None, 0
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: "):
            continue
        event = json.loads(line[6:])
        if "token" in event:
            tokens += 1
            if first is None:
                first = time.perf_counter() - t0
        elif "error" in event:
            raise NanochatError(f"the server reported an error: {event['error']}")
        elif event.get("done"):
            break
    total = time.perf_counter() - t0
    conn.close()
    return first if first is not None else total, tokens, total


def wait_until_up(url, server, timeout=120):
    parts = urllib.parse.urlsplit(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise NanochatError(f"the benchmark server exited ({server.returncode})")
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise NanochatError(f"the benchmark server at {url} did not answer /health within {timeout} s")


def run_phase(url, clients, requests_per_client, max_tokens):
    results, errors = [], []

    def client(c):
        try:
            for r in range(requests_per_client):
                results.append(one_request(url, max_tokens, seed=1000 * c + r))
        except Exception as e:  # noqa: BLE001 - reported after the phase
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--depth", type=int, default=4, help="random model depth (without --url)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--clients", default="1,8", help="concurrent clients per phase")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the server process
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.depth, args.vocab_size)

    server = None
    url = args.url
    if url is None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        server = subprocess.Popen([sys.executable, "-m", "dev.bench_chat_web", "--serve", "--depth", str(args.depth),
                                   "--vocab-size", str(args.vocab_size)], stdout=subprocess.PIPE, text=True,
                                  cwd=repo, env=env)
        port = server.stdout.readline().strip()
        if not port.isdigit():
            server.wait()
            raise NanochatError(f"the benchmark server did not start (exit {server.returncode})")
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, server)
    try:
        one_request(url, 4, seed=0)  # warm-up
        print(f"server {url} ({'random d%d model, vocab %d' % (args.depth, args.vocab_size) if server else 'given'}), "
              f"max_tokens {args.max_tokens}, {args.requests_per_client} requests per client, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        for clients in [int(c) for c in args.clients.split(",")]:
            results, wall = run_phase(url, clients, args.requests_per_client, args.max_tokens)
            ttft = [r[0] for r in results]
            rates = [(r[1] - 1) / (r[2] - r[0]) for r in results if r[1] > 1 and r[2] > r[0]]
            tokens = sum(r[1] for r in results)
            print(f"{clients} client{'s' if clients > 1 else ''}: time to first token median "
                  f"{statistics.median(ttft) * 1e3:,.0f} ms "
                  f"(max {max(ttft) * 1e3:,.0f}); per-request decode {statistics.median(rates):,.1f} tok/s median; "
                  f"aggregate {tokens / wall:,.1f} tok/s ({tokens} tokens in {wall:.1f} s, {len(results)} requests)",
                  flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at end")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    run_main(main)
