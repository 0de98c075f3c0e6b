"""
Pre-flight check: does everything a run will touch agree with everything else?

    python -m nanochat.doctor                                   # what the next stage uses by default
    python -m nanochat.doctor --checkpoint base --tokenizer ~/.cache/nanochat/tokenizer_ext
    python -m nanochat.doctor --checkpoint ~/.cache/nanochat/base_checkpoints/d4/step_000100 --freeze-until-index 4096
    python -m nanochat.doctor --depth 20 --device-batch-size 32 --max-seq-len 2048   # will the planned run fit?

Prints a table (check | status | detail) of tokenizer fingerprints across the tokenizer, the data
(pre-tokenized shards) and the checkpoints; vocab sizes; special-token ids within the embedding; the
freeze index; shard token-id ranges; free disk and device memory for the planned run. Without --checkpoint
it checks the newest checkpoint of every stage (base, mid, sft, rl): each through the loaders' validated
path (files, checksums, headers, shapes) and against the tokenizer. Step directories without a COMPLETE
marker are listed. Exits 1 on any mismatch, 0 otherwise (warnings don't fail). `check_all(...)` returns the
same rows for stage scripts. --no-verify (or NANOCHAT_VERIFY_CHECKSUMS=0) skips the checksums.
"""

import os
import shutil

from nanochat.common import ArgumentParser, NanochatError, get_base_dir, read_json, run_main

OK, WARN, FAIL, SKIP = "ok", "warn", "MISMATCH", "skip"


class Checks:
    """Collects rows; `run(name, fn)` turns a NanochatError raised by fn into a MISMATCH row."""

    def __init__(self):
        self.rows = []

    def add(self, name, status, detail):
        self.rows.append((name, status, detail))

    def run(self, name, fn):
        try:
            status, detail = fn()
        except NanochatError as e:
            status, detail = FAIL, str(e)
        self.add(name, status, detail)

    @property
    def failed(self):
        return any(status == FAIL for _, status, _ in self.rows)


# -----------------------------------------------------------------------------
# Locating things

def resolve_checkpoint(spec):
    """(tag dir, step or None for the newest complete one) of a step dir, a tag dir, or a source name
    (base|mid|sft|rl: its newest tag)."""
    from nanochat import checkpoint_manager as cm
    if spec in cm.STAGE_DIRS:
        root = cm.checkpoints_root(spec)
        tag = cm.find_latest_tag(root)
        if tag is None:
            raise NanochatError(f"no {spec} checkpoints in {root}")
        spec = os.path.join(root, tag)
    spec = os.path.abspath(os.path.expanduser(spec))
    step = cm.step_of(os.path.basename(spec))
    if step is not None and os.path.isdir(spec):
        return os.path.dirname(spec), step
    if cm.list_complete_steps(spec) or cm.incomplete_steps(spec):
        return spec, None
    raise NanochatError(f"no checkpoint at {spec} (a step_* dir, a tag dir, or base|mid|sft|rl)")


def newest_checkpoints():
    """{stage: tag dir} of the newest tag of every stage that has one."""
    from nanochat import checkpoint_manager as cm
    out = {}
    for stage in cm.STAGE_DIRS:
        root = cm.checkpoints_root(stage)
        tag = cm.find_latest_tag(root)
        if tag is not None:
            out[stage] = os.path.join(root, tag)
    return out


def open_checkpoint_fully(checkpoint_dir, step=None, verify=None):
    """The loaders' validated path over every file of the step (all ranks' optimizer state too: checksums
    and readable headers), so doctor says ok only for a checkpoint every consumer can load."""
    from nanochat import checkpoint_manager as cm
    ckpt = cm.open_checkpoint(checkpoint_dir, step, verify, all_files=True)
    recorded = [f for f in (ckpt.meta.get("checksums") or {}) if f.startswith("optim_rank")]
    present = [f for f in os.listdir(ckpt.dir) if f.startswith("optim_rank") and f.endswith(".pt")]
    for name in sorted(set(recorded) | set(present)):
        cm.load_optimizer_states(ckpt, int(name[len("optim_rank"):-len(".pt")]), "cpu", mmap=True)
    return ckpt


# -----------------------------------------------------------------------------
# Problems as one-line strings: shared by the table below and base_train's pre-flight

def pretokenized_problems(pretok_dir, fingerprint, tokenizer_desc, model_vocab_size):
    """Pre-tokenized shards against a tokenizer fingerprint and the model's vocab."""
    from nanochat.dataset import PRETOK_META
    meta_path = os.path.join(pretok_dir, PRETOK_META)
    if not os.path.exists(meta_path):
        return [f"no pre-tokenized shards in {pretok_dir}; run `python -m nanochat.dataset --pretokenize`"]
    meta = read_json(meta_path, "pre-tokenized shard metadata")
    problems = []
    if meta.get("fingerprint") != fingerprint:
        problems.append(f"pre-tokenized data {pretok_dir} was made by tokenizer {str(meta.get('fingerprint'))[:16]} "
                        f"(vocab {meta.get('vocab_size')}) but {tokenizer_desc} is {fingerprint[:16]}")
    max_id = max((f.get("max_id", -1) for f in meta.get("files", [])), default=-1)
    if model_vocab_size is not None and max_id >= model_vocab_size:
        problems.append(f"pre-tokenized data {pretok_dir} holds token id {max_id}, "
                        f"outside the model's vocab of {model_vocab_size}")
    return problems


def preflight_problems(tokenizer, tokenizer_dir, model_vocab_size, resume_dir=None, resume_meta=None, pretok_dir=None):
    """base_train's pre-flight: every disagreement between the tokenizer, the model's vocab (on --resume the
    checkpoint's), the checkpoint it resumes and the pre-tokenized data, as one-line problems (empty: all agree)."""
    problems = []
    fp, vocab = tokenizer.fingerprint, tokenizer.get_vocab_size()
    if model_vocab_size != vocab:
        problems.append(f"the model is built for vocab {model_vocab_size} but the tokenizer {tokenizer_dir} "
                        f"has {vocab} ids")
    if resume_meta is not None:
        ck_fp = resume_meta.get("tokenizer_fingerprint")
        if ck_fp != fp:
            problems.append(f"checkpoint {resume_dir} was trained with tokenizer {str(ck_fp)[:16]} "
                            f"but the tokenizer {tokenizer_dir} is {fp[:16]}")
    bad_specials = sorted(i for i in tokenizer.special_tokens.values() if not 0 <= i < model_vocab_size)
    if bad_specials:
        problems.append(f"{len(bad_specials)} special token ids ({bad_specials[0]}..{bad_specials[-1]}) "
                        f"are outside the model's vocab of {model_vocab_size}")
    if pretok_dir is not None:
        desc = f"the tokenizer {tokenizer_dir} (vocab {vocab})"
        problems += pretokenized_problems(pretok_dir, fp, desc, model_vocab_size)
    return problems


# -----------------------------------------------------------------------------
# The checks

def check_all(tokenizer_dir=None, checkpoint=None, data_dir=None, pretok_dir=None, freeze_until_index=None,
              depth=None, device_batch_size=None, max_seq_len=None, verify=None):
    """Run every check that the given artifacts allow; returns a Checks with rows. Without `checkpoint`,
    the newest checkpoint of every stage is checked."""
    from nanochat.tokenizer import load_tokenizer
    checks = Checks()
    base = get_base_dir()

    # --- tokenizer: manifest vs its files
    tokenizer = None
    tokenizer_dir = os.path.abspath(tokenizer_dir or os.path.join(base, "tokenizer"))

    def tok():
        nonlocal tokenizer
        tokenizer = load_tokenizer(tokenizer_dir)
        lineage = ""
        if tokenizer.parent_fingerprint:
            lineage = f", extended from {tokenizer.parent_fingerprint[:16]} (original vocab {tokenizer.original_vocab_size:,})"
        return OK, f"{tokenizer.kind}, vocab {tokenizer.get_vocab_size():,}, fingerprint {tokenizer.fingerprint[:16]}{lineage} ({tokenizer_dir})"
    checks.run("tokenizer", tok)

    # --- checkpoints: the one given, or the newest of every stage (what the next stage loads by default);
    # each through the loaders' validated path, then against the tokenizer above
    from nanochat import checkpoint_manager as cm
    config = ckpt_tok = None
    if checkpoint:
        targets = [("checkpoint", checkpoint)]
    else:
        targets = [(f"{stage} checkpoint", tag_dir) for stage, tag_dir in newest_checkpoints().items()]
        if not targets:
            checks.add("checkpoints", SKIP, f"none yet in {base}")
    for name, spec in targets:
        opened = []

        def ckpt():
            checkpoint_dir, step = resolve_checkpoint(spec)
            c = open_checkpoint_fully(checkpoint_dir, step, verify)
            opened.append(c)
            verified = c.meta.get("checksums") and cm.verify_enabled(verify)
            return OK, (f"{c.dir}: {c.config.arch}, {c.config.n_layer} layers, vocab {c.config.vocab_size:,} "
                        f"(embedding rows {c.config.padded_vocab_size:,}), tokenizer {c.tokenizer.fingerprint[:16]}, "
                        f"checksums {'verified' if verified else 'not verified'}")
        checks.run(name, ckpt)
        if not opened:
            continue
        c = opened[0]
        if checkpoint:
            config, ckpt_tok = c.config, c.tokenizer
        if tokenizer is not None:
            def same_tok():
                if c.tokenizer.fingerprint == tokenizer.fingerprint:
                    return OK, f"checkpoint and tokenizer agree ({tokenizer.fingerprint[:16]})"
                hint = ("the tokenizer extends the checkpoint's: grow the checkpoint with python -m scripts.extend_checkpoint"
                        if tokenizer.parent_fingerprint == c.tokenizer.fingerprint else
                        "use the tokenizer the model was trained with (it travels in the checkpoint's tokenizer/ dir)")
                return FAIL, (f"checkpoint {c.dir} tokenizer {c.tokenizer.fingerprint[:16]} "
                              f"(vocab {c.tokenizer.get_vocab_size():,}) != tokenizer {tokenizer.fingerprint[:16]} "
                              f"(vocab {tokenizer.get_vocab_size():,}) in {tokenizer_dir}; {hint}")
            checks.run(f"{name} vs tokenizer", same_tok)

    # --- step directories without COMPLETE (an interrupted save or copy): loaders skip them, so say so
    partial = []
    for stage in cm.STAGE_DIRS:
        root = cm.checkpoints_root(stage)
        for tag in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            tag_dir = os.path.join(root, tag)
            partial += [os.path.join(tag_dir, cm.step_dirname(s)) for s in cm.incomplete_steps(tag_dir)]
    if partial:
        checks.add("incomplete steps", WARN, f"no {cm.COMPLETE_MARKER} marker (an interrupted save or copy; loaders "
                                             f"skip them): {', '.join(partial)}; delete them or finish copying them")
    else:
        checks.add("incomplete steps", OK, "none")

    # --- special tokens must have rows in the embedding
    ref_tok = ckpt_tok or tokenizer
    if ref_tok is not None:
        def specials():
            rows = config.padded_vocab_size if config is not None else ref_tok.get_vocab_size()
            bad = {n: i for n, i in ref_tok.special_tokens.items() if not 0 <= i < min(rows, ref_tok.get_vocab_size())}
            if bad:
                return FAIL, f"special token ids outside the embedding ({rows:,} rows): {bad}"
            top = max(ref_tok.special_tokens.values())
            return OK, f"{len(ref_tok.special_tokens)} special tokens, ids up to {top:,} < {rows:,} embedding rows"
        checks.run("special tokens", specials)

    # --- freeze index
    if freeze_until_index is not None and ref_tok is not None:
        def freeze():
            v = ref_tok.get_vocab_size()
            if not 0 <= freeze_until_index <= v:
                return FAIL, f"--freeze-until-index {freeze_until_index} is outside 0..{v:,} (the vocab size)"
            original = ref_tok.original_vocab_size
            note = "" if freeze_until_index == original else f" (the tokenizer's original vocab is {original:,})"
            return OK, f"rows < {freeze_until_index:,} of {v:,} frozen{note}"
        checks.run("freeze index", freeze)

    # --- data: parquet shards
    from nanochat import dataset
    data_dir = os.path.abspath(data_dir or dataset.default_data_dir())

    def shards():
        files = dataset.list_parquet_files(data_dir)
        for path in files:
            dataset.check_parquet_shard(path)
        return OK, f"{len(files)} readable parquet shards in {data_dir} (last = validation)"
    if os.path.isdir(data_dir):
        checks.run("text shards", shards)
    else:
        checks.add("text shards", SKIP, f"no {data_dir}")

    # --- data: pre-tokenized shards (fingerprint and id range vs the tokenizer / model)
    if pretok_dir is None and tokenizer is not None:
        pretok_dir = dataset.pretokenized_dir(tokenizer.fingerprint)
    if pretok_dir and os.path.isfile(os.path.join(pretok_dir, dataset.PRETOK_META)):
        def pretok():
            pmeta = read_json(os.path.join(pretok_dir, dataset.PRETOK_META), "pre-tokenized shard metadata")
            vocab = config.vocab_size if config is not None else (tokenizer.get_vocab_size() if tokenizer else None)
            ref = ckpt_tok or tokenizer
            if ref is not None:
                where = "the checkpoint's tokenizer" if ckpt_tok else f"the tokenizer {tokenizer_dir}"
                problems = pretokenized_problems(pretok_dir, ref.fingerprint, where, vocab)
                if problems:
                    return FAIL, "; ".join(problems) + "; pre-tokenize again"
            max_id = max((f["max_id"] for f in pmeta.get("files", [])), default=-1)
            ntok = sum(f["num_tokens"] for f in pmeta.get("files", []))
            return OK, f"{ntok:,} tokens, ids 0..{max_id:,} < vocab {vocab if vocab is not None else '?'}, fingerprint agrees ({pretok_dir})"
        checks.run("pre-tokenized shards", pretok)
    else:
        checks.add("pre-tokenized shards", SKIP, "none (the loader tokenizes text on the fly)")

    # --- resources for the planned run
    free = shutil.disk_usage(base).free
    checks.add("disk", OK if free > 2 << 30 else WARN, f"{free / 2**30:.1f} GiB free in {base}")
    need = None
    if depth is not None and ref_tok is not None:
        from nanochat.gpt import GPT, config_from_depth
        import torch
        cfg = config_from_depth(depth, ref_tok.get_vocab_size(), sequence_len=max_seq_len or 2048)
        with torch.device("meta"):
            nparams = GPT(cfg).num_params()
        B, T = device_batch_size or 32, max_seq_len or 2048
        # weights + grads + optimizer moments ~16 bytes/param in fp32; activations ~ a rough 34*B*T*d*layers bytes (bf16)
        need = 16 * nparams + 34 * B * T * cfg.n_embd * cfg.n_layer + 4 * B * T * cfg.padded_vocab_size
        checks.add("planned model", OK, f"depth {depth}: {nparams / 1e6:.1f}M params, ~{need / 2**30:.1f} GiB for B={B}, T={T}")
    avail, where = _device_memory()
    if avail is None:
        checks.add("device memory", SKIP, where)
    elif need is not None and need > avail:
        checks.add("device memory", WARN, f"{avail / 2**30:.1f} GiB free on {where}, the planned run needs ~{need / 2**30:.1f} GiB: lower --device-batch-size")
    else:
        checks.add("device memory", OK, f"{avail / 2**30:.1f} GiB free on {where}")
    return checks


def _device_memory():
    try:
        import torch
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return free, torch.cuda.get_device_name()
    except Exception as e:  # a broken driver should not hide the rest of the table
        return None, f"could not query the GPU ({e.__class__.__name__})"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "cpu (RAM)"
    except (OSError, KeyError, ValueError):
        return None, "unknown"


def sandbox_row(require_confinement):
    """Whether model-written code (HumanEval in chat_eval) can run here: the kernel must confine it. A run
    that will evaluate HumanEval asks with require_confinement, so it stops now rather than hours later."""
    from nanochat.sandbox import describe, sandbox_capabilities
    capabilities = sandbox_capabilities()
    if capabilities["confined"]:
        return OK, describe(capabilities)
    consequence = "chat_eval will refuse HumanEval (fix the kernel setup, or pass --unsafe-execution to chat_eval)"
    return (FAIL if require_confinement else WARN), f"{describe(capabilities)}; {consequence}"


def format_table(rows):
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{name:<{w0}}  {status:<{w1}}  {detail}" for name, status, detail in rows)


def preflight(**kwargs):
    """For stage scripts: run the checks and raise the first mismatch as a NanochatError."""
    checks = check_all(**kwargs)
    for name, status, detail in checks.rows:
        if status == FAIL:
            raise NanochatError(f"pre-flight check '{name}' failed: {detail}")
    return checks


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = ArgumentParser(description="Check that tokenizer, data and checkpoint agree before a run")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default <base>/tokenizer)")
    parser.add_argument("--checkpoint", default=None,
                        help="step dir, tag dir, or base|mid|sft|rl (default: the newest of each stage)")
    parser.add_argument("--data", default=None, help="parquet shard dir (default <base>/base_data)")
    parser.add_argument("--pretokenized", default=None, help="pre-tokenized shard dir (default: the tokenizer's)")
    parser.add_argument("--freeze-until-index", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="planned model depth (memory estimate)")
    parser.add_argument("--device-batch-size", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--no-verify", action="store_true", help="skip checkpoint checksums (very large checkpoints)")
    parser.add_argument("--require-sandbox", action="store_true",
                        help="a MISMATCH (not a warning) when the kernel cannot confine model-written code")
    args = parser.parse_args(argv)
    checks = check_all(tokenizer_dir=args.tokenizer, checkpoint=args.checkpoint, data_dir=args.data,
                       pretok_dir=args.pretokenized, freeze_until_index=args.freeze_until_index,
                       depth=args.depth, device_batch_size=args.device_batch_size, max_seq_len=args.max_seq_len,
                       verify=False if args.no_verify else None)
    checks.add("sandbox", *sandbox_row(args.require_sandbox))
    print(format_table(checks.rows))
    if checks.failed:
        print("doctor: mismatches found (see MISMATCH rows)")
        return 1
    print("doctor: everything agrees")
    return 0


if __name__ == "__main__":
    run_main(main)
