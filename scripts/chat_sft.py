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
With an extended tokenizer the original vocab's embedding and output rows stay as they were, as in
midtraining (`--freeze-until-index N` sets the boundary, 0 turns it off).
"""

import time

from nanochat.chat_evaluation import build_eval_task, run_generative_eval
from nanochat.common import ArgumentParser, NanochatError, print0, run_main
from nanochat.conversation_loader import ConversationBatches
from nanochat.post_training import (StageRun, add_freeze_flag, add_optimizer_flags, add_run_flags, add_source_flags,
                                    lr_multiplier, num_iterations_for, parse_stage_args, periodic_save_due)
from tasks.mixtures import sft_mixture

SECTION = "Chat SFT"  # the report card section

# -----------------------------------------------------------------------------
# Data: the held-out generative tasks (the training and validation mixtures are tasks.mixtures.sft_mixture)

def build_generative_eval_tasks(offline):
    """Held-out generative tasks for the periodic eval: name -> task."""
    names = ["Arithmetic", "SpellingBee", "SimpleSpelling"] if offline else ["GSM8K", "SpellingBee"]
    return {name: build_eval_task(name, offline=offline) for name in names}


# -----------------------------------------------------------------------------

# flags that --resume may change (applied and logged); see nanochat.post_training.parse_stage_args
RESUME_MAY_CHANGE = {"num_iterations", "num_epochs", "eval_every", "eval_steps", "save_every", "eval_metrics_every",
                     "eval_max_problems", "eval_max_new_tokens"}


def parse_args(argv=None):
    parser = ArgumentParser(description="Supervised fine-tuning on conversations (loss on assistant tokens only).")
    add_source_flags(parser, "mid", ["base", "mid"])
    parser.add_argument("--num-epochs", type=float, default=1.0,
                        help="epochs over the mixture (if --num-iterations < 0)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per rank")
    parser.add_argument("--target-examples-per-step", type=int, default=32,
                        help="conversations per optimizer step, all ranks")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="truncate conversations (default: the model's sequence_len)")
    add_optimizer_flags(parser, init_lr_frac=0.02)
    parser.add_argument("--eval-every", type=int, default=100,
                        help="validation loss every N steps (0: only at the end)")
    parser.add_argument("--eval-steps", type=int, default=20, help="validation batches per eval")
    parser.add_argument("--eval-metrics-every", type=int, default=200,
                        help="generative eval every N steps (0: only at the end)")
    parser.add_argument("--eval-max-problems", type=int, default=64, help="problems per task in the generative eval")
    parser.add_argument("--eval-max-new-tokens", type=int, default=128)
    add_freeze_flag(parser)
    add_run_flags(parser, "SFT")
    args = parse_stage_args(parser, argv, "sft", RESUME_MAY_CHANGE,
                            positive=("device_batch_size", "target_examples_per_step", "eval_steps",
                                      "eval_max_problems", "eval_max_new_tokens"))
    return args


def main(argv=None):
    args = parse_args(argv)

    # --- init and model: the source checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    run = StageRun("sft", args, "SFT", freeze=True)
    from nanochat.engine import Engine
    model, tokenizer, rank, world_size, device = run.model, run.tokenizer, run.rank, run.world_size, run.device
    max_seq_len = args.max_seq_len or model.config.sequence_len
    run.print_model()

    # --- data: one conversation per row, padded
    train_ds, val_ds = sft_mixture("train", args.offline), sft_mixture("val", args.offline)
    run.check_tasks_fit(train_ds, val_ds)
    examples_per_micro = args.device_batch_size * world_size
    if args.target_examples_per_step % examples_per_micro != 0:
        raise NanochatError(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of "
                            f"--device-batch-size x ranks = {examples_per_micro}")
    grad_accum_steps = args.target_examples_per_step // examples_per_micro
    num_iterations = num_iterations_for(args, len(train_ds), args.target_examples_per_step)
    train_loader = ConversationBatches(train_ds, tokenizer, args.device_batch_size, max_seq_len, rank, world_size,
                                       run.loader_state())
    print0(f"{len(train_ds):,} training conversations, {num_iterations} steps of {args.target_examples_per_step} "
           f"({grad_accum_steps} accumulation steps), validation on {len(val_ds):,}")

    # --- optimizers (same split as base training: AdamW for embeddings/head, Muon for matrices)
    run.start_training()

    def evaluate_generative():
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

    # --- training loop
    step = run.start_step
    train_loss = float("nan")
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0 and step > run.start_step) or last_step:
            val_loader = ConversationBatches(val_ds, tokenizer, args.device_batch_size, max_seq_len, rank, world_size)
            run.validate(step, val_loader)
        if (args.eval_metrics_every > 0 and step % args.eval_metrics_every == 0 and step > run.start_step) or last_step:
            accuracies = evaluate_generative()
            run.metrics.update({f"{name}_accuracy": acc for name, acc in accuracies.items()})
            print0(f"step {step:05d} | " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in accuracies.items()))
            run.wandb_run.log({"step": step, **accuracies})
        if last_step:
            break

        t0 = time.time()
        lrm = lr_multiplier(step / num_iterations, warmdown_ratio=1.0)  # linear decay to zero
        train_loss, num_tokens = run.supervised_step(train_loader, grad_accum_steps, lrm)
        step += 1
        dt = time.time() - t0
        run.log_step(step, num_iterations, f"loss {train_loss:.4f} | lrm {lrm:.3f} | "
                     f"{num_tokens * world_size / dt:,.0f} supervised tok/s | epoch {train_loader.progress():.2f}",
                     train_loss=train_loss, lrm=lrm)
        if periodic_save_due(step, args.save_every, num_iterations):
            run.save(step, train_loader.state(), train_loss=train_loss)

    # --- save and report (the last row: the final metrics)
    run.finish(step, train_loader.state(), SECTION,
               {"Training conversations": len(train_ds), "Number of iterations": num_iterations},
               train_loss=train_loss)
    return 0


if __name__ == "__main__":
    run_main(main)
