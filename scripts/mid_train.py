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

import time

from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration,
                             init_wandb, print0, run_main)
from nanochat.conversation_loader import PackedConversations
from nanochat.post_training import (accumulate_gradients, add_freeze_flag, add_optimizer_flags, add_run_flags,
                                    add_source_flags, autocast_for, build_optimizers, check_task_tokens_fit,
                                    eta_seconds, load_stage_model, log_loss_curves, lr_multiplier,
                                    parse_stage_args, periodic_save_due, rank_loader_state, restore_rng,
                                    save_stage_checkpoint, step_optimizers, validation_loss)


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


# -----------------------------------------------------------------------------

# flags that --resume may change (applied and logged); see nanochat.post_training.parse_stage_args
RESUME_MAY_CHANGE = {"num_iterations", "num_epochs", "eval_every", "eval_steps", "save_every"}


def parse_args(argv=None):
    parser = ArgumentParser(description="Midtraining: conversation format, tool use and multiple choice.")
    add_source_flags(parser, "base", ["base"])
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="row length T (default: the model's sequence_len)")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimizer step, all ranks "
                             "(default: one row batch per rank, no accumulation)")
    parser.add_argument("--num-iterations", type=int, default=-1,
                        help="optimizer steps (-1: --num-epochs over the mixture)")
    parser.add_argument("--num-epochs", type=float, default=1.0)
    add_optimizer_flags(parser, init_lr_frac=1.0, init_lr_help="scale the base learning rates")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2,
                        help="fraction of training with a linear decay to 0")
    parser.add_argument("--eval-every", type=int, default=150,
                        help="validation loss every N steps (0: only at the end)")
    parser.add_argument("--eval-steps", type=int, default=20, help="validation batches per eval")
    add_freeze_flag(parser)
    add_run_flags(parser, "mid")
    args = parse_stage_args(parser, argv, "mid", RESUME_MAY_CHANGE, positive=("device_batch_size", "eval_steps"))
    if not 0 <= args.warmdown_ratio <= 1:
        raise NanochatError("--warmdown-ratio must be between 0 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)

    # --- init
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    from nanochat.freeze import FrozenRows, resolve_freeze_index
    autocast = autocast_for(device)
    wandb_run = init_wandb(args.run, "nanochat-mid", vars(args))

    # --- model: the base checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    model, tokenizer, resume_state, optimizer_states, checkpoint_dir, start_step = load_stage_model(
        "mid", args, device, rank, "midtraining")
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
    train_loader = PackedConversations(train_ds, tokenizer, B, T, rank, world_size,
                                       rank_loader_state(resume_state, rank, world_size))
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
    optimizers = build_optimizers(model, args, optimizer_states)
    frozen = FrozenRows(model, freeze_index, vocab_size)
    print0(f"freeze: {frozen.describe()}")
    restore_rng(resume_state)

    def save(step, metrics):
        save_stage_checkpoint(checkpoint_dir, step, model, optimizers, tokenizer, rank, "mid", args, metrics,
                              train_loader.state(), freeze_until_index=freeze_index)

    # --- training loop
    metrics = dict(resume_state.get("metrics", {})) if resume_state else {}
    t_start = time.time()
    step = start_step
    train_loss = float("nan")
    train_curve, val_curve = [], []  # (step, loss) for the report card's plots
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            val_loader = PackedConversations(val_ds, tokenizer, B, T, rank, world_size)
            metrics["val_loss"] = validation_loss(model, val_loader, args.eval_steps, device, autocast)
            print0(f"step {step:05d} | val loss {metrics['val_loss']:.4f}")
            val_curve.append((step, metrics["val_loss"]))
            wandb_run.log({"step": step, "val_loss": metrics["val_loss"]})
        if last_step:
            break

        t0 = time.time()
        train_loss, _ = accumulate_gradients(model, train_loader, grad_accum_steps, device, autocast)
        lrm = lr_multiplier(step / num_iterations, args.warmdown_ratio)
        step_optimizers(model, optimizers, lrm)
        frozen.restore()
        step += 1
        train_curve.append((step, train_loss))
        dt = time.time() - t0
        eta = eta_seconds(t_start, start_step, step, num_iterations)
        print0(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"{total_batch_size / dt:,.0f} tok/s | epoch {train_loader.progress():.2f} | eta {format_duration(eta)}")
        wandb_run.log({"step": step, "train_loss": train_loss, "lrm": lrm})
        if periodic_save_due(step, args.save_every, num_iterations):
            save(step, dict(metrics, train_loss=train_loss))

    # --- save and report
    metrics["train_loss"] = train_loss
    save(step, metrics)
    if freeze_index:
        assert frozen.unchanged(), "frozen embedding rows changed; this is a bug in nanochat.freeze"
    if rank == 0:
        from nanochat.report import get_report
        log_loss_curves("mid", SECTION, train_curve, val_curve)
        get_report().log(section=SECTION, data=[
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
