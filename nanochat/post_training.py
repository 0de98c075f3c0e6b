"""
What the post-training stages (mid_train, chat_sft, chat_rl) share: the optimizer and resume flags, the
optimizers scaled to a fraction of the base learning rates, the learning-rate schedule, the check that task
data fits the model's vocab, validation loss over ranks, and the stage checkpoint with every rank's loader state.
"""

import contextlib

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import parse_args_noting_explicit, resumed_run_args
from nanochat.common import NanochatError, print0

# --resume continues a run with its own arguments (from its checkpoint meta). These flags are always this
# invocation's; each stage names the ones that may change on resume; any other flag given with a different
# value would silently change the run and is refused unless --override-args.
RESUME_RUNTIME = {"source", "model_tag", "step", "output_tag", "device", "resume", "resume_step", "override_args",
                  "run"}


# -----------------------------------------------------------------------------
# Flags

def add_optimizer_flags(parser, init_lr_frac, init_lr_help="start at this fraction of the base learning rates"):
    """The learning rates of setup_optimizers (AdamW for embeddings/head, Muon for matrices), as base training."""
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help=init_lr_help)


def add_run_flags(parser, stage_name):
    """--resume and its companions, the wandb run name and the seed."""
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the newest complete {stage_name} checkpoint with its own arguments")
    parser.add_argument("--resume-step", type=int, default=None,
                        help="with --resume: this complete step (default: the newest)")
    parser.add_argument("--override-args", action="store_true",
                        help="with --resume: let flags change the run's own arguments")
    parser.add_argument("--run", default=None, help="wandb run name (off by default)")
    parser.add_argument("--seed", type=int, default=42)


def parse_stage_args(parser, argv, stage, may_change):
    """Parse; with --resume, the run's own arguments from its checkpoint (flags in `may_change` may differ)."""
    args, explicit = parse_args_noting_explicit(parser, argv)
    if args.resume:
        return resumed_run_args(stage, args, explicit, may_change, RESUME_RUNTIME)
    if args.resume_step is not None or args.override_args:
        raise NanochatError("--resume-step and --override-args only apply with --resume")
    return args


# -----------------------------------------------------------------------------
# Data and ranks

def check_task_tokens_fit(dataset, tokenizer, vocab_size, num_checked=64):
    """The rendered task data must use ids the model has (a conversation special token missing from
    an extended or foreign tokenizer would otherwise fail deep inside the embedding lookup)."""
    for i in range(min(num_checked, len(dataset))):
        ids, mask = tokenizer.render_conversation(dataset[i])
        if ids and max(ids) >= vocab_size:
            raise NanochatError(f"task data renders to token id {max(ids)} but the model's vocab is {vocab_size}; "
                                "the tokenizer and checkpoint disagree, run python -m nanochat.doctor")


def gather_rank_states(state):
    """Every rank's loader state, in rank order (saved with the checkpoint for an exact resume)."""
    if dist.is_available() and dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


def rank_loader_state(resume_state, rank, world_size):
    """This rank's loader state from a checkpoint being resumed (None when starting fresh)."""
    if resume_state is None:
        return None
    states = (resume_state.get("dataloader_state") or {}).get("ranks")
    if not states or len(states) != world_size:
        raise NanochatError(f"--resume: the checkpoint was saved with {len(states or [])} ranks; "
                            "resume with the same number")
    return states[rank]


def all_reduce_mean(value, device):
    t = torch.tensor(float(value), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t.item()


def autocast_for(device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model, loader, steps, device, autocast):
    """Mean loss over `steps` batches of a fresh loader, averaged over ranks."""
    model.eval()
    losses = []
    for _ in range(steps):
        inputs, targets = loader.next_batch(device)
        with autocast:
            losses.append(model(inputs, targets).item())
    model.train()
    return all_reduce_mean(sum(losses) / len(losses), device)


# -----------------------------------------------------------------------------
# Optimizers and schedule

def build_optimizers(model, args, optimizer_states=None):
    """setup_optimizers with the flags' learning rates, scaled by --init-lr-frac (the "initial_lr" of each
    group, which the schedule multiplies); the saved optimizer states when resuming."""
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["lr"] * args.init_lr_frac
    if optimizer_states is not None:
        for opt, state in zip(optimizers, optimizer_states):
            opt.load_state_dict(state)
    return optimizers


def lr_multiplier(progress, warmdown_ratio):
    """1.0, then linearly down to 0 over the last `warmdown_ratio` of training (progress in [0, 1]);
    warmdown_ratio=1 is a linear decay from the start."""
    if warmdown_ratio <= 0 or progress < 1.0 - warmdown_ratio:
        return 1.0
    return max(0.0, (1.0 - progress) / warmdown_ratio)


def step_optimizers(model, optimizers, lrm):
    """Set every group's lr to initial_lr * lrm, take the step, and clear the gradients."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Checkpoints

def save_stage_checkpoint(checkpoint_dir, step, model, optimizers, tokenizer, rank, stage, args, metrics,
                          loader_state, **extra_meta):
    """Save the model, optimizers and a meta with everything --resume needs (each rank's loader state, RNG)."""
    from nanochat.checkpoint_manager import capture_rng_state, save_checkpoint
    config = model.config
    meta = {
        "model_config": config.to_dict(), "arch": config.arch, "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.get_vocab_size(), "train_args": vars(args), "metrics": metrics, "stage": stage,
        "dataloader_state": {"ranks": gather_rank_states(loader_state)}, "rng": capture_rng_state(), **extra_meta,
    }
    path = save_checkpoint(checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers],
                           meta, tokenizer, rank=rank)
    print0(f"saved {path}")


def restore_rng(resume_state):
    """Continue the random streams of the run being resumed (sampling, dropout-free but seeded ops)."""
    if resume_state is not None and resume_state.get("rng"):
        from nanochat.checkpoint_manager import restore_rng_state
        restore_rng_state(resume_state["rng"])
