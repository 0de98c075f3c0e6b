"""
GPU reality check: run every CUDA path the speedrun uses on one GPU, in one go, and print one table.

    bash dev/gpu_check.sh                      # on a CUDA machine: d20, vocab 65536, seq 2048, bf16 (<= 8 min)
    bash dev/gpu_check.sh --dry-run            # on CPU: the same sequence of checks at toy sizes
    bash dev/gpu_check.sh --prepare DIR        # build the corpus shards + tokenizer into DIR (needs our rustbpe)
    bash dev/gpu_check.sh --assets DIR         # use a prepared DIR (a GPU box without a Rust toolchain)

The checks, each a row of the summary (any failure -> exit 1):
  1. data + tokenizer   the embedded offline corpus and a BPE tokenizer of the run's vocab size
  2. train compiled     base_train at depth 20 in bf16 with torch.compile: tok/s and MFU vs the device's bf16 peak
  3. train eager        the same with --compile off
  4. resume             train 2k steps saving at k; delete step 2k; --resume; the resumed steps' losses must
                        match the uninterrupted run's (bf16 tolerance on GPU, exact on CPU)
  5. mid_train, 6. chat_sft, 7. chat_eval   a few steps / a handful of problems each, offline tasks
  8. engine decode      Engine tok/s at batch 1 and 32 with bf16 weights (random d20 weights: speed only)
  9. torchrun           base_train under torchrun --nproc_per_node=1 (NCCL on GPU, gloo on CPU)

Every training stage runs as the user runs it (`python -m scripts.<stage>` in a subprocess); its log is
kept under the work dir. Nothing here needs the network.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MFU_GOAL = 45.0  # percent of the dense bf16 peak, d20 compiled, one GPU

# Sizes of a real check (one H100/H200) and of a dry run (2 CPU cores, about a minute)
GPU_SIZES = dict(depth=20, vocab=65536, seq=2048, batch=32, train_steps=30, eager_steps=12, resume_depth=12,
                 resume_half=6, post_steps=4, eval_problems=8, decode_tokens=128, decode_batches=(1, 32),
                 max_chars=300_000_000, device="cuda")
DRY_SIZES = dict(depth=1, vocab=512, seq=64, batch=2, train_steps=4, eager_steps=3, resume_depth=1,
                 resume_half=2, post_steps=2, eval_problems=2, decode_tokens=8, decode_batches=(1, 4),
                 max_chars=2_000_000, device="cpu")


# -----------------------------------------------------------------------------
# Running stages and reading their output

class CheckFailed(Exception):
    pass


def run_stage(name, args, work, env, module=True, timeout=900):
    """Run `python -m <args>` (or a raw command) with the check's env; tee to <work>/logs/<name>.log."""
    cmd = [sys.executable, "-m", *args] if module else list(args)
    log_path = os.path.join(work, "logs", f"{name}.log")
    print(f"--- {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                print(f"    {line}", end="", flush=True)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise CheckFailed(f"{name} timed out after {timeout}s; see {log_path}")
    if proc.returncode != 0:
        tail = "".join(lines[-3:]).strip().replace("\n", " | ")
        raise CheckFailed(f"{name} exited {proc.returncode}: {tail[-300:]} (log: {log_path})")
    return "".join(lines), time.time() - t0


STEP_LINE = re.compile(r"step (\d+)/\d+ \|.*?\| ([\d,]+) tok/s(?: \| mfu ([\d.]+)%)?")


def step_throughput(output, skip):
    """Median tok/s and MFU (None off-GPU) over the logged steps after the first `skip` (warm-up, compile)."""
    rows = [(int(s), float(t.replace(",", "")), float(m) if m else None) for s, t, m in STEP_LINE.findall(output)]
    rows = [r for r in rows if r[0] > skip] or rows
    if not rows:
        raise CheckFailed("no step lines in the training output")
    tok_s = statistics.median(r[1] for r in rows)
    mfus = [r[2] for r in rows if r[2] is not None]
    return tok_s, (statistics.median(mfus) if mfus else None)


def base_train_args(sizes, steps, tag, compile_mode, depth=None, save_every=0):
    rows = sizes["batch"] * sizes["seq"]
    return ["scripts.base_train", "--depth", str(depth or sizes["depth"]), "--max-seq-len", str(sizes["seq"]),
            "--device-batch-size", str(sizes["batch"]), "--total-batch-size", str(rows),
            "--num-iterations", str(steps), "--eval-every", "0", "--eval-tokens", str(rows),
            "--sample-every", "0", "--save-every", str(save_every), "--keep-last", "0",
            "--compile", compile_mode, "--device", sizes["device"], "--model-tag", tag]


def final_loss_history(work, tag):
    """The raw per-step training losses recorded in the newest checkpoint of a base_train run."""
    ckpt_dir = os.path.join(work, "base_checkpoints", tag)
    steps = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_"))
    with open(os.path.join(ckpt_dir, steps[-1], "meta.json")) as f:
        meta = json.load(f)
    return [loss for _, loss in meta["loop_state"]["loss_history"]]


# -----------------------------------------------------------------------------
# The checks

def check_data_and_tokenizer(sizes, work, env, assets):
    if assets:
        for sub in ("base_data", "tokenizer"):
            if not os.path.isdir(os.path.join(assets, sub)):
                raise CheckFailed(f"--assets {assets} has no {sub}/; make it with --prepare {assets}")
            shutil.copytree(os.path.join(assets, sub), os.path.join(work, sub))
        return "copied from --assets"
    run_stage("data", ["nanochat.dataset", "--embedded"], work, env)
    _, dt = run_stage("tok_train", ["scripts.tok_train", "--vocab-size", str(sizes["vocab"]),
                                    "--max-chars", str(sizes["max_chars"])], work, env)
    return f"vocab {sizes['vocab']} trained in {dt:.0f}s"


def check_train(sizes, work, env, compiled):
    steps = sizes["train_steps"] if compiled else sizes["eager_steps"]
    mode = "on" if compiled else "off"
    if compiled and sizes["device"] == "cpu":
        mode = "off"  # inductor on 2 CPU cores takes minutes; the dry run checks the script, not the compiler
    out, dt = run_stage(f"train_compile_{mode}" if compiled else "train_eager",
                        base_train_args(sizes, steps, f"gc_{'compiled' if compiled else 'eager'}", mode), work, env)
    tok_s, mfu = step_throughput(out, skip=min(5, steps // 2))
    figures = f"{tok_s:,.0f} tok/s" + (f", MFU {mfu:.1f}%" if mfu is not None else ", MFU n/a (no GPU peak)")
    if compiled and mfu is not None and mfu < MFU_GOAL:
        figures += f" (below the {MFU_GOAL:.0f}% goal)"
    return figures + f", {steps} steps in {dt:.0f}s"


def check_resume(sizes, work, env):
    half = sizes["resume_half"]
    args = base_train_args(sizes, 2 * half, "gc_resume", "auto" if sizes["device"] == "cuda" else "off",
                           depth=sizes["resume_depth"], save_every=half)
    run_stage("resume_full", args, work, env)
    reference = final_loss_history(work, "gc_resume")
    ckpt_dir = os.path.join(work, "base_checkpoints", "gc_resume")
    shutil.rmtree(os.path.join(ckpt_dir, f"step_{2 * half:06d}"))
    run_stage("resume_cont", args + ["--resume"], work, env)
    resumed = final_loss_history(work, "gc_resume")
    if len(resumed) != len(reference):
        raise CheckFailed(f"resumed run logged {len(resumed)} steps, the uninterrupted one {len(reference)}")
    # bf16 matmuls may reorder reductions between processes; fp32 on CPU must agree exactly
    tol = 2e-2 if sizes["device"] == "cuda" else 0.0
    worst = max(abs(a - b) for a, b in zip(reference[half:], resumed[half:]))
    if worst > tol:
        raise CheckFailed(f"losses after resume differ by up to {worst:.3g} (tolerance {tol}): "
                          f"{reference[half:]} vs {resumed[half:]}")
    return f"steps {half + 1}-{2 * half} match (largest difference {worst:.2g}, tolerance {tol})"


def check_mid_sft_eval(sizes, work, env):
    dev = ["--device", sizes["device"]]
    n = str(sizes["post_steps"])
    _, dt_mid = run_stage("mid_train", ["scripts.mid_train", "-g", "gc_resume", "--offline", *dev,
                                        "--device-batch-size", str(sizes["batch"]), "--max-seq-len", str(sizes["seq"]),
                                        "--num-iterations", n, "--eval-every", "0", "--eval-steps", "2"], work, env)
    _, dt_sft = run_stage("chat_sft", ["scripts.chat_sft", "-g", "gc_resume", "--offline", *dev, "--num-iterations", n,
                                       "--device-batch-size", "4", "--target-examples-per-step", "8",
                                       "--eval-every", "0", "--eval-steps", "2", "--eval-metrics-every", "0",
                                       "--eval-max-problems", "2", "--eval-max-new-tokens", "16"], work, env)
    out, dt_eval = run_stage("chat_eval", ["scripts.chat_eval", "-i", "sft", "-g", "gc_resume", "--offline", *dev,
                                           "-a", "Arithmetic|SpellingBee", "-x", str(sizes["eval_problems"]),
                                           "-m", "32"], work, env)
    accuracies = re.findall(r"(\w+) accuracy: ([\d.]+%?)", out)
    shown = ", ".join(f"{t} {a}" for t, a in accuracies) or "ran"
    return f"mid {dt_mid:.0f}s, sft {dt_sft:.0f}s, eval {dt_eval:.0f}s ({shown})"


def check_engine_decode(sizes, work):
    """Engine decode speed with random bf16 weights at the run's depth and vocab (speed, not quality)."""
    import torch
    from dev.nanochat_reference import count_tokens
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.tokenizer import load_tokenizer
    device = torch.device(sizes["device"])
    tokenizer = load_tokenizer(os.path.join(work, "tokenizer"))
    config = config_from_depth(sizes["depth"], tokenizer.get_vocab_size(), sequence_len=sizes["seq"])
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    model.to(torch.bfloat16).eval()
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog.", prepend=tokenizer.get_bos_token_id())
    figures = []
    stops = (engine.assistant_end, engine.bos)
    for batch in sizes["decode_batches"]:
        for attempt in ("warm-up", "timed"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            # counted as the decode benchmarks count: every unfinished row of each column
            produced = count_tokens(engine.generate(prompt, num_samples=batch, max_tokens=sizes["decode_tokens"],
                                                    temperature=1.0, seed=0), batch, stops)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
        figures.append(f"batch {batch}: {produced / dt:,.0f} tok/s")
    return ", ".join(figures) + " (bf16)"


def check_torchrun(sizes, work, env):
    args = base_train_args(sizes, 3, "gc_torchrun", "off")
    out, dt = run_stage("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=1", "-m", *args], work, env, module=False)
    if "step 00003/00003" not in out:
        raise CheckFailed("torchrun base_train did not reach step 3")
    backend = "nccl" if sizes["device"] == "cuda" else "gloo"
    return f"3 steps under torchrun ({backend}) in {dt:.0f}s"


# -----------------------------------------------------------------------------
# Main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run the CUDA paths the speedrun uses on one GPU and print a summary table.")
    p.add_argument("--dry-run", action="store_true", help="run the same checks on CPU at toy sizes")
    p.add_argument("--prepare", metavar="DIR", default=None,
                   help="only build the corpus shards and the tokenizer into DIR (to carry to a GPU box), then exit")
    p.add_argument("--assets", metavar="DIR", default=None, help="use the shards + tokenizer prepared in DIR")
    p.add_argument("--work-dir", default=None, help="artifacts and logs (default: a fresh temp dir)")
    p.add_argument("--json", default=None, help="also write the summary as JSON to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    import torch
    if not args.dry_run and not args.prepare and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or use --dry-run to rehearse the checks on CPU",
              file=sys.stderr)
        return 2
    work = os.path.abspath(args.prepare or args.work_dir or tempfile.mkdtemp(prefix="nanochat_gpu_check_"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    env = dict(os.environ, NANOCHAT_BASE_DIR=work, PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    if args.prepare:
        print(check_data_and_tokenizer(sizes, work, env, assets=None))
        print(f"prepared {work}: carry it and pass --assets {work}")
        return 0

    device_name = torch.cuda.get_device_name(0) if sizes["device"] == "cuda" else "cpu (dry run)"
    print(f"gpu_check: {device_name}, torch {torch.__version__}, work dir {work}", flush=True)
    checks = [
        ("data + tokenizer", lambda: check_data_and_tokenizer(sizes, work, env, args.assets)),
        (f"train d{sizes['depth']} compiled" + (" (dry run: compile off)" if args.dry_run else ""),
         lambda: check_train(sizes, work, env, compiled=True)),
        (f"train d{sizes['depth']} eager", lambda: check_train(sizes, work, env, compiled=False)),
        ("checkpoint resume", lambda: check_resume(sizes, work, env)),
        ("mid / sft / eval", lambda: check_mid_sft_eval(sizes, work, env)),
        ("engine decode", lambda: check_engine_decode(sizes, work)),
        ("torchrun", lambda: check_torchrun(sizes, work, env)),
    ]
    results = []
    for name, check in checks:
        t0 = time.time()
        try:
            results.append((name, "ok", check(), time.time() - t0))
        except CheckFailed as e:
            results.append((name, "FAIL", str(e), time.time() - t0))
        except Exception as e:  # a bug in a check still leaves the other rows to run
            results.append((name, "FAIL", f"{type(e).__name__}: {e}", time.time() - t0))

    print(f"\n## gpu_check summary: {device_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| check | status | figures | time |\n|---|---|---|---:|")
    for name, status, figures, dt in results:
        print(f"| {name} | {status} | {figures} | {dt:.0f}s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__,
                       "checks": [dict(name=n, status=s, figures=f_, seconds=round(d, 1)) for n, s, f_, d in results]},
                      f, indent=2)
    failed = [name for name, status, _, _ in results if status != "ok"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}; logs in {work}/logs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
