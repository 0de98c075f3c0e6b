"""
Midtraining: teach a base model the conversation format, tool use and multiple choice.

Conversations from a TaskMixture are rendered (render_conversation) and packed back to back
into one token stream, each starting with BOS, cut into rows of T+1 tokens (inputs = row[:-1],
targets = row[1:]), exactly like pretraining data: the model learns the special tokens and the
shape of a chat. Same optimizers as base training (setup_optimizers), learning rate constant
then linearly down to zero over the last --warmdown-ratio of training; validation loss on
held-out conversations every --eval-every steps. Starts from the base checkpoint and saves to
<base>/mid_checkpoints/<tag>/.

Run:
    python -m scripts.mid_train                        # online mixture (SmolTalk, MMLU, GSM8K, identity, spelling)
    python -m scripts.mid_train --offline              # offline mixture (CPU profile)
    python -m scripts.mid_train -g d20 -s 21400        # a particular base checkpoint
    python -m scripts.mid_train --resume               # continue the newest complete mid checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device-batch-size 16
`--freeze-until-index N` keeps rows < N of the embedding and output head unchanged (default: the
original vocab size if the tokenizer was extended, else nothing; 0 turns it off).
"""

import contextlib
import time

import torch

from nanochat.checkpoint_manager import parse_args_noting_explicit, resumed_run_args
from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration,
                             init_wandb, print0, run_main)
from scripts.chat_sft import all_reduce_mean, check_task_tokens_fit, gather_rank_states


SECTION = "Midtraining"  # the report card section

# -----------------------------------------------------------------------------
# Data

def build_train_tasks(offline):
    from tasks.common import TaskMixture
    if offline:
        from tasks.offline import offline_mid_tasks
        return TaskMixture(offline_mid_tasks("train"))
    from tasks.customjson import CustomJSON, identity_conversations_path
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    return TaskMixture([
        SmolTalk(split="train"), MMLU(subset="auxiliary_train", split="train"), GSM8K(subset="main", split="train"),
        CustomJSON(filepath=identity_conversations_path()), CustomJSON(filepath=identity_conversations_path()),
        SimpleSpelling(size=200_000, split="train"), SpellingBee(size=80_000, split="train"),
    ])


def build_val_tasks(offline):
    from tasks.common import TaskMixture
    if offline:
        from tasks.offline import offline_mid_tasks
        return TaskMixture(offline_mid_tasks("val"))
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    return TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                        GSM8K(subset="main", split="test", stop=420)])


class PackedConversations:
    """This rank's conversations (indices rank, rank+world, ...) rendered and concatenated into a
    token stream, served as (B, T) inputs/targets from rows of T+1 tokens. Wraps around at the end
    (epoch += 1). The state (cursor, epoch, the leftover tokens) resumes exactly."""

    def __init__(self, dataset, tokenizer, B, T, rank=0, world_size=1, state=None):
        if len(dataset) < world_size:
            raise NanochatError(f"the dataset has {len(dataset)} conversations, fewer than {world_size} ranks")
        self.dataset, self.tokenizer, self.B, self.T = dataset, tokenizer, B, T
        self.rank, self.world_size = rank, world_size
        self.cursor = state["cursor"] if state else rank
        self.epoch = state["epoch"] if state else 0
        self.buffer = list(state["buffer"]) if state else []

    def state(self):
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": list(self.buffer)}

    def progress(self):
        """Epochs consumed so far, fractional."""
        return self.epoch + self.cursor / len(self.dataset)

    def next_batch(self, device):
        need = self.B * (self.T + 1)
        while len(self.buffer) < need:
            if self.cursor >= len(self.dataset):
                self.cursor = self.rank
                self.epoch += 1
            # cap each conversation at one row so a single long one cannot dominate a batch
            ids, _ = self.tokenizer.render_conversation(self.dataset[self.cursor], max_tokens=self.T + 1)
            self.buffer.extend(ids)
            self.cursor += self.world_size
        rows = torch.tensor(self.buffer[:need], dtype=torch.long).view(self.B, self.T + 1)
        del self.buffer[:need]
        rows = rows.to(device)
        return rows[:, :-1], rows[:, 1:]


def lr_multiplier(progress, warmdown_ratio):
    """1.0, then linearly down to 0 over the last `warmdown_ratio` of training (progress in [0, 1])."""
    if warmdown_ratio <= 0 or progress < 1.0 - warmdown_ratio:
        return 1.0
    return max(0.0, (1.0 - progress) / warmdown_ratio)


# -----------------------------------------------------------------------------

# --resume continues the run with its own arguments (from its checkpoint meta). The first set may change on
# resume (applied and logged); the second is always this invocation's; any other flag given with a different
# value would silently change the run and is refused unless --override-args.
RESUME_MAY_CHANGE = {"num_iterations", "num_epochs", "eval_every", "eval_steps", "save_every"}
RESUME_RUNTIME = {"source", "model_tag", "step", "output_tag", "device", "resume", "resume_step", "override_args",
                  "run"}


def parse_args(argv=None):
    parser = ArgumentParser(description="Midtraining: conversation format, tool use and multiple choice.")
    parser.add_argument("-i", "--source", default="base", choices=["base"], help="checkpoint family to start from")
    parser.add_argument("-g", "--model-tag", default=None, help="tag of the base checkpoint (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step of the base checkpoint (default: the last)")
    parser.add_argument("--output-tag", default=None, help="tag to save under (default: the source's tag)")
    parser.add_argument("--offline", action="store_true", help="train on the offline tasks (no network)")
    parser.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length T (default: the model's sequence_len)")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step, all ranks (default: one row batch per rank, no accumulation)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs over the mixture)")
    parser.add_argument("--num-epochs", type=float, default=1.0)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--init-lr-frac", type=float, default=1.0, help="scale the base learning rates")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of training with a linear decay to 0")
    parser.add_argument("--eval-every", type=int, default=150, help="validation loss every N steps (0: only at the end)")
    parser.add_argument("--eval-steps", type=int, default=20, help="validation batches per eval")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--freeze-until-index", type=int, default=None,
                        help="keep embedding/output rows < N unchanged (default: original vocab of an extended tokenizer)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest complete mid checkpoint with its own arguments")
    parser.add_argument("--resume-step", type=int, default=None,
                        help="with --resume: this complete step (default: the newest)")
    parser.add_argument("--override-args", action="store_true",
                        help="with --resume: let flags change the run's own arguments")
    parser.add_argument("--run", default=None, help="wandb run name (off by default)")
    parser.add_argument("--seed", type=int, default=42)
    args, explicit = parse_args_noting_explicit(parser, argv)
    if args.resume:
        args = resumed_run_args("mid", args, explicit, RESUME_MAY_CHANGE, RESUME_RUNTIME)
    elif args.resume_step is not None or args.override_args:
        raise NanochatError("--resume-step and --override-args only apply with --resume")
    if args.device_batch_size < 1 or args.eval_steps < 1:
        raise NanochatError("--device-batch-size and --eval-steps must be >= 1")
    if args.num_iterations == 0 or args.num_epochs <= 0:
        raise NanochatError("--num-iterations must be > 0 (or -1) and --num-epochs > 0")
    if not 0 <= args.warmdown_ratio <= 1:
        raise NanochatError("--warmdown-ratio must be between 0 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)

    # --- init
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    from nanochat.checkpoint_manager import capture_rng_state, save_checkpoint, start_or_resume
    from nanochat.freeze import FrozenRows, resolve_freeze_index
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    wandb_run = init_wandb(args.run, "nanochat-mid", vars(args))

    # --- model: the base checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    model, tokenizer, resume_state, optimizer_states, checkpoint_dir, start_step = start_or_resume(
        "mid", args.source, device, rank, args.resume, args.model_tag, args.step, args.output_tag, args.resume_step)
    if resume_state is not None:
        print0(f"resuming midtraining from {checkpoint_dir} step {start_step}")
    config = model.config
    vocab_size = tokenizer.get_vocab_size()
    freeze_index = resolve_freeze_index(args.freeze_until_index, tokenizer)  # bad index: error before any work
    T = args.max_seq_len or config.sequence_len
    B = args.device_batch_size
    print0(f"model: {config.n_layer} layers, width {config.n_embd}, vocab {vocab_size}, {model.num_params():,} params")

    # --- data
    train_ds = build_train_tasks(args.offline)
    val_ds = build_val_tasks(args.offline)
    check_task_tokens_fit(train_ds, tokenizer, config.vocab_size)
    check_task_tokens_fit(val_ds, tokenizer, config.vocab_size)
    tokens_per_micro = B * T * world_size
    total_batch_size = args.total_batch_size or tokens_per_micro
    if total_batch_size % tokens_per_micro != 0:
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of device batch x T x ranks "
                            f"= {tokens_per_micro}")
    grad_accum_steps = total_batch_size // tokens_per_micro
    loader_state = None
    if resume_state is not None:
        states = (resume_state.get("dataloader_state") or {}).get("ranks")
        if not states or len(states) != world_size:
            raise NanochatError(f"--resume: the checkpoint was saved with {len(states or [])} ranks; resume with the same number")
        loader_state = states[rank]
    train_loader = PackedConversations(train_ds, tokenizer, B, T, rank, world_size, loader_state)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        # estimate the steps for --num-epochs from the average rendered length of a sample of conversations
        sample = [len(tokenizer.render_conversation(train_ds[i], max_tokens=T + 1)[0])
                  for i in range(0, len(train_ds), max(1, len(train_ds) // 200))]
        total_tokens = sum(sample) / len(sample) * len(train_ds) * args.num_epochs
        num_iterations = max(1, int(total_tokens // total_batch_size))
    print0(f"{len(train_ds):,} training conversations, {num_iterations} steps of {total_batch_size:,} tokens "
           f"({grad_accum_steps} accumulation steps), validation on {len(val_ds):,}")

    # --- optimizers: as base training
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

    def evaluate_val_loss():
        model.eval()
        val_loader = PackedConversations(val_ds, tokenizer, B, T, rank, world_size)
        losses = []
        with torch.no_grad():
            for _ in range(args.eval_steps):
                inputs, targets = val_loader.next_batch(device)
                with autocast:
                    losses.append(model(inputs, targets).item())
        model.train()
        return all_reduce_mean(sum(losses) / len(losses), device)

    def save(step, metrics):
        meta_out = {
            "model_config": config.to_dict(), "arch": config.arch, "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": vocab_size, "train_args": vars(args), "metrics": metrics, "stage": "mid",
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
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            metrics["val_loss"] = evaluate_val_loss()
            print0(f"step {step:05d} | val loss {metrics['val_loss']:.4f}")
            val_curve.append((step, metrics["val_loss"]))
            wandb_run.log({"step": step, "val_loss": metrics["val_loss"]})
        if last_step:
            break

        t0 = time.time()
        for _ in range(grad_accum_steps):
            inputs, targets = train_loader.next_batch(device)
            with autocast:
                loss = model(inputs, targets)
            (loss / grad_accum_steps).backward()
            train_loss = loss.item()
        lrm = lr_multiplier(step / num_iterations, args.warmdown_ratio)
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
        eta = (time.time() - t_start) / (step - start_step) * (num_iterations - step)
        print0(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"{total_batch_size / dt:,.0f} tok/s | epoch {train_loader.progress():.2f} | eta {format_duration(eta)}")
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
                report.log_series(f"mid: {label}", [s for s, _ in curve], [v for _, v in curve], section=SECTION)
        report.log(section=SECTION, data=[
            {k: v for k, v in vars(args).items()},
            {"Training conversations": len(train_ds), "Number of iterations": num_iterations,
             "Tokens per step": total_batch_size, "Frozen rows": freeze_index,
             "Training time": format_duration(time.time() - t_start)},
            {"Minimum validation loss": min(v for _, v in val_curve), "Final validation loss": metrics["val_loss"],
             "Final training loss": train_loss},
        ])
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
