"""
Benchmark one full training step (forward, backward, optimizer) of the GPT.

    python dev/bench_train.py                      # CPU: depth 4, seq 512, batch 8, vocab 8192, fp32
    python dev/bench_train.py --threads 2 --reference /tmp/nanochat_ref   # + nanochat's own step, same run
    python dev/bench_train.py --device cuda --depth 20 --dtype bfloat16 --compile --batch 32 --seq 2048 --vocab 65536

Prints tokens/s of the full step and the achieved FLOP/s of forward+backward (the model's
estimate_flops() per token, 6N + attention). On CPU it also measures this machine's matmul
peak (a 2048^3 fp32 matmul) before every round and reports forward+backward as a % of it. With
--reference PATH (a checkout of karpathy/nanochat), nanochat's own GPT and optimizers take a full
step at the same shape in a subprocess, round by round in turn with ours, and the median ratio is
printed: the only speed ratio this benchmark reports. On CUDA it prints MFU against the GPU's bf16
peak. The machine may be shared: every figure is a median of several steps.
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
from dev.nanochat_reference import ReferenceWorker  # noqa: E402



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, repeats=5):
    """Best FLOP/s of an n^3 matmul on this device/dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    clock = time.perf_counter
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
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (each side)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds: ours, then the reference, in turn")
    parser.add_argument("--reference", default=None,
                        help="checkout of karpathy/nanochat to time in the same run (see dev/nanochat_reference.py)")
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

    # --- timed rounds: ours, then the reference (when given), in turn, so both see the same machine
    reference = None
    if args.reference:
        if device.type != "cpu" or args.arch != "nanochat" or args.dtype != "float32" or args.compile:
            raise SystemExit("--reference runs nanochat's own GPT on CPU in fp32: use it without --device cuda, "
                             "--arch qwen2, --dtype bfloat16 or --compile")
        print(f"starting the reference (nanochat at {args.reference}) and warming it up ...", flush=True)
        reference = ReferenceWorker(args.reference, "train", threads=torch.get_num_threads(), depth=args.depth,
                                    seq=args.seq, batch=args.batch, vocab=args.vocab, warmup=args.warmup)
    fb_times, opt_times, peaks, ref_times, round_ratios, cpu_times, ref_cpu = [], [], [], [], [], [], []
    for r in range(args.rounds):
        if device.type == "cpu":
            peaks.append(matmul_peak(device, torch.float32, repeats=2))
        ours = []
        for _ in range(args.steps):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd()
            sync(device)
            t1 = time.perf_counter()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            sync(device)
            t2 = time.perf_counter()
            cpu_times.append(time.process_time() - c0)
            fb_times.append(t1 - t0)
            opt_times.append(t2 - t1)
            ours.append(t2 - t0)
        line = f"round {r + 1}: ours {tokens / statistics.median(ours):,.0f} tokens/s"
        if reference:
            answer = reference.ask(f"train {args.steps}")
            theirs = answer["seconds"]
            ref_times += theirs
            ref_cpu += answer["cpu_seconds"]
            round_ratios.append(statistics.median(theirs) / statistics.median(ours))
            line += f", nanochat {tokens / statistics.median(theirs):,.0f} tokens/s ({round_ratios[-1]:.2f}x)"
        print(line, flush=True)
    if reference:
        reference.close()
    step_times = [a + b for a, b in zip(fb_times, opt_times)]

    # --- report
    def report(name, times, flops=None):
        best, med = min(times), statistics.median(times)
        extra = f"  {flops * tokens / med / 1e9:.1f} GFLOP/s median" if flops else ""
        print(f"{name:<10} median {med * 1e3:8.1f} ms (best {best * 1e3:8.1f})  -> "
              f"{tokens / med:9,.0f} tokens/s median "
              f"({tokens / best:,.0f} best){extra}")

    report("fwd+bwd", fb_times, flops_per_token)
    report("optimizer", opt_times)
    report("full step", step_times)
    print(f"optimizer adds {statistics.median(opt_times) / statistics.median(fb_times):.0%} on top of fwd+bwd (median)")
    if device.type == "cpu":
        peak = statistics.median(peaks)
        fb_flops = flops_per_token * tokens / statistics.median(fb_times)
        print(f"matmul peak (2048^3 fp32) measured before each round: median {peak / 1e9:.1f} GFLOP/s "
              f"(best {max(peaks) / 1e9:.1f}, worst {min(peaks) / 1e9:.1f}); "
              f"fwd+bwd median at {fb_flops / peak:.0%} of it")
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} at end (above {os.cpu_count()}: other processes share the cores; "
              f"compare ours and the reference of the same run only)")
    else:
        name = torch.cuda.get_device_name(device)
        peak = peak_flops_for_device(name)
        full_flops = flops_per_token * tokens / min(step_times)
        fb_best = flops_per_token * tokens / min(fb_times)
        if peak:
            print(f"{name}: MFU full step {full_flops / peak:.1%} (best), fwd+bwd {fb_best / peak:.1%}")
        else:
            print(f"{name}: no bf16 peak known for this GPU; achieved {full_flops / 1e12:.1f} TFLOP/s")
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if reference:
        ours_med, ref_med = statistics.median(step_times), statistics.median(ref_times)
        print(f"full step, same run, {args.rounds} alternating rounds of {args.steps} steps: ours "
              f"{tokens / ours_med:,.0f} tokens/s, nanochat {tokens / ref_med:,.0f} tokens/s (medians) -> "
              f"{ref_med / ours_med:.2f}x (median of the per-round ratios {statistics.median(round_ratios):.2f}x); "
              f"per CPU-second of each process: {statistics.median(ref_cpu) / statistics.median(cpu_times):.2f}x")


if __name__ == "__main__":
    main()
