"""
Supervised fine-tuning (SFT): teach a mid-trained (or base) model to answer like an assistant.

Every conversation is rendered on its own (no packing) and padded to the longest in its batch;
the loss is taken only on the assistant's own tokens: positions whose render_conversation mask
is 0 (BOS, user turns, tool outputs, <|assistant_start|>) and padding get target -1. The
learning rate decays linearly to zero. Periodically: validation loss on held-out conversations
and a small generative eval (sampling with the Engine, tools included) on held-out tasks.
Saves to <base>/chatsft_checkpoints/<tag>/.

Run:
    python -m scripts.chat_sft                        # from the newest mid checkpoint, online tasks
    python -m scripts.chat_sft --offline -i mid       # offline tasks (CPU profile)
    python -m scripts.chat_sft --resume               # continue the newest complete SFT checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size 4
`--freeze-until-index N` keeps rows < N of the embedding and output head unchanged (default: the
original vocab size if the tokenizer was extended, else nothing; 0 turns it off).
"""

import contextlib
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import parse_args_noting_explicit, resumed_run_args
from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration,
                             init_wandb, print0, run_main)


SECTION = "Chat SFT"  # the report card section

# -----------------------------------------------------------------------------
# Data: the training mixture and the held-out sets

def build_train_tasks(offline):
    """The SFT training mixture (train splits only)."""
    from tasks.common import TaskMixture
    if offline:
        from tasks.offline import offline_sft_tasks
        return TaskMixture(offline_sft_tasks("train"))
    from tasks.arc import ARC
    from tasks.customjson import CustomJSON, identity_conversations_path
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    return TaskMixture([
        ARC(subset="ARC-Easy", split="train"), ARC(subset="ARC-Challenge", split="train"),
        GSM8K(subset="main", split="train"), SmolTalk(split="train", stop=10_000),
        CustomJSON(filepath=identity_conversations_path()),
        SimpleSpelling(size=300, split="train"), SpellingBee(size=300, split="train"),
    ])


def build_val_tasks(offline):
    """Held-out conversations for the validation loss."""
    from tasks.common import TaskMixture
    if offline:
        from tasks.offline import offline_sft_tasks
        return TaskMixture(offline_sft_tasks("val"))
    from tasks.smoltalk import SmolTalk
    return SmolTalk(split="test")


def build_generative_eval_tasks(offline):
    """Held-out generative tasks for the periodic eval: name -> task."""
    from scripts.chat_eval import build_eval_task
    names = ["Arithmetic", "SpellingBee", "SimpleSpelling"] if offline else ["GSM8K", "SpellingBee"]
    return {name: build_eval_task(name, offline=offline) for name in names}


def check_task_tokens_fit(dataset, tokenizer, vocab_size, num_checked=64):
    """The rendered task data must use ids the model has (a conversation special token missing from
    an extended or foreign tokenizer would otherwise fail deep inside the embedding lookup)."""
    for i in range(min(num_checked, len(dataset))):
        ids, mask = tokenizer.render_conversation(dataset[i])
        if ids and max(ids) >= vocab_size:
            raise NanochatError(f"task data renders to token id {max(ids)} but the model's vocab is {vocab_size}; "
                                "the tokenizer and checkpoint disagree, run python -m nanochat.doctor")


# -----------------------------------------------------------------------------
# Batching with the loss mask

def sft_collate(rows, pad_id):
    """rows: list of (ids, mask) from render_conversation. Returns (inputs, targets), both (B, T)
    int64 with T = longest row - 1. targets[b, t] = ids[t+1] where mask[t+1] == 1, else -1
    (unsupervised positions and padding never contribute to the loss)."""
    T = max(len(ids) for ids, _ in rows) - 1
    if T < 1:
        raise NanochatError("a rendered conversation has fewer than 2 tokens; check the task data")
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        mask_t = torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        inputs[b, :n] = ids_t[:-1]
        row_targets = ids_t[1:].clone()
        row_targets[~mask_t[1:]] = -1
        targets[b, :n] = row_targets
    return inputs, targets


class ConversationBatches:
    """This rank's conversations (indices rank, rank+world, ...) in order, `batch_size` at a time,
    wrapping around at the end (epoch += 1). state() / the constructor's `state` resume exactly."""

    def __init__(self, dataset, tokenizer, batch_size, max_seq_len, rank=0, world_size=1, state=None):
        if len(dataset) < world_size:
            raise NanochatError(f"the dataset has {len(dataset)} conversations, fewer than {world_size} ranks")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size = rank, world_size
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self.cursor = state["cursor"] if state else rank
        self.epoch = state["epoch"] if state else 0

    def state(self):
        return {"cursor": self.cursor, "epoch": self.epoch}

    def progress(self):
        """Epochs done so far, fractional."""
        return self.epoch + self.cursor / len(self.dataset)

    def next_batch(self, device):
        rows = []
        for _ in range(self.batch_size):
            if self.cursor >= len(self.dataset):
                self.cursor = self.rank
                self.epoch += 1
            rows.append(self.tokenizer.render_conversation(self.dataset[self.cursor], max_tokens=self.max_seq_len + 1))
            self.cursor += self.world_size
        inputs, targets = sft_collate(rows, self.pad_id)
        return inputs.to(device), targets.to(device)


def gather_rank_states(state):
    """Every rank's loader state, in rank order (saved with the checkpoint for an exact resume)."""
    if dist.is_available() and dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


def all_reduce_mean(value, device):
    t = torch.tensor(float(value), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t.item()


# -----------------------------------------------------------------------------

# --resume continues the run with its own arguments (from its checkpoint meta). The first set may change on
# resume (applied and logged); the second is always this invocation's; any other flag given with a different
# value would silently change the run and is refused unless --override-args.
RESUME_MAY_CHANGE = {"num_iterations", "num_epochs", "eval_every", "eval_steps", "save_every", "eval_metrics_every",
                     "eval_max_problems", "eval_max_new_tokens"}
RESUME_RUNTIME = {"source", "model_tag", "step", "output_tag", "device", "resume", "resume_step", "override_args",
                  "run"}


def parse_args(argv=None):
    parser = ArgumentParser(description="Supervised fine-tuning on conversations (loss on assistant tokens only).")
    parser.add_argument("-i", "--source", default="mid", choices=["base", "mid"], help="checkpoint to start from")
    parser.add_argument("-g", "--model-tag", default=None, help="tag of the source checkpoint (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step of the source checkpoint (default: the last)")
    parser.add_argument("--output-tag", default=None, help="tag to save under (default: the source's tag)")
    parser.add_argument("--offline", action="store_true", help="train on the offline tasks (no network)")
    parser.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--num-epochs", type=float, default=1.0, help="epochs over the mixture (if --num-iterations < 0)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per rank")
    parser.add_argument("--target-examples-per-step", type=int, default=32, help="conversations per optimizer step, all ranks")
    parser.add_argument("--max-seq-len", type=int, default=None, help="truncate conversations (default: the model's sequence_len)")
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--init-lr-frac", type=float, default=0.02, help="start at this fraction of the base learning rates")
    parser.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (0: only at the end)")
    parser.add_argument("--eval-steps", type=int, default=20, help="validation batches per eval")
    parser.add_argument("--eval-metrics-every", type=int, default=200, help="generative eval every N steps (0: only at the end)")
    parser.add_argument("--eval-max-problems", type=int, default=64, help="problems per task in the generative eval")
    parser.add_argument("--eval-max-new-tokens", type=int, default=128)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--freeze-until-index", type=int, default=None,
                        help="keep embedding/output rows < N unchanged (default: original vocab of an extended tokenizer)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest complete SFT checkpoint with its own arguments")
    parser.add_argument("--resume-step", type=int, default=None,
                        help="with --resume: this complete step (default: the newest)")
    parser.add_argument("--override-args", action="store_true",
                        help="with --resume: let flags change the run's own arguments")
    parser.add_argument("--run", default=None, help="wandb run name (off by default)")
    parser.add_argument("--seed", type=int, default=42)
    args, explicit = parse_args_noting_explicit(parser, argv)
    if args.resume:
        args = resumed_run_args("sft", args, explicit, RESUME_MAY_CHANGE, RESUME_RUNTIME)
    elif args.resume_step is not None or args.override_args:
        raise NanochatError("--resume-step and --override-args only apply with --resume")
    for name in ("device_batch_size", "target_examples_per_step", "eval_steps", "eval_max_problems", "eval_max_new_tokens"):
        if getattr(args, name) < 1:
            raise NanochatError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_iterations == 0 or args.num_epochs <= 0:
        raise NanochatError("--num-iterations must be > 0 (or -1) and --num-epochs > 0")
    return args


def main(argv=None):
    args = parse_args(argv)

    # --- init
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    from nanochat.checkpoint_manager import capture_rng_state, save_checkpoint, start_or_resume
    from nanochat.freeze import FrozenRows, resolve_freeze_index
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    wandb_run = init_wandb(args.run, "nanochat-sft", vars(args))

    # --- model: the source checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    model, tokenizer, resume_state, optimizer_states, checkpoint_dir, start_step = start_or_resume(
        "sft", args.source, device, rank, args.resume, args.model_tag, args.step, args.output_tag, args.resume_step)
    if resume_state is not None:
        print0(f"resuming SFT from {checkpoint_dir} step {start_step}")
    config = model.config
    vocab_size = tokenizer.get_vocab_size()
    freeze_index = resolve_freeze_index(args.freeze_until_index, tokenizer)  # bad index: error before any work
    max_seq_len = args.max_seq_len or config.sequence_len
    print0(f"model: {config.n_layer} layers, width {config.n_embd}, vocab {vocab_size}, {model.num_params():,} params")

    # --- data
    train_ds = build_train_tasks(args.offline)
    val_ds = build_val_tasks(args.offline)
    check_task_tokens_fit(train_ds, tokenizer, config.vocab_size)
    check_task_tokens_fit(val_ds, tokenizer, config.vocab_size)
    examples_per_micro = args.device_batch_size * world_size
    if args.target_examples_per_step % examples_per_micro != 0:
        raise NanochatError(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of "
                            f"--device-batch-size x ranks = {examples_per_micro}")
    grad_accum_steps = args.target_examples_per_step // examples_per_micro
    num_iterations = (args.num_iterations if args.num_iterations > 0
                      else max(1, int(args.num_epochs * len(train_ds)) // args.target_examples_per_step))
    loader_state = None
    if resume_state is not None:
        states = (resume_state.get("dataloader_state") or {}).get("ranks")
        if not states or len(states) != world_size:
            raise NanochatError(f"--resume: the checkpoint was saved with {len(states or [])} ranks; resume with the same number")
        loader_state = states[rank]
    train_loader = ConversationBatches(train_ds, tokenizer, args.device_batch_size, max_seq_len, rank, world_size, loader_state)
    print0(f"{len(train_ds):,} training conversations, {num_iterations} steps of {args.target_examples_per_step} "
           f"({grad_accum_steps} accumulation steps), validation on {len(val_ds):,}")

    # --- optimizers (same split as base training: AdamW for embeddings/head, Muon for matrices)
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["lr"] * args.init_lr_frac
    if resume_state is not None:
        for opt, state in zip(optimizers, optimizer_states):
            opt.load_state_dict(state)
    frozen = FrozenRows(model, freeze_index, vocab_size)
    print0(f"freeze: {frozen.describe()}")

    # --- evaluation helpers
    def evaluate_val_loss():
        model.eval()
        val_loader = ConversationBatches(val_ds, tokenizer, args.device_batch_size, max_seq_len, rank, world_size)
        losses = []
        with torch.no_grad():
            for _ in range(args.eval_steps):
                inputs, targets = val_loader.next_batch(device)
                with autocast:
                    losses.append(model(inputs, targets).item())
        model.train()
        return all_reduce_mean(sum(losses) / len(losses), device)

    def evaluate_generative():
        from nanochat.engine import Engine
        from scripts.chat_eval import run_generative_eval
        model.eval()
        engine = Engine(model, tokenizer)
        accuracies = {}
        for name, task in build_generative_eval_tasks(args.offline).items():
            passed, total = run_generative_eval(task, tokenizer, engine, num_samples=1,
                                                max_new_tokens=args.eval_max_new_tokens, temperature=0.0,
                                                max_problems=args.eval_max_problems, rank=rank,
                                                world_size=world_size, device=device, progress=False)
            accuracies[name] = passed / max(total, 1)
        model.train()
        return accuracies

    def save(step, metrics):
        meta_out = {
            "model_config": config.to_dict(), "arch": config.arch, "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": vocab_size, "train_args": vars(args), "metrics": metrics, "stage": "sft",
            "dataloader_state": {"ranks": gather_rank_states(train_loader.state())},
            "rng": capture_rng_state(), "freeze_until_index": freeze_index,
        }
        path = save_checkpoint(checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers],
                               meta_out, tokenizer, rank=rank)
        print0(f"saved {path}")

    if resume_state is not None and resume_state.get("rng"):
        from nanochat.checkpoint_manager import restore_rng_state
        restore_rng_state(resume_state["rng"])

    # --- training loop
    metrics = dict(resume_state.get("metrics", {})) if resume_state else {}
    t_start = time.time()
    step = start_step
    train_loss = float("nan")
    train_curve, val_curve = [], []  # (step, loss) for the report card's plots
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0 and step > start_step) or last_step:
            metrics["val_loss"] = evaluate_val_loss()
            print0(f"step {step:05d} | val loss {metrics['val_loss']:.4f}")
            val_curve.append((step, metrics["val_loss"]))
            wandb_run.log({"step": step, "val_loss": metrics["val_loss"]})
        if (args.eval_metrics_every > 0 and step % args.eval_metrics_every == 0 and step > start_step) or last_step:
            accuracies = evaluate_generative()
            metrics.update({f"{name}_accuracy": acc for name, acc in accuracies.items()})
            print0(f"step {step:05d} | " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in accuracies.items()))
            wandb_run.log({"step": step, **accuracies})
        if last_step:
            break

        t0 = time.time()
        num_tokens = 0
        for _ in range(grad_accum_steps):
            inputs, targets = train_loader.next_batch(device)
            with autocast:
                loss = model(inputs, targets)
            (loss / grad_accum_steps).backward()
            num_tokens += int((targets >= 0).sum().item())
            train_loss = loss.item()
        lrm = 1.0 - step / num_iterations  # linear decay to zero
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        frozen.restore()
        step += 1
        train_curve.append((step, train_loss))
        dt = time.time() - t0
        done = step - start_step
        eta = (time.time() - t_start) / done * (num_iterations - step)
        print0(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"{num_tokens * world_size / dt:,.0f} supervised tok/s | epoch {train_loader.progress():.2f} | "
               f"eta {format_duration(eta)}")
        wandb_run.log({"step": step, "train_loss": train_loss, "lrm": lrm})
        if args.save_every > 0 and step % args.save_every == 0 and step < num_iterations:
            save(step, dict(metrics, train_loss=train_loss))

    # --- save and report
    metrics["train_loss"] = train_loss
    save(step, metrics)
    if freeze_index:
        assert frozen.unchanged(), "frozen embedding rows changed; this is a bug in nanochat.freeze"
    if rank == 0:
        from nanochat.report import get_report
        report = get_report()
        for label, curve in (("train", train_curve), ("val", val_curve)):
            if curve:
                report.log_series(f"sft: {label}", [s for s, _ in curve], [v for _, v in curve], section=SECTION)
        report.log(section=SECTION, data=[
            {k: v for k, v in vars(args).items()},
            {"Training conversations": len(train_ds), "Number of iterations": num_iterations,
             "Frozen rows": freeze_index, "Training time": format_duration(time.time() - t_start)},
            {k: v for k, v in metrics.items()},
        ])
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
