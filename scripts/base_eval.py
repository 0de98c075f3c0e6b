"""
Evaluate a base model: bits per byte on the train and val splits, greedy samples of a few prompts,
and the CORE metric on the DCLM eval bundle (downloaded once into <base>/eval_bundle).

    python -m scripts.base_eval                         # newest base checkpoint
    python -m scripts.base_eval -g d20 --core-max-per-task 100
    python -m scripts.base_eval --skip-core             # offline, no bundle
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

If the bundle cannot be had, CORE is reported as skipped with the reason; everything else still runs.
"""

from contextlib import nullcontext

import torch

from nanochat.common import ArgumentParser, NanochatError, compute_cleanup, compute_init, print0, resolve_device_type, run_main

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is red because"]


def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate a base model: bits per byte, samples, CORE.")
    p.add_argument("-i", "--source", default="base", choices=["base", "mid", "sft", "rl"], help="checkpoint family")
    p.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the most recent)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    p.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass for bits per byte")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split for bits per byte")
    p.add_argument("--data-dir", default=None, help="parquet shards (default: <base>/base_data)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per greedy sample")
    p.add_argument("--skip-core", action="store_true", help="do not evaluate CORE (e.g. offline without the bundle)")
    p.add_argument("--core-max-per-task", type=int, default=-1, help="items per CORE task (-1: all; small for quick runs)")
    p.add_argument("--eval-bundle-url", default=None,
                   help="where to download eval_bundle.zip (default: $NANOCHAT_EVAL_BUNDLE_URL, else nanochat's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from nanochat import core_eval
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.loss_eval import evaluate_bpb, unigram_bpb
    from nanochat.tokenizer import get_token_bytes

    # --- compute and model -------------------------------------------------------------------
    device_type = resolve_device_type(args.device)
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    dtype = args.dtype or ("bfloat16" if device_type == "cuda" else "float32")
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    T = model.config.sequence_len
    B = args.device_batch_size
    print0(f"evaluating {args.source} model (step {meta['step']}, {model.num_params():,} params, vocab {tokenizer.get_vocab_size()})")

    # --- bits per byte on train and val -------------------------------------------------------------
    token_bytes = get_token_bytes(device, tokenizer)
    steps = max(1, args.split_tokens // (B * T * world_size))
    bpb = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader(tokenizer, B, T, split, device=device, rank=rank, world_size=world_size,
                                                    data_dir=args.data_dir)
        with autocast:
            bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()
        print0(f"{split} bpb: {bpb[split]:.4f}")
    # the context-free baseline on the same tokens: a model that learned anything beats it clearly
    loaders = [tokenizing_distributed_data_loader(tokenizer, B, T, split, device=device, rank=rank, world_size=world_size,
                                                  data_dir=args.data_dir) for split in ("train", "val")]
    bpb["unigram"] = unigram_bpb(loaders[0], loaders[1], steps, token_bytes)
    for loader in loaders:
        loader.close()
    print0(f"unigram baseline val bpb: {bpb['unigram']:.4f} (model/baseline: {bpb['val'] / bpb['unigram']:.2f})")

    # --- greedy samples ---------------------------------------------------------------------------
    samples = []
    if rank == 0:
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            with autocast:
                out = list(model.generate(ids, max_tokens=args.max_new_tokens, temperature=0.0))
            samples.append(tokenizer.decode(ids[1:] + out))
            print0(f"sample: {samples[-1]!r}")

    # --- CORE ---------------------------------------------------------------------------------------
    core = None
    if args.skip_core:
        core_line = "CORE: skipped (--skip-core)"
    else:
        try:
            bundle = core_eval.ensure_eval_bundle(args.eval_bundle_url)
        except NanochatError as e:
            bundle, core_line = None, f"CORE: skipped (bundle not available: {e})"
        if bundle is not None:
            with autocast:
                core = core_eval.evaluate_core(model, tokenizer, bundle, device, args.core_max_per_task, log=print0)
            core_line = f"CORE: {core['core']:.4f}" + (f" (at most {args.core_max_per_task} items per task)" if args.core_max_per_task > 0 else "")
    print0(core_line)

    # --- report ------------------------------------------------------------------------------------
    if rank == 0:
        from nanochat.report import get_report
        data = [{"Checkpoint": f"{args.source} step {meta['step']}", "train bpb": bpb["train"], "val bpb": bpb["val"],
                 "unigram baseline val bpb": bpb["unigram"],
                 "CORE": core["core"] if core else core_line}]
        if core:
            data.append({f"CORE {k} (centered)": v for k, v in core["centered"].items()})
        data.append({f"sample {i}": s for i, s in enumerate(samples)})
        get_report().log(section="Base model evaluation", data=data)
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
