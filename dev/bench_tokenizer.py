"""
Benchmark BPE training: our rustbpe vs PyPI rustbpe 0.1.0 vs HuggingFace tokenizers.

Each trainer runs in its own subprocess (so peak memory is its own) on the same documents, the
same split pattern and the same vocab size; we check that ours and PyPI's give the same merges,
token for token, and print times, ratios and peak RSS.

    python dev/bench_tokenizer.py                         # ~40 MB of the embedded corpus, vocab 32768
    python dev/bench_tokenizer.py --text-file big.txt --max-chars 40000000 --repeats 5

PyPI rustbpe must be importable from a separate folder (both are called `rustbpe`):
    pip install --target /tmp/pypi_rustbpe rustbpe==0.1.0      (or pass --pypi-path)
"""

import argparse
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from nanochat.common import NanochatError, run_main

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TRAINERS = ["ours", "pypi", "hf"]

# -----------------------------------------------------------------------------
# Child: train one tokenizer on the corpus and report time, peak memory and the ranks


def peak_rss_mb():
    """This process's peak resident memory. VmHWM starts afresh at exec, unlike ru_maxrss, which
    a child inherits from the parent it was forked from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_in_child(which, corpus_path, vocab_size, pattern, pypi_path, out_path):
    with open(corpus_path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    rss_before_mb = peak_rss_mb()
    if which == "pypi":
        sys.path.insert(0, pypi_path)
    if which in ("ours", "pypi"):
        import rustbpe
        origin = os.path.dirname(os.path.abspath(rustbpe.__file__))
        is_pypi = origin.startswith(os.path.abspath(pypi_path))
        if is_pypi != (which == "pypi"):
            raise NanochatError(f"{which}: imported the wrong rustbpe from {origin}")
        tok = rustbpe.Tokenizer()
        t0 = time.perf_counter()
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
        seconds = time.perf_counter() - t0
        ranks = tok.get_mergeable_ranks()
    else:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        t0 = time.perf_counter()
        tok.train_from_iterator(iter(docs), trainer)
        seconds = time.perf_counter() - t0
        ranks = None
    with open(out_path, "wb") as f:
        pickle.dump({"seconds": seconds, "peak_mb": peak_rss_mb(), "before_mb": rss_before_mb,
                     "ranks": ranks}, f)

# -----------------------------------------------------------------------------
# Parent: build the corpus, run the children, compare


def load_documents(text_file, max_chars):
    """Documents totalling about max_chars: paragraphs of a text file, or the embedded corpus
    (cycled if it is smaller than max_chars)."""
    if text_file:
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read(max_chars)
        except (OSError, UnicodeDecodeError) as e:
            raise NanochatError(f"cannot read {text_file} as UTF-8 text ({e}); pass a readable UTF-8 file")
        if not text:
            raise NanochatError(f"{text_file} is empty; pass a file with text in it")
        docs = [p + "\n\n" for p in text.split("\n\n")]
        return docs, f"{text_file} (split into paragraphs)"
    from nanochat.corpus import collect_embedded_documents
    base, _ = collect_embedded_documents()
    base_chars = sum(len(d) for d in base)
    docs, total = [], 0
    while total < max_chars:
        for d in base:
            docs.append(d)
            total += len(d)
            if total >= max_chars:
                break
    note = f"embedded corpus ({len(base)} docs, {base_chars / 1e6:.1f} M chars"
    note += ", cycled)" if base_chars < max_chars else ")"
    return docs, note


def machine_description():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, {model}, {platform.system()}; load average {load:.1f} at start"


def run_child(which, corpus_path, args, workdir):
    out_path = os.path.join(workdir, f"{which}.pkl")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--corpus", corpus_path,
           "--vocab-size", str(args.vocab_size), "--pattern", args.pattern, "--pypi-path", args.pypi_path,
           "--out", out_path]
    # Run outside the repository so the only rustbpe found is the installed one (or PyPI's).
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NanochatError(f"{which} trainer failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(out_path, "rb") as f:
        return pickle.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark BPE training (ours vs PyPI rustbpe vs HF tokenizers)")
    parser.add_argument("--text-file", default=None, help="UTF-8 text to train on (default: the embedded corpus)")
    parser.add_argument("--max-chars", type=int, default=40_000_000, help="characters of text to train on")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--pattern", default=SPLIT_PATTERN, help="split regex, passed to every trainer")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer (best and median are shown)")
    parser.add_argument("--trainers", default="ours,pypi,hf", help="comma-separated subset of ours,pypi,hf")
    parser.add_argument("--pypi-path", default=os.environ.get("RUSTBPE_PYPI_PATH", "/tmp/pypi_rustbpe"),
                        help="folder where PyPI rustbpe 0.1.0 is installed (pip install --target)")
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        train_in_child(args.child, args.corpus, args.vocab_size, args.pattern, args.pypi_path, args.out)
        return
    trainers = [t for t in args.trainers.split(",") if t]
    if any(t not in TRAINERS for t in trainers):
        raise NanochatError(f"--trainers must be a subset of {','.join(TRAINERS)}, got {args.trainers}")
    if "pypi" in trainers and not os.path.isdir(os.path.join(args.pypi_path, "rustbpe")):
        raise NanochatError(f"PyPI rustbpe not found in {args.pypi_path}; run "
                            f"`pip install --target {args.pypi_path} rustbpe==0.1.0` or pass --pypi-path")

    # --- corpus
    docs, source = load_documents(args.text_file, args.max_chars)
    n_chars = sum(len(d) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"machine: {machine_description()}")
    print(f"corpus: {source}: {len(docs)} documents, {n_chars / 1e6:.1f} M chars, {n_bytes / 1e6:.1f} MB UTF-8")
    print(f"vocab size {args.vocab_size}, pattern {args.pattern!r}, {args.repeats} runs each, interleaved")

    with tempfile.TemporaryDirectory() as workdir:
        corpus_path = os.path.join(workdir, "corpus.jsonl")
        with open(corpus_path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
        del docs

        # --- runs, interleaved so that background load hits every trainer alike
        results = {t: [] for t in trainers}
        for r in range(args.repeats):
            for t in trainers:
                res = run_child(t, corpus_path, args, workdir)
                results[t].append(res)
                print(f"  run {r + 1} {t:5s} {res['seconds']:7.2f} s   peak RSS {res['peak_mb']:7.0f} MB "
                      f"(corpus loaded: {res['before_mb']:.0f} MB)", flush=True)

    # --- same merges?
    if "ours" in trainers and "pypi" in trainers:
        ours_ranks = results["ours"][0]["ranks"]
        pypi_ranks = results["pypi"][0]["ranks"]
        if ours_ranks != pypi_ranks:
            first = next((i for i, (a, b) in enumerate(zip(ours_ranks, pypi_ranks)) if a != b),
                         min(len(ours_ranks), len(pypi_ranks)))
            raise NanochatError(f"ours and PyPI rustbpe disagree from token {first} "
                                f"({len(ours_ranks)} vs {len(pypi_ranks)} tokens); this is a bug in ours")
        print(f"merges: ours == PyPI rustbpe, all {len(ours_ranks)} tokens identical")

    # --- summary
    print(f"\n{'trainer':8s} {'best s':>8s} {'median s':>9s} {'peak RSS MB':>12s}")
    summary = {}
    for t in trainers:
        secs = [r["seconds"] for r in results[t]]
        summary[t] = (min(secs), statistics.median(secs), max(r["peak_mb"] for r in results[t]))
        print(f"{t:8s} {summary[t][0]:8.2f} {summary[t][1]:9.2f} {summary[t][2]:12.0f}")
    if "ours" in summary:
        for other in ("pypi", "hf"):
            if other in summary:
                print(f"speed-up vs {other}: {summary[other][0] / summary['ours'][0]:.1f}x (best), "
                      f"{summary[other][1] / summary['ours'][1]:.1f}x (median)")


if __name__ == "__main__":
    run_main(main)
