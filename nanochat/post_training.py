"""
What the post-training stages (mid_train, chat_sft, chat_rl) share: the optimizer and resume flags, the
optimizers scaled to a fraction of the base learning rates, the learning-rate schedule, the check that task
data fits the model's vocab, validation loss over ranks, and the stage checkpoint with every rank's loader state.
A StageRun holds one invocation's start-up, bookkeeping and close around the stage's own data and training step.
"""

import contextlib
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import resumed_run_args
from nanochat.common import NanochatError, compute_cleanup, compute_init, format_duration, init_wandb, print0
from nanochat.freeze import FrozenRows, resolve_freeze_index
from nanochat.run_state import capture_rng_state, parse_args_noting_explicit, restore_rng_state

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


def add_source_flags(parser, source_default, source_choices, offline_help="train on the offline tasks (no network)"):
    """Which checkpoint to start from and where this stage saves; offline tasks; the device."""
    parser.add_argument("-i", "--source", default=source_default, choices=source_choices,
                        help="checkpoint family to start from")
    parser.add_argument("-g", "--model-tag", default=None, help="tag of the source checkpoint (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None,
                        help="step of the source checkpoint (default: the last)")
    parser.add_argument("--output-tag", default=None, help="tag to save under (default: the source's tag)")
    parser.add_argument("--offline", action="store_true", help=offline_help)
    parser.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")


def add_freeze_flag(parser):
    parser.add_argument("--freeze-until-index", type=int, default=None,
                        help="keep embedding/output rows < N unchanged "
                             "(default: original vocab of an extended tokenizer; 0: off)")


def add_run_flags(parser, stage_name):
    """Periodic checkpoints, --resume and its companions, the wandb run name and the seed."""
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the newest complete {stage_name} checkpoint with its own arguments")
    parser.add_argument("--resume-step", type=int, default=None,
                        help="with --resume: this complete step (default: the newest)")
    parser.add_argument("--override-args", action="store_true",
                        help="with --resume: let flags change the run's own arguments")
    parser.add_argument("--run", default=None, help="wandb run name (off by default)")
    parser.add_argument("--seed", type=int, default=42)


def parse_stage_args(parser, argv, stage, may_change, positive=()):
    """Parse; with --resume, the run's own arguments from its checkpoint (flags in `may_change` may differ).
    The flags named in `positive` must be >= 1; --num-iterations > 0 (or -1) and --num-epochs > 0."""
    args, explicit = parse_args_noting_explicit(parser, argv)
    if args.resume:
        args = resumed_run_args(stage, args, explicit, may_change, RESUME_RUNTIME)
    elif args.resume_step is not None or args.override_args:
        raise NanochatError("--resume-step and --override-args only apply with --resume")
    for name in positive:
        if getattr(args, name) < 1:
            raise NanochatError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_iterations == 0 or args.num_epochs <= 0:
        raise NanochatError("--num-iterations must be > 0 (or -1) and --num-epochs > 0")
    return args


def num_iterations_for(args, num_examples, examples_per_step):
    """--num-iterations, or (when -1) the optimizer steps of --num-epochs over `num_examples`, at least one."""
    if args.num_iterations > 0:
        return args.num_iterations
    return max(1, int(args.num_epochs * num_examples) // examples_per_step)


# -----------------------------------------------------------------------------
# The model

def load_stage_model(stage, args, device, rank, label):
    """The model to train: the --source checkpoint, or with --resume this stage's own newest one (either way
    checked against the tokenizer). Returns (model, tokenizer, resume_state, optimizer_states, checkpoint_dir,
    start_step); resume_state and optimizer_states are None when starting fresh."""
    from nanochat.checkpoint_manager import start_or_resume
    loaded = start_or_resume(stage, args.source, device, rank, args.resume, args.model_tag, args.step,
                             args.output_tag, args.resume_step)
    model, tokenizer, resume_state, optimizer_states, checkpoint_dir, start_step = loaded
    if resume_state is not None:
        print0(f"resuming {label} from {checkpoint_dir} step {start_step}")
    return loaded


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


def accumulate_gradients(model, loader, grad_accum_steps, device, autocast):
    """Forward and backward over `grad_accum_steps` batches, the loss averaged over them. Returns the last
    batch's loss and the number of target tokens seen (targets >= 0)."""
    num_tokens = 0
    for _ in range(grad_accum_steps):
        inputs, targets = loader.next_batch(device)
        with autocast:
            loss = model(inputs, targets)
        (loss / grad_accum_steps).backward()
        num_tokens += int((targets >= 0).sum().item())
    return loss.item(), num_tokens


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


def eta_seconds(t_start, start_step, step, num_iterations):
    """Time left at the pace of this invocation's steps so far."""
    return (time.time() - t_start) / (step - start_step) * (num_iterations - step)


# -----------------------------------------------------------------------------
# Checkpoints and the report card

def periodic_save_due(step, save_every, num_iterations):
    """--save-every N: a checkpoint every N steps before the last (the last step always saves)."""
    return save_every > 0 and step % save_every == 0 and step < num_iterations

def save_stage_checkpoint(checkpoint_dir, step, model, optimizers, tokenizer, rank, stage, args, metrics,
                          loader_state, **extra_meta):
    """Save the model, optimizers and a meta with everything --resume needs (each rank's loader state, RNG)."""
    from nanochat.checkpoint_manager import save_checkpoint
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
    """Continue the random streams of the run being resumed."""
    if resume_state is not None and resume_state.get("rng"):
        restore_rng_state(resume_state["rng"])


def log_loss_curves(prefix, section, train_curve, val_curve):
    """The (step, loss) curves as plots in the report card section (rank 0 only)."""
    from nanochat.report import get_report
    report = get_report()
    for label, curve in (("train", train_curve), ("val", val_curve)):
        if curve:
            report.log_series(f"{prefix}: {label}", [s for s, _ in curve], [v for _, v in curve], section=section)


# -----------------------------------------------------------------------------
# One invocation of a stage

class StageRun:
    """What a post-training stage does around its own data and training step, in the order it does it.

    Start-up (the constructor): the compute (ranks, device, seed), autocast, the wandb run (project
    nanochat-<stage>), and the model to train: the --source checkpoint, or with --resume this stage's own newest
    one, either way checked against the tokenizer. With `freeze` (mid, SFT), --freeze-until-index is resolved
    here, so that a bad index stops the run before any work. Then `start_training` (optimizers, frozen rows,
    the resumed random streams, the clock); per step `validate`, `supervised_step` (mid, SFT) or `step_optimizers`
    (RL), `log_step` and the periodic `save`; at the end `finish` (the last checkpoint, the report card section,
    wandb, the process group). `metrics` starts as the resumed run's.
    """

    def __init__(self, stage, args, label, freeze=False):
        self.stage, self.args = stage, args
        _, self.rank, _, self.world_size, self.device = compute_init(args.device, seed=args.seed)
        self.autocast = autocast_for(self.device)
        self.wandb_run = init_wandb(args.run, f"nanochat-{stage}", vars(args))
        (self.model, self.tokenizer, self.resume_state, self.optimizer_states, self.checkpoint_dir,
         self.start_step) = load_stage_model(stage, args, self.device, self.rank, label)
        self.freeze_index = resolve_freeze_index(args.freeze_until_index, self.tokenizer) if freeze else None
        self.metrics = dict(self.resume_state.get("metrics", {})) if self.resume_state else {}
        self.train_curve, self.val_curve = [], []  # (step, loss) for the report card's plots
        self.optimizers = self.frozen = self.t_start = None

    def print_model(self):
        config = self.model.config
        print0(f"model: {config.n_layer} layers, width {config.n_embd}, vocab {self.tokenizer.get_vocab_size()}, "
               f"{self.model.num_params():,} params")

    def check_tasks_fit(self, *datasets):
        for dataset in datasets:
            check_task_tokens_fit(dataset, self.tokenizer, self.model.config.vocab_size)

    def loader_state(self):
        """This rank's loader state in the checkpoint being resumed (None when starting fresh)."""
        return rank_loader_state(self.resume_state, self.rank, self.world_size)

    def start_training(self):
        """The optimizers (with the resumed run's states), the frozen rows' snapshot, the resumed run's random
        streams, and the clock of the training time."""
        self.optimizers = build_optimizers(self.model, self.args, self.optimizer_states)
        if self.freeze_index is not None:
            self.frozen = FrozenRows(self.model, self.freeze_index, self.tokenizer.get_vocab_size())
            print0(f"freeze: {self.frozen.describe()}")
        restore_rng(self.resume_state)
        self.t_start = time.time()

    def step_optimizers(self, lrm):
        """The optimizer step at the base rates x lrm; frozen rows are put back right after it."""
        step_optimizers(self.model, self.optimizers, lrm)
        if self.frozen is not None:
            self.frozen.restore()

    def supervised_step(self, loader, grad_accum_steps, lrm):
        """One optimizer step on `grad_accum_steps` batches of `loader` (mid, SFT). Returns the last batch's loss
        and the number of supervised tokens seen."""
        loss, num_tokens = accumulate_gradients(self.model, loader, grad_accum_steps, self.device, self.autocast)
        self.step_optimizers(lrm)
        return loss, num_tokens

    def validate(self, step, loader):
        """Validation loss on `loader` (--eval-steps batches): into the metrics, the curve, the log and wandb."""
        loss = validation_loss(self.model, loader, self.args.eval_steps, self.device, self.autocast)
        self.metrics["val_loss"] = loss
        print0(f"step {step:05d} | val loss {loss:.4f}")
        self.val_curve.append((step, loss))
        self.wandb_run.log({"step": step, "val_loss": loss})

    def log_step(self, step, num_iterations, message, **logged):
        """The step's line (`message` between the step count and the time left) and its values in wandb; a logged
        train_loss also goes into the report card's training curve."""
        if "train_loss" in logged:
            self.train_curve.append((step, logged["train_loss"]))
        eta = eta_seconds(self.t_start, self.start_step, step, num_iterations)
        print0(f"step {step:05d}/{num_iterations} | {message} | eta {format_duration(eta)}")
        self.wandb_run.log({"step": step, **logged})

    def save(self, step, loader_state, **latest):
        """This step's checkpoint, its metrics with `latest` (the last training loss or reward) added."""
        extra = {} if self.freeze_index is None else {"freeze_until_index": self.freeze_index}
        save_stage_checkpoint(self.checkpoint_dir, step, self.model, self.optimizers, self.tokenizer, self.rank,
                              self.stage, self.args, dict(self.metrics, **latest), loader_state, **extra)

    def finish(self, step, loader_state, section, summary, last_row=None, **latest):
        """The end of the run: `latest` into the metrics, the last checkpoint, the frozen rows checked; on rank 0 the
        report card section (the arguments; `summary` with the frozen rows and the training time; `last_row`, by
        default the metrics) and the loss curves as plots; then wandb and the process group closed."""
        self.metrics.update(latest)
        self.save(step, loader_state)
        if self.freeze_index:
            assert self.frozen.unchanged(), "frozen embedding rows changed; this is a bug in nanochat.freeze"
        if self.rank == 0:
            from nanochat.report import get_report
            log_loss_curves(self.stage, section, self.train_curve, self.val_curve)
            summary = dict(summary, **({} if self.freeze_index is None else {"Frozen rows": self.freeze_index}))
            summary["Training time"] = format_duration(time.time() - self.t_start)
            get_report().log(section=section, data=[dict(vars(self.args)), summary,
                                                    dict(self.metrics) if last_row is None else last_row])
        self.wandb_run.finish()
        compute_cleanup()
