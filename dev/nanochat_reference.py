"""
The same-run reference for dev/bench_train.py and dev/bench_engine.py: karpathy/nanochat's own GPT
and Engine, run from a checkout of it in a subprocess, timed round by round in turn with ours.

    git --git-dir=<bare clone of karpathy/nanochat> archive bc1fca3 | tar -x -C /tmp/nanochat_ref
    python dev/bench_train.py --reference /tmp/nanochat_ref
    python -m dev.bench_engine --reference /tmp/nanochat_ref

Both packages are called `nanochat`, so the reference lives in its own process whose import path
holds only the checkout (never this repo): `ReferenceWorker` (used by the benchmarks) starts
`python dev/nanochat_reference.py --reference PATH --mode train|engine ...`, which builds the
reference model, warms it up, and then answers one command per line on stdin with one JSON line:
    train N                 -> {"seconds": [N full-step times], "cpu_seconds": [their process CPU times]}
    decode BATCH NEW SEED   -> {"seconds": s, "cpu_seconds": c, "tokens": n}
The reference code is read from the checkout, never copied here. Shims, all outside its timed code:
stdout is redirected (its setup prints), `nanochat.checkpoint_manager` (imported by its engine,
unused here) is replaced by an empty module, and its Engine gets a minimal tokenizer with our
special-token ids (only the stop/tool ids are ever looked up while decoding random weights).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

# -----------------------------------------------------------------------------
# Client side (imported by the benchmarks)


class ReferenceWorker:
    """A running reference process; `ask(command)` -> its JSON answer. Its stderr goes to a temp
    file that is shown when it fails."""

    def __init__(self, reference_path, mode, **options):
        path = os.path.abspath(reference_path)
        if not os.path.isfile(os.path.join(path, "nanochat", "gpt.py")):
            raise SystemExit(f"--reference {reference_path}: no nanochat/gpt.py there; point it at a checkout of "
                             f"karpathy/nanochat (e.g. git archive bc1fca3 | tar -x -C /tmp/nanochat_ref)")
        cmd = [sys.executable, os.path.abspath(__file__), "--reference", path, "--mode", mode]
        for key, value in options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ, PYTHONPATH=path)  # the reference's `nanochat`, never ours
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=path)
        self.info = self._read()  # sent once the model is built and warmed up

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise SystemExit(f"the reference process failed (exit {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


# -----------------------------------------------------------------------------
# Worker side (this file run as a script, with only the reference checkout on the import path)


def worker_train(args, send):
    import torch
    from nanochat.gpt import GPT, GPTConfig
    width = args.depth * 64  # nanochat's base_train: model_dim = depth * 64, one head per 128 channels
    heads = max(1, (width + 127) // 128)
    cfg = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                    n_kv_head=heads, n_embd=width)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizers = model.setup_optimizers()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step():  # as nanochat's base_train on CPU: fp32 (autocast only on CUDA), then every optimizer
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # also compiles Muon's torch.compile'd Newton-Schulz
        step()
    send({"params": sum(p.numel() for p in model.parameters()), "flops_per_token": model.estimate_flops()})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] != "train":
            raise SystemExit(f"unknown command {line!r}")
        seconds, cpu = [], []
        for _ in range(int(cmd[1])):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        send({"seconds": seconds, "cpu_seconds": cpu})


class _SpecialsTokenizer:
    """What nanochat's Engine asks of a tokenizer while decoding: special ids (ours, passed in), and
    decode/encode only for a calculator call, which its calculator refuses for this text."""

    def __init__(self, specials):
        self.specials = specials

    def encode_special(self, name):
        return self.specials[name]

    def get_bos_token_id(self):
        return self.specials["<|bos|>"]

    def decode(self, ids):
        return "?" * len(ids)

    def encode(self, text):
        return []


def worker_engine(args, send):
    import torch
    sys.modules["nanochat.checkpoint_manager"] = types.ModuleType("nanochat.checkpoint_manager")
    sys.modules["nanochat.checkpoint_manager"].load_model = None  # imported by its engine, unused here
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    width = args.depth * 64
    heads = max(1, (width + 127) // 128)
    cfg = GPTConfig(sequence_len=2048, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                    n_kv_head=heads, n_embd=width)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # the same non-degenerate random weights as ours (its init zeroes the head)
        for p in model.parameters():
            p.normal_(0.0, p.size(-1) ** -0.5)
    model.eval()
    specials = json.loads(args.specials)
    engine = Engine(model, _SpecialsTokenizer(specials))
    stops = {specials["<|bos|>"], specials["<|assistant_end|>"]}
    prompt = json.loads(args.prompt)

    def decode(batch, new_tokens, seed):
        t0, c0 = time.perf_counter(), time.process_time()
        n = count_tokens(engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=1.0, seed=seed),
                         batch, stops)
        return time.perf_counter() - t0, time.process_time() - c0, n

    decode(1, 8, 1000)
    send({"params": sum(p.numel() for p in model.parameters())})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] != "decode":
            raise SystemExit(f"unknown command {line!r}")
        seconds, cpu_seconds, n = decode(int(cmd[1]), int(cmd[2]), int(cmd[3]))
        send({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": n})


def count_tokens(columns, batch, stops):
    """Generated tokens as both benchmarks count them: per column, every row not yet finished
    (the stop token itself included). The same function counts ours (bench_engine imports it)."""
    done, n = [False] * batch, 0
    for column, _ in columns:
        for r, tok in enumerate(column):
            if not done[r]:
                n += 1
                done[r] = tok in stops
        if all(done):
            break
    return n


def main():
    parser = argparse.ArgumentParser(description="nanochat reference worker (started by the benchmarks)")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--mode", required=True, choices=["train", "engine"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--specials", default="{}")
    parser.add_argument("--prompt", default="[]")
    args = parser.parse_args()
    # only the checkout on the import path: drop this script's folder and anything naming our repo
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [args.reference] + [p for p in sys.path if p and os.path.abspath(p) not in (ours, os.path.dirname(
        os.path.abspath(__file__)))]
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import nanochat
    origin = os.path.dirname(os.path.abspath(nanochat.__file__))
    if not origin.startswith(os.path.abspath(args.reference)):
        raise SystemExit(f"imported the wrong nanochat from {origin}")
    proto = sys.stdout
    sys.stdout = sys.stderr  # the reference prints during setup; only our JSON lines go to the parent

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    (worker_train if args.mode == "train" else worker_engine)(args, send)


if __name__ == "__main__":
    main()
