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
from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration,
                             init_wandb, print0, run_main)
from nanochat.conversation_loader import ConversationBatches
from nanochat.post_training import (accumulate_gradients, add_freeze_flag, add_optimizer_flags, add_run_flags,
                                    add_source_flags, autocast_for, build_optimizers, check_task_tokens_fit,
                                    eta_seconds, load_stage_model, log_loss_curves, lr_multiplier,
                                    parse_stage_args, periodic_save_due, rank_loader_state, restore_rng,
                                    save_stage_checkpoint, step_optimizers, validation_loss)


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

    # --- init
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    from nanochat.engine import Engine
    from nanochat.freeze import FrozenRows, resolve_freeze_index
    autocast = autocast_for(device)
    wandb_run = init_wandb(args.run, "nanochat-sft", vars(args))

    # --- model: the source checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    model, tokenizer, resume_state, optimizer_states, checkpoint_dir, start_step = load_stage_model(
        "sft", args, device, rank, "SFT")
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
    train_loader = ConversationBatches(train_ds, tokenizer, args.device_batch_size, max_seq_len, rank, world_size,
                                       rank_loader_state(resume_state, rank, world_size))
    print0(f"{len(train_ds):,} training conversations, {num_iterations} steps of {args.target_examples_per_step} "
           f"({grad_accum_steps} accumulation steps), validation on {len(val_ds):,}")

    # --- optimizers (same split as base training: AdamW for embeddings/head, Muon for matrices)
    optimizers = build_optimizers(model, args, optimizer_states)
    frozen = FrozenRows(model, freeze_index, vocab_size)
    print0(f"freeze: {frozen.describe()}")
    restore_rng(resume_state)

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

    def save(step, metrics):
        save_stage_checkpoint(checkpoint_dir, step, model, optimizers, tokenizer, rank, "sft", args, metrics,
                              train_loader.state(), freeze_until_index=freeze_index)

    # --- training loop
    metrics = dict(resume_state.get("metrics", {})) if resume_state else {}
    t_start = time.time()
    step = start_step
    train_loss = float("nan")
    train_curve, val_curve = [], []  # (step, loss) for the report card's plots
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0 and step > start_step) or last_step:
            val_loader = ConversationBatches(val_ds, tokenizer, args.device_batch_size, max_seq_len, rank, world_size)
            metrics["val_loss"] = validation_loss(model, val_loader, args.eval_steps, device, autocast)
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
        train_loss, num_tokens = accumulate_gradients(model, train_loader, grad_accum_steps, device, autocast)
        lrm = lr_multiplier(step / num_iterations, warmdown_ratio=1.0)  # linear decay to zero
        step_optimizers(model, optimizers, lrm)
        frozen.restore()
        step += 1
        train_curve.append((step, train_loss))
        dt = time.time() - t0
        eta = eta_seconds(t_start, start_step, step, num_iterations)
        print0(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"{num_tokens * world_size / dt:,.0f} supervised tok/s | epoch {train_loader.progress():.2f} | "
               f"eta {format_duration(eta)}")
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
        log_loss_curves("sft", SECTION, train_curve, val_curve)
        get_report().log(section=SECTION, data=[
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
