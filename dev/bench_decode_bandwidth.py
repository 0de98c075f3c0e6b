"""
Decode of a large model at batch 1 on CPU against the machine's memory-bandwidth limit.

At batch 1 every new token reads every weight matrix once (the token embedding only one row), so
tok/s can never exceed (read bandwidth) / (weight bytes per token). This script measures both in
the same run: the read bandwidth as the best rate of reading a buffer much larger than the
last-level cache (a sum or a matrix-vector product), then Engine decode tok/s with the model's
fp32 weights and with a bf16 copy (Engine(weights_dtype=torch.bfloat16)), each as a % of the
limit for the bytes it reads. It also reports what bf16 costs in accuracy on this (random) model:
teacher-forced decode logits of bf16 against fp32, as the mean KL divergence and top-1 agreement.
On a machine shared with other jobs use --threads 1 (see dev/BENCHMARKS.md).

    python -m dev.bench_decode_bandwidth                         # d20, vocab 65536, 2 threads
    python -m dev.bench_decode_bandwidth --depth 12 --threads 1  # smaller, quicker

Random weights (speed does not depend on them); the machine may be shared, so each figure is the
median of alternating rounds, and the bandwidth is re-measured before every round.
"""

import argparse
import os
import statistics
import time

import torch

from nanochat.common import run_main
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import SPECIAL_TOKENS


class SpecialsOnlyTokenizer:
    """What Engine needs to decode random weights: the special ids (at the top of the vocab)."""

    def __init__(self, vocab_size):
        self.ids = {name: vocab_size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def decode(self, ids):
        return ""

    def encode(self, text):
        return []


def read_bandwidth(buffer, repeats=3):
    """Bytes per second of the fastest full read of `buffer` (fp32, 4096 columns) we can time: a
    sum, or a matrix-vector product over it (the kind of read decoding does). The fastest makes
    the limit the hardest to reach."""
    matrix, vector = buffer.view(-1, 4096), torch.ones(4096)
    best = float("inf")
    for _ in range(repeats):
        for read in (buffer.sum, lambda: torch.mv(matrix, vector)):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return buffer.numel() * buffer.element_size() / best


def weight_bytes_per_token(model, bytes_per_weight):
    """Every matrix read once per token; the embedding contributes one row."""
    cfg = model.config
    matrices = model.num_params() - model.transformer.wte.weight.numel()
    matrices -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd  # padded head rows are never read
    return (matrices + cfg.n_embd) * bytes_per_weight


def decode_rate(engine, prompt, new_tokens, seed):
    """Decode steps per second after the prefill: the clock starts when the first token (sampled
    from the prefill's logits) is out, and counts the new_tokens - 1 steps after it."""
    t0, n = None, 0
    for _ in engine.generate(prompt, num_samples=1, max_tokens=new_tokens, temperature=1.0, seed=seed):
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += 1
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def bf16_cost(model, fp32_engine, bf16_engine, prompt, steps):
    """Teacher-forced decode of the same ids with both weight copies: mean KL(fp32 || bf16) in
    nats per token and the fraction of steps whose argmax agrees."""
    from nanochat import fast_decode
    caches = []
    for engine in (fp32_engine, bf16_engine):
        cache = engine._new_cache(1, len(prompt) + steps + 1)
        model(torch.tensor([prompt]), kv_cache=cache)
        caches.append(cache)
    g = torch.Generator().manual_seed(0)
    fp32_prepared, bf16_prepared = fp32_engine.fast.get(), bf16_engine.fast.get()
    kls, agree = [], 0
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size - len(SPECIAL_TOKENS), (1,), generator=g)
        a = fast_decode.decode_step(model, fp32_prepared, ids, caches[0]).log_softmax(-1)
        b = fast_decode.decode_step(model, bf16_prepared, ids, caches[1]).log_softmax(-1)
        kls.append((a.exp() * (a - b)).sum().item())
        agree += int(a.argmax() == b.argmax())
    return statistics.mean(kls), agree / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--buffer-mb", type=int, default=1024, help="bandwidth buffer (>> the last-level cache)")
    args = parser.parse_args(argv)

    # --- setup
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(config_from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=2048))
    model.init_weights()
    with torch.no_grad():  # non-degenerate random weights (the init zeroes output projections)
        for p in model.parameters():
            p.normal_(0.0, p.size(-1) ** -0.5)
    model.eval()
    tokenizer = SpecialsOnlyTokenizer(args.vocab_size)
    engines = {"fp32": Engine(model, tokenizer), "bf16": Engine(model, tokenizer, weights_dtype=torch.bfloat16)}
    bytes_per_token = {"fp32": weight_bytes_per_token(model, 4), "bf16": weight_bytes_per_token(model, 2)}
    prompt = [tokenizer.get_bos_token_id()] + list(range(args.prompt_tokens - 1))
    buffer = torch.ones(args.buffer_mb * 2**20 // 4 // 4096 * 4096)
    for engine in engines.values():
        decode_rate(engine, prompt, 2, seed=1000)  # warm-up; builds the bf16 copy
    cfg = model.config
    print(f"d{cfg.n_layer} (width {cfg.n_embd}, vocab {cfg.vocab_size}), {model.num_params() / 1e6:.0f}M params, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"weights read per token: fp32 {bytes_per_token['fp32'] / 1e9:.2f} GB, "
          f"bf16 {bytes_per_token['bf16'] / 1e9:.2f} GB")

    # --- alternating rounds: bandwidth, then each engine
    bandwidths, rates = [], {name: [] for name in engines}
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth(buffer))
        line = f"round {r + 1}: read bandwidth {bandwidths[-1] / 1e9:.1f} GB/s"
        for name, engine in engines.items():
            rates[name].append(decode_rate(engine, prompt, args.new_tokens, seed=r))
            limit = bandwidths[-1] / bytes_per_token[name]
            line += f", {name} {rates[name][-1]:.2f} tok/s ({rates[name][-1] / limit:.0%} of {limit:.2f})"
        print(line, flush=True)

    # --- report
    bw = statistics.median(bandwidths)
    print(f"read bandwidth (fastest of a sum and a matrix-vector product over a {args.buffer_mb} MB buffer, "
          f"{args.threads} threads): median {bw / 1e9:.1f} GB/s")
    for name in engines:
        limit = bw / bytes_per_token[name]
        rate = statistics.median(rates[name])
        print(f"decode batch 1, {name} weights: {rate:.2f} tok/s median = {rate / limit:.0%} of the bandwidth limit "
              f"{limit:.2f} tok/s ({bytes_per_token[name] / 1e9:.2f} GB/token); vs the fp32 limit "
              f"{rate / (bw / bytes_per_token['fp32']):.0%}")
    kl, agree = bf16_cost(model, engines["fp32"], engines["bf16"], prompt, steps=16)
    print(f"bf16 weights vs fp32 on this random model, 16 teacher-forced steps: mean KL {kl:.2e} nats/token, "
          f"top-1 agreement {agree:.0%}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    run_main(main)
