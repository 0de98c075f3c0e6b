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

from nanochat.common import ArgumentParser, NanochatError, print0, run_main
from nanochat.conversation_loader import PackedConversations
from nanochat.post_training import (StageRun, add_freeze_flag, add_optimizer_flags, add_run_flags, add_source_flags,
                                    lr_multiplier, parse_stage_args, periodic_save_due)
from tasks.mixtures import mid_mixture

SECTION = "Midtraining"  # the report card section

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

    # --- init and model: the base checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    run = StageRun("mid", args, "midtraining", freeze=True)
    tokenizer, rank, world_size = run.tokenizer, run.rank, run.world_size
    T = args.max_seq_len or run.model.config.sequence_len
    B = args.device_batch_size
    run.print_model()

    # --- data: the mixture packed into rows of T+1 tokens
    train_ds, val_ds = mid_mixture("train", args.offline), mid_mixture("val", args.offline)
    run.check_tasks_fit(train_ds, val_ds)
    tokens_per_micro = B * T * world_size
    total_batch_size = args.total_batch_size or tokens_per_micro
    if total_batch_size % tokens_per_micro != 0:
        raise NanochatError(f"--total-batch-size {total_batch_size} is not a multiple of device batch x T x ranks "
                            f"= {tokens_per_micro}")
    grad_accum_steps = total_batch_size // tokens_per_micro
    train_loader = PackedConversations(train_ds, tokenizer, B, T, rank, world_size, run.loader_state())
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
    run.start_training()

    # --- training loop
    step = run.start_step
    train_loss = float("nan")
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            run.validate(step, PackedConversations(val_ds, tokenizer, B, T, rank, world_size))
        if last_step:
            break

        t0 = time.time()
        lrm = lr_multiplier(step / num_iterations, args.warmdown_ratio)
        train_loss, _ = run.supervised_step(train_loader, grad_accum_steps, lrm)
        step += 1
        dt = time.time() - t0
        run.log_step(step, num_iterations, f"loss {train_loss:.4f} | lrm {lrm:.3f} | {total_batch_size / dt:,.0f} "
                     f"tok/s | epoch {train_loader.progress():.2f}", train_loss=train_loss, lrm=lrm)
        if periodic_save_due(step, args.save_every, num_iterations):
            run.save(step, train_loader.state(), train_loss=train_loss)

    # --- save and report
    run.finish(step, train_loader.state(), SECTION,
               {"Training conversations": len(train_ds), "Number of iterations": num_iterations,
                "Tokens per step": total_batch_size},
               {"Minimum validation loss": min(v for _, v in run.val_curve),
                "Final validation loss": run.metrics["val_loss"], "Final training loss": train_loss},
               train_loss=train_loss)
    return 0


if __name__ == "__main__":
    run_main(main)
