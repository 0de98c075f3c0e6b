"""
Where the time of a batch-1 decode step goes: the weights' bytes, or the ops.

Times `fast_decode.decode_step` (the step `Engine` takes on CPU) on the bench_engine model (random weights,
depth 4, vocab 8192 by default) and on a model with the same layers and ops but 16-wide matrices and a
64-token vocab, whose step is only the fixed per-op cost; their difference is what reading the real
matrices costs. Also the rest of a generate call per generated token: sampling with its host sync, and
the prompt's prefill spread over the new tokens. Rounds alternate the two models.

    python -m dev.bench_decode_split --threads 2
"""

import argparse
import statistics
import time

import torch

from dev.bench_engine import build_model
from nanochat.common import run_main
from nanochat.engine import KVCache, sample_next
from nanochat import fast_decode


def step_us(model, prompt_tokens, steps):
    """Microseconds per decode_step after a prefill of prompt_tokens."""
    cfg = model.config
    prepared = fast_decode.DecodeWeights(model).get()
    cache = KVCache(1, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, prompt_tokens + steps + 1)
    with torch.inference_mode():
        model(torch.randint(0, cfg.vocab_size, (1, prompt_tokens)), kv_cache=cache, last_only=True)
        ids = torch.tensor([1])
        t0 = time.perf_counter()
        for _ in range(steps):
            fast_decode.decode_step(model, prepared, ids, cache)
        return (time.perf_counter() - t0) / steps * 1e6


def sample_us(vocab_size, softcap, calls=200):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, vocab_size).tanh_().mul_(softcap)
    t0 = time.perf_counter()
    for _ in range(calls):
        sample_next(logits, generator, 1.0, None, None, softcap).tolist()
    return (time.perf_counter() - t0) / calls * 1e6


def prefill_us(model, prompt_tokens):
    cfg = model.config
    cache = KVCache(1, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, prompt_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(torch.randint(0, cfg.vocab_size, (1, prompt_tokens)), kv_cache=cache, last_only=True)
        return (time.perf_counter() - t0) * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description="Split a batch-1 decode step into weight reads and per-op cost.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    real = build_model(args.depth, args.vocab_size, "cpu").eval()
    tiny = build_model(args.depth, 64, "cpu", n_embd=16, n_head=1, n_kv_head=1).eval()
    step_us(real, args.prompt_tokens, 8), step_us(tiny, args.prompt_tokens, 8)  # warm-up
    real_us, tiny_us, sampling, prefill = [], [], [], []
    for _ in range(args.rounds):
        real_us.append(step_us(real, args.prompt_tokens, args.new_tokens))
        tiny_us.append(step_us(tiny, args.prompt_tokens, args.new_tokens))
        sampling.append(sample_us(args.vocab_size, real.config.softcap or 15.0))
        prefill.append(prefill_us(real, args.prompt_tokens) / args.new_tokens)
    # read once per token: every block matrix and the head (the embedding: one row)
    read = [w for w in real.transformer.h.parameters() if w.ndim == 2] + [real.lm_head.weight[:args.vocab_size]]
    weight_mb = sum(w.numel() * w.element_size() for w in read) / 1e6
    med = statistics.median
    print(f"threads {args.threads}, depth {args.depth}, vocab {args.vocab_size}, batch 1, {args.rounds} rounds of "
          f"{args.new_tokens} steps (medians; min-max)")
    print(f"decode step, real matrices: {med(real_us):,.0f} us ({min(real_us):,.0f}-{max(real_us):,.0f})")
    print(f"decode step, 16-wide matrices (per-op cost): {med(tiny_us):,.0f} us ({min(tiny_us):,.0f}-{max(tiny_us):,.0f})")
    print(f"-> reading the matrices: {med(real_us) - med(tiny_us):,.0f} us per step, "
          f"{1 - med(tiny_us) / med(real_us):.0%} of it ({weight_mb:.1f} MB of weights read per token)")
    print(f"sampling + host sync: {med(sampling):,.0f} us per token; prefill of {args.prompt_tokens} tokens: "
          f"{med(prefill):,.0f} us per generated token")
    return 0


if __name__ == "__main__":
    run_main(main)
