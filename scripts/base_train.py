"""
Pretrain the base model: stream the text shards, pack BOS-aligned rows, train a GPT from scratch
with Muon (block matrices) + AdamW (embedding, head, scalars), evaluate bits per byte, sample,
and save resumable checkpoints to <base>/base_checkpoints/<tag>/.

Run alone:
    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096
or on N GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20

The model's vocab size is always the tokenizer's. Before any forward pass the run checks that the
tokenizer, the checkpoint it resumes from and the pre-tokenized data agree (fingerprints, vocab
sizes, special-token ids), and stops with one line naming every disagreement otherwise.
--resume continues the run saved in a checkpoint exactly: weights, optimizer state, data position, RNG
and the run's own arguments (model shape, batch, learning rates, schedule, data, seed), so the tag is enough:
    python -m scripts.base_train --resume --model-tag d4                 # newest complete step
    python -m scripts.base_train --resume --model-tag d4 --resume-step 200 --num-iterations 2000
The horizon and the eval/sample/save/log cadence may change on resume (they are applied and logged); a flag
that would change the run itself (e.g. --total-batch-size) is refused unless --override-args. Every file is
checked first (presence, checksums, headers, shapes, tokenizer); a bad one is named in one line, with the
steps that pass. A non-finite loss or gradient norm stops the run before the optimizer update.
"""

import argparse
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as cm
from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration,
                             get_base_dir, get_dist_info, init_wandb, peak_flops_for_device, print0,
                             resolve_device_type, run_main)
from nanochat.doctor import preflight_problems

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:"]


def build_parser():
    p = ArgumentParser(description="Pretrain the base model.")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of layers; width = 64*depth")
    p.add_argument("--arch", default="nanochat", choices=["nanochat", "qwen2"], help="Transformer block flavour")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length T of training rows")
    p.add_argument("--value-embeds", action=argparse.BooleanOptionalAction, default=False,
                   help="add per-token value embeddings to every other layer (parameters, almost no FLOPs)")
    p.add_argument("--smear", action=argparse.BooleanOptionalAction, default=False,
                   help="mix a gated share of the previous token's embedding into each position")
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step over all ranks; gradient accumulation is derived from it")
    # horizon (first that is set wins)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive from the next two)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: off)")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla: 20)")
    # optimisation
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with a linear LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.2,
                   help="fraction of steps with a linear LR decay at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier reached at the last step")
    # evaluation, sampling, saving
    p.add_argument("--eval-every", type=int, default=250, help="val bits/byte every N steps (0: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation")
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (0: only at the end)")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="complete checkpoints to keep (>= 2, 0: all)")
    p.add_argument("--log-every", type=int, default=1, help="print a progress line every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run saved under --model-tag (default: d<depth> "
                   "if --depth is given, else the newest tag) with its own arguments")
    p.add_argument("--resume-step", type=int, default=None,
                   help="with --resume: this complete step (default: the newest)")
    p.add_argument("--override-args", action="store_true",
                   help="with --resume: let flags change the run's own arguments")
    p.add_argument("--no-verify", action="store_true", help="skip checkpoint checksums (very large checkpoints)")
    # runtime
    p.add_argument("--run", default=None, help="wandb run name (off by default)")
    p.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    p.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"],
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on for CUDA)")
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: d<depth>)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default: <base>/tokenizer)")
    p.add_argument("--data", default="text", choices=["text", "pretokenized"],
                   help="read parquet text or pre-tokenized shards")
    p.add_argument("--data-dir", default=None, help="parquet shards (default: <base>/base_data)")
    p.add_argument("--pretok-dir", default=None,
                   help="pre-tokenized shards (default: <base>/base_data_tok/<fingerprint[:16]>)")
    p.add_argument("--buffer-docs", type=int, default=256, help="documents in the best-fit packing buffer")
    p.add_argument("--seed", type=int, default=42)
    return p


def parse_args(argv=None):
    """(args, names of the flags given explicitly)."""
    return cm.parse_args_noting_explicit(build_parser(), argv)


# Resuming continues the run with its own arguments (from its checkpoint meta). The first set may change on
# resume (applied and logged); the second is always this invocation's; any other flag given with a different
# value would silently change the run and is refused unless --override-args.
RESUME_MAY_CHANGE = {"num_iterations", "target_flops", "target_param_data_ratio", "eval_every", "eval_tokens",
                     "sample_every", "save_every", "keep_last", "log_every"}
RESUME_RUNTIME = {"resume", "resume_step", "override_args", "no_verify", "run", "device", "dtype", "compile",
                  "model_tag", "tokenizer_dir"}


# -----------------------------------------------------------------------------
# Resume and pre-flight checks

def open_resume(args, explicit, verify):
    """(the run's arguments, the validated checkpoint to resume or None). On --resume the checkpoint's files,
    checksums, headers and shapes are checked, and the run continues with its own arguments."""
    if not args.resume:
        if args.resume_step is not None or args.override_args:
            raise NanochatError("--resume-step and --override-args only apply with --resume")
        return args, None
    root = cm.checkpoints_root("base")
    tag = args.model_tag or (f"d{args.depth}" if "depth" in explicit else cm.find_latest_tag(root))
    checkpoint_dir = os.path.join(root, tag or "?")
    if tag is None or not os.path.isdir(checkpoint_dir):
        raise NanochatError(f"--resume: no base checkpoint {'tag ' + repr(tag) + ' ' if tag else ''}in {root}; "
                            f"name the run with --model-tag, or drop --resume to start fresh")
    resume = cm.open_checkpoint(checkpoint_dir, args.resume_step, verify, optimizer_rank=get_dist_info()[1],
                                step_flag="--resume-step")
    args = cm.continue_run_args(args, explicit, resume.meta, resume.dir, RESUME_MAY_CHANGE, RESUME_RUNTIME)
    args.model_tag = tag
    return args, resume


def grad_accum_steps(args, world_size):
    """Micro-batches per optimizer step; the batch flags must divide evenly."""
    tokens_per_micro = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro != 0:
        example = tokens_per_micro * max(1, args.total_batch_size // tokens_per_micro)
        raise NanochatError(f"--total-batch-size {args.total_batch_size} is not a multiple of device-batch-size x "
                            f"max-seq-len x ranks = {args.device_batch_size} x {args.max_seq_len} x {world_size} = "
                            f"{tokens_per_micro}; pick a multiple (e.g. {example})")
    return args.total_batch_size // tokens_per_micro


def check_resume_matches(resume, config, wanted_config, world_size):
    """A resumed run must have been written by base_train, with the model and process count of this run."""
    if not all(k in resume.meta for k in ("dataloader_state", "rng", "loop_state")):
        raise NanochatError(f"--resume: {resume.dir} was not written by base_train (no data/RNG/loop state); "
                            f"drop --resume")
    have, want = config.to_dict(), wanted_config.to_dict()
    differ = ", ".join(f"{k}: {have[k]} in checkpoint vs {v} from flags" for k, v in want.items() if have[k] != v)
    if differ:
        raise NanochatError(f"--resume: the checkpoint's model differs from the flags ({differ}); "
                            f"a checkpoint's model cannot change on resume: drop the flags that change it")
    saved_world = resume.meta.get("world_size", 1)
    if saved_world != world_size:
        raise NanochatError(f"--resume: the checkpoint was saved by {resume.meta.get('world_size')} processes but "
                            f"this run has {world_size}; resume with the same number of processes")


# -----------------------------------------------------------------------------
# Model, horizon, optimizers

def build_model(config, device, resume):
    """The GPT of `config` on `device`: freshly initialised, then the checkpoint's weights when resuming."""
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.init_weights()
    if resume is not None:
        state = cm.load_weights(resume, device)
        model.load_state_dict(state, strict=True)
        del state
    return model


def training_horizon(args, num_params, flops_per_token):
    """Optimizer steps: the first of --num-iterations, --target-flops, --target-param-data-ratio that is set."""
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size)))
    if args.target_param_data_ratio > 0:
        return max(1, (round(args.target_param_data_ratio * num_params)) // args.total_batch_size)
    raise NanochatError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")


def load_optimizer_states(optimizers, resume, rank, device):
    optim_states = cm.load_optimizer_states(resume, rank, device)
    if len(optim_states) != len(optimizers):
        raise NanochatError(f"optimizer state in {resume.dir} does not match this run's optimizers; "
                            f"start fresh without --resume")
    for opt, st in zip(optimizers, optim_states):
        opt.load_state_dict(st)


# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it):
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedules(optimizers, muon, step, num_iterations, args):
    """Set this step's learning rates and Muon momentum; returns the LR multiplier."""
    lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step)
    return lrm


# -----------------------------------------------------------------------------
# Data, evaluation, sampling

def make_loader(args, split, tokenizer, vocab_size, pretok_dir, device, rank, world_size, resume_state=None):
    B, T = args.device_batch_size, args.max_seq_len
    if args.data == "pretokenized":
        from nanochat.dataloader import pretokenized_distributed_data_loader
        return pretokenized_distributed_data_loader(pretok_dir, tokenizer, vocab_size, B, T, split, device=device,
                                                    rank=rank, world_size=world_size, resume_state=resume_state,
                                                    buffer_docs=args.buffer_docs)
    from nanochat.dataloader import tokenizing_distributed_data_loader
    return tokenizing_distributed_data_loader(tokenizer, B, T, split, device=device, rank=rank, world_size=world_size,
                                              resume_state=resume_state, buffer_docs=args.buffer_docs,
                                              data_dir=args.data_dir)


def evaluate_val_bpb(model, val_loader, eval_steps, token_bytes, autocast):
    """Bits per byte on `eval_steps` batches of `val_loader` (closed afterwards)."""
    from nanochat.loss_eval import evaluate_bpb
    model.eval()
    with autocast:
        bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
    model.train()
    val_loader.close()
    return bpb


def sample(model, tokenizer, autocast):
    """Greedy continuations of SAMPLE_PROMPTS, printed."""
    model.eval()
    outputs = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        with autocast:
            out = list(model.generate(ids, max_tokens=16, temperature=0.0))
        outputs.append(tokenizer.decode(ids[1:] + out))
        print0(f"sample: {outputs[-1]!r}")
    model.train()
    return outputs


# -----------------------------------------------------------------------------
# Loop state: saved in every checkpoint and restored on resume

@dataclass
class LoopState:
    step: int = 0
    smooth_loss: float = 0.0  # EMA of the train loss, debiased when read
    total_time: float = 0.0  # seconds of timed steps (the first step of a process includes compilation)
    loss_history: list = field(default_factory=list)  # [step, loss] of every step, for the report's loss curve
    val_history: list = field(default_factory=list)  # [step, val bpb] of every evaluation, for the report
    val_bpb: float = None
    min_val_bpb: float = float("inf")

    @classmethod
    def from_checkpoint(cls, meta, step):
        loop = meta.get("loop_state", {})
        return cls(step=step, smooth_loss=loop.get("smooth_loss", 0.0), total_time=loop.get("total_time", 0.0),
                   loss_history=loop.get("loss_history", []), val_history=loop.get("val_history", []),
                   val_bpb=meta.get("metrics", {}).get("val_bpb"),
                   min_val_bpb=loop.get("min_val_bpb", float("inf")))

    def debiased_loss(self):
        done = len(self.loss_history)
        return self.smooth_loss / (1 - 0.9 ** done) if done else None

    def to_meta(self, num_iterations):
        return {"smooth_loss": self.smooth_loss, "total_time": self.total_time, "loss_history": self.loss_history,
                "val_history": self.val_history, "min_val_bpb": self.min_val_bpb, "num_iterations": num_iterations}


def gather_per_rank(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] without DDP)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def save(checkpoint_dir, state, model, optimizers, train_loader, config, tokenizer, args, num_iterations, rank):
    """A resumable checkpoint of step `state.step`: weights, optimizer states, data position and RNG of every
    rank, the loop state and the run's arguments."""
    meta = {
        "model_config": config.to_dict(), "arch": config.arch, "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.get_vocab_size(), "train_args": vars(args), "step": state.step,
        "metrics": {"val_bpb": state.val_bpb, "train_loss": state.debiased_loss()},
        "dataloader_state": gather_per_rank(train_loader.state_dict()),
        "rng": gather_per_rank(cm.capture_rng_state()),
        "loop_state": state.to_meta(num_iterations),
    }
    path = cm.save_checkpoint(checkpoint_dir, state.step, model.state_dict(), [o.state_dict() for o in optimizers],
                              meta, tokenizer, rank=rank, keep_last=args.keep_last)
    print0(f"saved checkpoint {path}")


def stop_if_not_finite(train_loss, grad_norm, ddp, step, checkpoint_dir):
    """Stop every rank before the optimizer update if any rank's loss or gradient norm is not finite."""
    bad = (~torch.isfinite(train_loss) | ~torch.isfinite(grad_norm)).float()
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        last_good = cm.list_complete_steps(checkpoint_dir)
        where = (f"the last good checkpoint is step {last_good[-1]} in {checkpoint_dir}" if last_good
                 else "no checkpoint was saved yet")
        raise NanochatError(f"step {step + 1}: non-finite loss ({train_loss.item()}) or gradient norm "
                            f"({grad_norm.item()}); stopped before the optimizer update; {where}; "
                            f"lower the learning rates and --resume")


def write_report(args, state, num_params, vocab_size, flops_per_token, num_iterations, checkpoint_dir):
    from nanochat.report import get_report
    report = get_report()
    section = "Base model training"
    if state.loss_history:
        report.log_series("train loss", [s for s, _ in state.loss_history], [v for _, v in state.loss_history],
                          section=section)
    if state.val_history:
        report.log_series("val bpb", [s * args.total_batch_size for s, _ in state.val_history],
                          [v for _, v in state.val_history], section=section, x_label="tokens",
                          y_label="val bpb (bits per byte)")
    report.log(section=section, data=[
        {k: v for k, v in vars(args).items()},
        {"Number of parameters": num_params, "Vocab size": vocab_size, "FLOPs per token": f"{flops_per_token:e}",
         "Calculated number of iterations": num_iterations, "Tokens per step": args.total_batch_size,
         "Tokens : params ratio": num_iterations * args.total_batch_size / num_params,
         "Minimum validation bpb": state.min_val_bpb, "Final validation bpb": state.val_bpb,
         "Training time": format_duration(state.total_time), "Checkpoint": checkpoint_dir},
    ])


# -----------------------------------------------------------------------------

def main(argv=None):
    # --- args: this invocation's, or on --resume the run's own from its validated checkpoint
    args, explicit = parse_args(argv)
    t_start = time.time()
    args, resume = open_resume(args, explicit, verify=False if args.no_verify else None)

    # --- init: compute, precision, flags that must agree
    device_type = resolve_device_type(args.device)
    ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    master = rank == 0
    dtype = args.dtype or ("bfloat16" if device_type == "cuda" else "float32")
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    use_compile = args.compile == "on" or (args.compile == "auto" and device_type == "cuda")
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    T, B = args.max_seq_len, args.device_batch_size
    grad_accum = grad_accum_steps(args, world_size)
    if args.keep_last and args.keep_last < 2:
        raise NanochatError(f"--keep-last {args.keep_last}: keep at least 2 checkpoints (or 0 for all)")

    # --- tokenizer, checkpoint to resume, data: check that they agree before building anything
    from nanochat.gpt import config_from_depth
    from nanochat.tokenizer import default_tokenizer_dir, get_token_bytes, load_tokenizer
    tokenizer_dir = os.path.abspath(args.tokenizer_dir or default_tokenizer_dir())
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = tokenizer.get_vocab_size()
    checkpoint_dir = os.path.join(get_base_dir(), cm.STAGE_DIRS["base"], args.model_tag or f"d{args.depth}")
    if resume is not None:
        config = resume.config
    else:
        config = config_from_depth(args.depth, vocab_size, arch=args.arch, sequence_len=T,
                                  value_embeds=args.value_embeds, smear=args.smear)
    pretok_dir = None
    if args.data == "pretokenized":
        from nanochat.pretokenized import pretokenized_dir
        pretok_dir = os.path.abspath(args.pretok_dir or pretokenized_dir(tokenizer.fingerprint))
    resume_dir, resume_meta = (resume.dir, resume.meta) if resume is not None else (None, None)
    problems = preflight_problems(tokenizer, tokenizer_dir, config.vocab_size, resume_dir, resume_meta, pretok_dir)
    if problems:
        raise NanochatError("pre-flight check failed: " + "; ".join(problems) + ". Use the tokenizer the "
                            "checkpoint/data were made with (or extend the checkpoint with scripts.tok_extend, "
                            "or re-run `python -m nanochat.dataset --pretokenize`)")
    if resume is not None:
        wanted = config_from_depth(args.depth, vocab_size, arch=args.arch, sequence_len=T,
                                  value_embeds=args.value_embeds, smear=args.smear)
        check_resume_matches(resume, config, wanted, world_size)
    tokenizer.encode_special("<|bos|>")  # a tokenizer without BOS cannot make BOS-aligned rows

    # --- model
    model = build_model(config, device, resume)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    print0(f"model: {config.arch} depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}/"
           f"{config.n_kv_head}, vocab {vocab_size} (padded {config.padded_vocab_size}), {num_params:,} params, "
           f"{flops_per_token:.3e} FLOPs/token")
    print0(f"batch: {B} x {T} x {world_size} ranks x {grad_accum} accumulation = {args.total_batch_size:,} "
           f"tokens/step; device {device}, dtype {dtype}, compile {use_compile}")
    num_iterations = training_horizon(args, num_params, flops_per_token)
    total_tokens = num_iterations * args.total_batch_size
    print0(f"training for {num_iterations:,} steps = {total_tokens:,} tokens ({total_tokens / num_params:.1f} "
           f"tokens/param), {flops_per_token * total_tokens:.3e} FLOPs")

    # --- optimizers
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    adamw, muon = optimizers
    if resume is not None:
        load_optimizer_states(optimizers, resume, rank, device)

    # --- data
    train_loader = make_loader(args, "train", tokenizer, config.vocab_size, pretok_dir, device, rank, world_size,
                               resume_state=resume_meta["dataloader_state"][rank] if resume is not None else None)
    token_bytes = get_token_bytes(device, tokenizer)
    eval_steps = max(1, args.eval_tokens // (B * T * world_size))

    # --- resume: the loop state and RNG where the checkpoint left them
    state = LoopState()
    resume_step = None
    if resume is not None:
        resume_step = resume.step
        state = LoopState.from_checkpoint(resume.meta, resume_step)
        cm.restore_rng_state(resume.meta["rng"][rank])
        print0(f"resuming from step {resume_step} of {resume.dir}")
    wandb_run = init_wandb(args.run, "nanochat", vars(args))
    peak_flops = peak_flops_for_device(torch.cuda.get_device_name(device)) if device_type == "cuda" else None

    # --- loop: evaluate / sample / save at step boundaries, then one optimizer step
    params = [p for p in model.parameters()]
    timed_steps = 0
    while True:
        step = state.step
        last_step = step == num_iterations
        resumed_here = resume_step == step  # the run that saved this step already evaluated and sampled it
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0 and not resumed_here):
            val_loader = make_loader(args, "val", tokenizer, config.vocab_size, pretok_dir, device, rank, world_size)
            state.val_bpb = evaluate_val_bpb(model, val_loader, eval_steps, token_bytes, autocast)
            state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
            state.val_history.append([step, state.val_bpb])
            print0(f"step {step:05d} | val bpb {state.val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": state.val_bpb})
        if last_step or (args.sample_every > 0 and step > 0 and step % args.sample_every == 0 and not resumed_here):
            if master:
                sample(model, tokenizer, autocast)
        if last_step or (args.save_every > 0 and step > 0 and step % args.save_every == 0 and not resumed_here):
            save(checkpoint_dir, state, model, optimizers, train_loader, config, tokenizer, args, num_iterations,
                 rank)
        if last_step:
            break

        synchronize()
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(train_loader)
            with autocast:
                loss = train_model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        train_loss = loss_sum / grad_accum
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        stop_if_not_finite(train_loss, grad_norm, ddp, step, checkpoint_dir)
        lrm = apply_schedules(optimizers, muon, step, num_iterations, args)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize()
        dt = time.time() - t0
        state.step = step = step + 1

        loss_value = train_loss.item()
        state.loss_history.append([step, loss_value])
        state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * loss_value
        if step > 1 + (resume_step or 0):  # the first step of a process includes compilation/warm-up
            state.total_time += dt
            timed_steps += 1
        if step % args.log_every == 0 or step == num_iterations:
            tok_per_s = args.total_batch_size / dt
            mfu = (f" | mfu {100 * flops_per_token * args.total_batch_size / dt / (peak_flops * world_size):.1f}%"
                   if peak_flops else "")
            avg_dt = state.total_time / timed_steps if timed_steps else dt
            eta = format_duration(avg_dt * (num_iterations - step))
            print0(f"step {step:05d}/{num_iterations:05d} | loss {state.debiased_loss():.4f} | lrm {lrm:.3f} | "
                   f"grad norm {grad_norm.item():.3f} | {dt * 1000:.0f} ms | {tok_per_s:,.0f} tok/s{mfu} | eta {eta}")
            wandb_run.log({"step": step, "train/loss": loss_value, "train/lrm": lrm, "train/tok_per_s": tok_per_s})

    # --- report
    train_loader.close()
    print0(f"done: {state.step} steps, min val bpb {state.min_val_bpb:.4f}, "
           f"wall time {format_duration(time.time() - t_start)}")
    if master:
        write_report(args, state, num_params, vocab_size, flops_per_token, num_iterations, checkpoint_dir)
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
