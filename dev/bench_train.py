"""
Benchmark one full training step (forward, backward, optimizer) of the GPT.

    python dev/bench_train.py                      # CPU: depth 4, seq 512, batch 8, vocab 8192, fp32
    python dev/bench_train.py --device cuda --depth 20 --dtype bfloat16 --compile --batch 32 --seq 2048 --vocab 65536

Prints tokens/s of the full step and the achieved FLOP/s of forward+backward (the model's
estimate_flops() per token, 6N + attention). On CPU it also measures this machine's matmul
peak (a 2048^3 fp32 matmul) in the same run and reports forward+backward as a % of it, next to
the reference (nanochat's own GPT at this shape on the 2-core dev machine: ~1,400 tokens/s for
a full step, forward+backward at 39% of peak). On CUDA it prints MFU against the GPU's bf16 peak.
The machine may be shared: every figure is taken several times and best and median are shown.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import peak_flops_for_device  # noqa: E402
from nanochat.gpt import GPT, config_from_depth  # noqa: E402

REFERENCE_TOKENS_PER_S = 1400
REFERENCE_FWD_BWD_PEAK = 0.39
REFERENCE_PEAK = 149e9  # FLOP/s of a 2048^3 fp32 matmul when the reference was measured


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, repeats=5, cpu_time=False):
    """Best FLOP/s of an n^3 matmul on this device/dtype (per CPU-second of this process if cpu_time)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    clock = time.process_time if cpu_time else time.perf_counter
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark a full GPT training step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--arch", default="nanochat", choices=["nanochat", "qwen2"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on failure)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- model and optimizers
    cfg = config_from_depth(args.depth, args.vocab, arch=args.arch, sequence_len=args.seq)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    flops_per_token = model.estimate_flops()
    tokens = args.batch * args.seq
    print(f"device {device.type} ({torch.get_num_threads()} threads), arch {cfg.arch}, depth {cfg.n_layer}, width {cfg.n_embd}, "
          f"heads {cfg.n_head}, seq {args.seq}, batch {args.batch}, vocab {args.vocab}, {model.num_params():,} params, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token, dtype {args.dtype}")

    train_model = model
    if args.compile:
        try:
            train_model = torch.compile(model, dynamic=False)
        except Exception as e:  # noqa: BLE001 - the benchmark must still run eagerly
            print(f"torch.compile failed ({e.__class__.__name__}: {str(e)[:200]}); running eager")
            train_model = model
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else torch.autocast(device_type=device.type, enabled=False))

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)

    def fwd_bwd():
        nonlocal train_model
        with autocast:
            loss = train_model(x, y)
        loss.backward()
        return loss

    # --- warm up (also where a compile failure shows itself)
    for _ in range(args.warmup):
        try:
            fwd_bwd()
        except Exception as e:  # noqa: BLE001
            if train_model is model:
                raise
            print(f"compiled model failed ({e.__class__.__name__}: {str(e)[:200]}); running eager")
            train_model = model
            fwd_bwd()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    # --- timed steps. On a shared CPU the machine's speed drifts, so a short matmul peak is
    # measured right before every step and each step is also judged against its own peak.
    fb_times, opt_times, peaks, fb_cpu, step_cpu = [], [], [], [], []
    for _ in range(args.steps):
        if device.type == "cpu":
            peaks.append(matmul_peak(device, torch.float32, repeats=2))
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd()
        sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        fb_times.append(t1 - t0)
        opt_times.append(t2 - t1)
        fb_cpu.append(c1 - c0)
        step_cpu.append(c2 - c0)
    step_times = [a + b for a, b in zip(fb_times, opt_times)]

    # --- report
    def line(name, times, flops=None):
        best, med = min(times), statistics.median(times)
        extra = f"  {flops * tokens / best / 1e9:.1f} GFLOP/s best, {flops * tokens / med / 1e9:.1f} median" if flops else ""
        print(f"{name:<10} best {best * 1e3:8.1f} ms  median {med * 1e3:8.1f} ms  -> {tokens / best:9,.0f} tokens/s best, "
              f"{tokens / med:9,.0f} median{extra}")

    line("fwd+bwd", fb_times, flops_per_token)
    line("optimizer", opt_times)
    line("full step", step_times)
    tok_best, tok_med = tokens / min(step_times), tokens / statistics.median(step_times)
    print(f"optimizer adds {statistics.median(opt_times) / statistics.median(fb_times):.0%} on top of fwd+bwd (median)")
    if device.type == "cpu":
        peak = max(peaks)
        fb_flops = [flops_per_token * tokens / t for t in fb_times]
        own = [f / p for f, p in zip(fb_flops, peaks)]  # each step against the peak measured just before it
        print(f"matmul peak (2048^3 fp32) measured before each step: best {peak / 1e9:.1f} GFLOP/s, "
              f"median {statistics.median(peaks) / 1e9:.1f}, worst {min(peaks) / 1e9:.1f}"
              f"{'  (the CPU is busy with other work: figures are noisy)' if min(peaks) < 0.8 * peak else ''}")
        print(f"fwd+bwd vs the peak measured just before the step: best {max(own):.0%}, median {statistics.median(own):.0%}; "
              f"vs the run's best peak: {max(fb_flops) / peak:.0%}. Reference {REFERENCE_FWD_BWD_PEAK:.0%}  [goal >= 60%]")
        print(f"full step {tok_best:,.0f} tokens/s best, {tok_med:,.0f} median = {tok_best / REFERENCE_TOKENS_PER_S:.2f}x / "
              f"{tok_med / REFERENCE_TOKENS_PER_S:.2f}x the reference {REFERENCE_TOKENS_PER_S:,} tokens/s  [goal >= 2,100 = 1.5x]")
        # CPU-time view: work per CPU-second this process actually got, against the matmul's work per
        # CPU-second. Other processes barely move it (threads waiting for each other still count).
        cpu_peak = matmul_peak(device, torch.float32, repeats=3, cpu_time=True)
        threads = torch.get_num_threads()
        print(f"CPU-time view ({threads} thread{'s' if threads > 1 else ''}): fwd+bwd {flops_per_token * tokens / min(fb_cpu) / 1e9:.1f} "
              f"GFLOP per CPU-second = {flops_per_token * tokens / min(fb_cpu) / cpu_peak:.0%} of the matmul's "
              f"{cpu_peak / 1e9:.1f} (median {flops_per_token * tokens / statistics.median(fb_cpu) / cpu_peak:.0%}); full step "
              f"{tokens / min(step_cpu) * threads:,.0f} tokens/s best, {tokens / statistics.median(step_cpu) * threads:,.0f} median "
              f"if all {threads} thread{'s' if threads > 1 else ''} had a core to themselves")
        # The reference was measured when a 2048^3 matmul reached 149 GFLOP/s; scale ours to that machine state.
        scaled = [tokens / st * REFERENCE_PEAK / pk for st, pk in zip(step_times, peaks)]
        print(f"full step scaled to the reference's {REFERENCE_PEAK / 1e9:.0f} GFLOP/s peak: best {max(scaled):,.0f} tokens/s, "
              f"median {statistics.median(scaled):,.0f} ({max(scaled) / REFERENCE_TOKENS_PER_S:.2f}x / "
              f"{statistics.median(scaled) / REFERENCE_TOKENS_PER_S:.2f}x the reference)")
    else:
        name = torch.cuda.get_device_name(device)
        peak = peak_flops_for_device(name)
        full_flops = flops_per_token * tokens / min(step_times)
        fb_best = flops_per_token * tokens / min(fb_times)
        if peak:
            print(f"{name}: MFU full step {full_flops / peak:.1%} (best), fwd+bwd {fb_best / peak:.1%}  [goal >= 50%]")
        else:
            print(f"{name}: no bf16 peak known for this GPU; achieved {full_flops / 1e12:.1f} TFLOP/s")
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
