"""
Measure the recipe, not only the step: train the CPU-profile base model once per variant (a set of
scripts.base_train flags) for the same budget, and print one table of val bits/byte.

    python -m dev.bench_learning --variant "baseline:" --variant "lr2x: --matrix-lr 0.04" --tokens 1638400
    python -m dev.bench_learning --variant "baseline:" --variant "d6: --depth 6" --seconds 600   # wall-clock budget
    python -m dev.bench_learning --base-dir /tmp/bench_base ...   # reuse (or prepare once) a corpus + tokenizer

Every variant starts from the CPU profile of speedrun.sh (depth 3, seq 256, batch 16 x 256 tokens per step,
warmdown 0.5, value embeddings and smear, vocab 4096 on the embedded offline corpus); its flags are appended,
so they override (--no-value-embeds, --no-smear turn those off). Unless a variant sets
--total-batch-size, a step is one device batch (device-batch-size x max-seq-len tokens), as in speedrun.sh.

Budgets: --tokens (default) gives every variant the same number of training tokens: independent of machine
load, so prefer it on a shared machine. --seconds gives every variant the same training wall-clock: a short
probe run measures the variant's ms/step, and --num-iterations is set from it (the final evaluation is not
counted). Variants train one after another, never in parallel (set OMP_NUM_THREADS to the cores you may use).

Without --base-dir the embedded corpus and a 4096-token tokenizer are prepared in a temporary folder, which is
removed at the end. Each variant's checkpoints (tag bench_learning) are removed after it is measured.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from nanochat.common import ArgumentParser, NanochatError, run_main

# the CPU profile of speedrun.sh (its `cpu` branch), minus the horizon, which the budget sets
CPU_PROFILE = ["--depth", "3", "--max-seq-len", "256", "--device-batch-size", "16", "--warmdown-ratio", "0.5",
               "--value-embeds", "--smear", "--device", "cpu", "--sample-every", "0", "--save-every", "0",
               "--eval-every", "0", "--log-every", "1"]
MODEL_TAG = "bench_learning"


def parse_variant(text):
    """'name: --flag value ...' -> (name, [flags]). The name may not be empty; the flags may."""
    name, sep, flags = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise NanochatError(f"--variant {text!r}: write it as 'NAME: --flag value ...' (e.g. 'lr2x: --matrix-lr 0.04')")
    try:
        argv = shlex.split(flags)
    except ValueError as e:
        raise NanochatError(f"--variant {text!r}: cannot split its flags ({e})")
    for banned in ("--num-iterations", "--target-flops", "--target-param-data-ratio", "--model-tag", "--resume"):
        if banned in argv:
            raise NanochatError(f"--variant {name!r}: {banned} is set by the benchmark (use --tokens or --seconds)")
    return name, argv


def variant_argv(flags, eval_tokens):
    """The full base_train argv of a variant (without the horizon) and its tokens per optimizer step."""
    from scripts.base_train import build_parser
    argv = CPU_PROFILE + ["--model-tag", MODEL_TAG] + list(flags)
    args = build_parser().parse_args(argv)
    if "--total-batch-size" not in flags:
        argv += ["--total-batch-size", str(args.device_batch_size * args.max_seq_len)]
        args = build_parser().parse_args(argv)
    # evaluate the same number of val tokens for every variant (rounded to whole device batches)
    rows = args.device_batch_size * args.max_seq_len
    argv += ["--eval-tokens", str(max(rows, eval_tokens // rows * rows))]
    return argv, args.total_batch_size


STEP_RE = re.compile(r"^step (\d+)/\d+ \|.* \| (\d+) ms \|")
VAL_RE = re.compile(r"^step \d+ \| val bpb ([0-9.]+)")


def parse_log(text):
    """(final val bpb or None, [ms of each logged training step]) from base_train's output."""
    bpb, step_ms = None, []
    for line in text.splitlines():
        m = VAL_RE.match(line)
        if m:
            bpb = float(m.group(1))
        m = STEP_RE.match(line)
        if m:
            step_ms.append(int(m.group(2)))
    return bpb, step_ms


def train(python, argv, num_iterations, base_dir, log_path):
    """Run base_train; return (its output, wall seconds). A failed run stops the benchmark with its log."""
    cmd = [python, "-m", "scripts.base_train"] + argv + ["--num-iterations", str(num_iterations)]
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, PYTHONUNBUFFERED="1")
    t0 = time.time()
    lines = []
    with open(log_path, "a") as f:   # streamed, so a long run can be followed with tail -f
        f.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            lines.append(line)
            f.write(line)
            f.flush()
        returncode = proc.wait()
    wall = time.time() - t0
    shutil.rmtree(os.path.join(base_dir, "base_checkpoints", MODEL_TAG), ignore_errors=True)
    if returncode != 0:
        tail = "".join(lines).strip().splitlines()[-1:] or ["(no output)"]
        raise NanochatError(f"base_train failed (exit {returncode}): {tail[0]}; full log: {log_path}")
    return "".join(lines), wall


def prepare(python, base_dir, vocab_size):
    """The embedded corpus and a tokenizer in base_dir (each is kept when base_dir already has one)."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir)
    data_dir = os.path.join(base_dir, "base_data")
    has_shards = os.path.isdir(data_dir) and any(f.endswith(".parquet") for f in os.listdir(data_dir))
    steps = [] if has_shards else [[python, "-m", "nanochat.dataset", "--embedded"]]
    if not os.path.exists(os.path.join(base_dir, "tokenizer", "token_bytes.json")):
        steps.append([python, "-m", "scripts.tok_train", "--max-chars", "40000000", "--vocab-size", str(vocab_size)])
    for cmd in steps:
        print(f"preparing: {shlex.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise NanochatError(f"preparing {base_dir} failed: {(proc.stdout.strip().splitlines() or ['?'])[-1]}")


def format_table(rows):
    """Markdown table of the measured variants; the delta is against the first row."""
    lines = ["| variant | flags | steps | tokens | train s | tok/s | val bpb | Δ vs first |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    first = rows[0]["bpb"] if rows else None
    for r in rows:
        delta = f"{r['bpb'] - first:+.4f}" if r["bpb"] is not None and first is not None else "-"
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "-"
        lines.append(f"| {r['name']} | `{shlex.join(r['flags']) or '(profile)'}` | {r['steps']:,} | {r['tokens']:,} "
                     f"| {r['seconds']:.0f} | {r['tokens'] / max(r['seconds'], 1e-9):,.0f} | {bpb} | {delta} |")
    return "\n".join(lines)


def main(argv=None):
    p = ArgumentParser(description="Val bits/byte of base_train variants at the same token or wall-clock budget.")
    p.add_argument("--variant", action="append", default=[],
                   help="'NAME: --flag value ...' (repeat; default: baseline)")
    p.add_argument("--tokens", type=int, default=1_638_400,
                   help="training tokens per variant (default: 400 steps of 4096)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="training seconds per variant instead of --tokens (0: off)")
    p.add_argument("--probe-steps", type=int, default=30,
                   help="steps of the probe run that measures ms/step (--seconds)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="val tokens of the final evaluation")
    p.add_argument("--base-dir", default=None,
                   help="corpus + tokenizer folder (prepared when missing; default: a temp folder)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocab when preparing")
    p.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "bench_learning.log"),
                   help="append every base_train command and output here")
    args = p.parse_args(argv)
    if args.tokens <= 0 or args.seconds < 0 or args.probe_steps < 3:
        raise NanochatError("--tokens must be > 0, --seconds >= 0 and --probe-steps >= 3")
    variants = [parse_variant(v) for v in (args.variant or ["baseline:"])]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise NanochatError(f"variant names must differ (got {names})")
    python = sys.executable

    tmp = None if args.base_dir else tempfile.mkdtemp(prefix="bench_learning_")
    base_dir = os.path.abspath(args.base_dir or tmp)
    log_path = os.path.abspath(args.log)
    try:
        os.makedirs(base_dir, exist_ok=True)
        prepare(python, base_dir, args.vocab_size)
        rows = []
        for name, flags in variants:
            argv_v, step_tokens = variant_argv(flags, args.eval_tokens)
            if args.seconds:
                probe, _ = train(python, argv_v, args.probe_steps, base_dir, log_path)
                # the first steps are warm-up (allocator, caches); the median ignores a step slowed by a hiccup
                ms = sorted(parse_log(probe)[1][2:])
                steps = max(1, int(args.seconds * 1000 / ms[len(ms) // 2]))
            else:
                steps = max(1, round(args.tokens / step_tokens))
            print(f"{name}: {steps} steps x {step_tokens:,} tokens", flush=True)
            out, _ = train(python, argv_v, steps, base_dir, log_path)
            bpb, step_ms = parse_log(out)
            rows.append(dict(name=name, flags=flags, steps=steps, tokens=steps * step_tokens,
                             seconds=sum(step_ms) / 1000, bpb=bpb))
            print(f"{name}: val bpb {bpb}", flush=True)
        budget = f"{args.seconds:g} s of training" if args.seconds else f"{args.tokens:,} tokens"
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        print(f"\nbudget: {budget} per variant; OMP_NUM_THREADS={threads}; log: {log_path}")
        print(format_table(rows))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
