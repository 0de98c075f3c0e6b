"""
On-policy reinforcement learning on math word problems (GSM8K online, synthetic arithmetic offline).

For each training prompt, sample a group of --num-samples completions with the Engine (tool calls
run, their outputs forced in), reward each one 1 if its final answer is correct (task.reward, or
task.evaluate), and use the advantage = reward - mean reward of the group. The loss is the
policy gradient -mean(advantage * log p(token)) over the sampled tokens only: prompt tokens,
forced tool outputs (mask 0) and padding are excluded. A simplified GRPO: no KL term, no ratio
clipping (strictly on-policy, one update per batch of samples). pass@k on held-out problems is
evaluated during training. Starts from the SFT checkpoint; saves to <base>/chatrl_checkpoints/<tag>/.

Run:
    python -m scripts.chat_rl                          # GSM8K
    python -m scripts.chat_rl --offline                # synthetic arithmetic (CPU profile)
    python -m scripts.chat_rl --resume
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --num-samples 16
"""

import contextlib
import time

import torch

from nanochat.checkpoint_manager import parse_args_noting_explicit, resumed_run_args
from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration,
                             init_wandb, print0, run_main)
from scripts.chat_sft import all_reduce_mean, gather_rank_states


# -----------------------------------------------------------------------------
# Tasks

def build_tasks(offline):
    """(train task, held-out eval task)."""
    if offline:
        from scripts.chat_eval import build_eval_task
        from tasks.arithmetic import Arithmetic
        return Arithmetic(split="train"), build_eval_task("Arithmetic", offline=True)
    from tasks.gsm8k import GSM8K
    return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")


def reward_of(task, conversation, completion):
    """1.0 for a correct final answer, else 0.0 (task.reward if the task defines one)."""
    fn = getattr(task, "reward", None) or task.evaluate
    return float(fn(conversation, completion))


# -----------------------------------------------------------------------------
# The policy-gradient pieces

def group_advantages(rewards):
    """rewards (N,) of one prompt's group -> reward - group mean (no std normalisation)."""
    return rewards - rewards.mean()


def pad_samples(sequences, masks, pad_id):
    """Lists of token lists and their engine masks -> (inputs, targets) (N, T): targets[i, t] =
    seq[t+1] where mask[t+1] == 1 (a sampled token), else -1 (prompt, forced tool output, padding)."""
    T = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), T), -1, dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        seq_t = torch.tensor(seq, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[i, :len(seq) - 1] = seq_t[:-1]
        row = seq_t[1:].clone()
        row[~keep] = -1
        targets[i, :len(seq) - 1] = row
    return inputs, targets


def policy_gradient_loss(logprobs, targets, advantages, num_valid):
    """logprobs (N, T) of the target tokens, advantages (N,): -sum(adv * logp over sampled tokens) /
    num_valid, i.e. minus the mean over all sampled tokens of the group."""
    valid = (targets >= 0).float()
    return -(logprobs * valid * advantages.unsqueeze(1)).sum() / max(num_valid, 1)


# -----------------------------------------------------------------------------

# --resume continues the run with its own arguments (from its checkpoint meta). The first set may change on
# resume (applied and logged); the second is always this invocation's; any other flag given with a different
# value would silently change the run and is refused unless --override-args.
RESUME_MAY_CHANGE = {"num_iterations", "num_epochs", "eval_every", "save_every", "eval_examples", "pass_k"}
RESUME_RUNTIME = {"source", "model_tag", "step", "output_tag", "device", "resume", "resume_step", "override_args",
                  "run"}


def parse_args(argv=None):
    parser = ArgumentParser(description="On-policy RL (group-relative policy gradient) on math problems.")
    parser.add_argument("-i", "--source", default="sft", choices=["sft", "mid"], help="checkpoint to start from")
    parser.add_argument("-g", "--model-tag", default=None)
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--output-tag", default=None, help="tag to save under (default: the source's tag)")
    parser.add_argument("--offline", action="store_true", help="synthetic arithmetic instead of GSM8K (no network)")
    parser.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--num-epochs", type=float, default=1.0)
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    parser.add_argument("--examples-per-step", type=int, default=16, help="prompts per optimizer step, all ranks")
    parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt (the group)")
    parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward pass")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--init-lr-frac", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=60, help="pass@k eval every N steps (0: only at the end)")
    parser.add_argument("--eval-examples", type=int, default=400, help="held-out problems in the pass@k eval")
    parser.add_argument("--pass-k", type=int, default=8, help="k of the pass@k eval (samples per problem)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest complete RL checkpoint with its own arguments")
    parser.add_argument("--resume-step", type=int, default=None,
                        help="with --resume: this complete step (default: the newest)")
    parser.add_argument("--override-args", action="store_true",
                        help="with --resume: let flags change the run's own arguments")
    parser.add_argument("--run", default=None, help="wandb run name (off by default)")
    parser.add_argument("--seed", type=int, default=42)
    args, explicit = parse_args_noting_explicit(parser, argv)
    if args.resume:
        args = resumed_run_args("rl", args, explicit, RESUME_MAY_CHANGE, RESUME_RUNTIME)
    elif args.resume_step is not None or args.override_args:
        raise NanochatError("--resume-step and --override-args only apply with --resume")
    for name in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens", "eval_examples", "pass_k"):
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
    from nanochat.engine import Engine
    from scripts.chat_eval import run_generative_eval
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    wandb_run = init_wandb(args.run, "nanochat-rl", vars(args))

    # --- model (checks tokenizer/model agreement)
    model, tokenizer, resume_state, optimizer_states, checkpoint_dir, start_step = start_or_resume(
        "rl", args.source, device, rank, args.resume, args.model_tag, args.step, args.output_tag, args.resume_step)
    if resume_state is not None:
        print0(f"resuming RL from {checkpoint_dir} step {start_step}")
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    # --- data: rank r takes prompts r, r+w, ... ; the cursor is saved for an exact resume
    train_task, eval_task = build_tasks(args.offline)
    if args.examples_per_step % world_size != 0:
        raise NanochatError(f"--examples-per-step {args.examples_per_step} is not a multiple of the {world_size} ranks")
    examples_per_rank = args.examples_per_step // world_size
    num_iterations = (args.num_iterations if args.num_iterations > 0
                      else max(1, int(args.num_epochs * len(train_task)) // args.examples_per_step))
    cursor = rank
    if resume_state is not None:
        states = (resume_state.get("dataloader_state") or {}).get("ranks")
        if not states or len(states) != world_size:
            raise NanochatError(f"--resume: the checkpoint was saved with {len(states or [])} ranks; resume with the same number")
        cursor = states[rank]["cursor"]
    prompt_ids = tokenizer.render_for_completion(train_task[0])
    if max(prompt_ids) >= model.config.vocab_size:
        raise NanochatError("task prompts render to ids outside the model's vocab; run python -m nanochat.doctor")
    print0(f"{len(train_task):,} training prompts, {num_iterations} steps of {args.examples_per_step} prompts x "
           f"{args.num_samples} samples")

    # --- optimizers
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["lr"] * args.init_lr_frac
    if resume_state is not None:
        for opt, state in zip(optimizers, optimizer_states):
            opt.load_state_dict(state)

    def evaluate_pass_at_k():
        model.eval()
        results = {}
        for k in sorted({1, args.pass_k}):
            passed, total = run_generative_eval(eval_task, tokenizer, engine, num_samples=k,
                                                max_new_tokens=args.max_new_tokens, temperature=1.0 if k > 1 else 0.0,
                                                top_k=args.top_k, max_problems=args.eval_examples, rank=rank,
                                                world_size=world_size, device=device, progress=False)
            results[f"pass@{k}"] = passed / max(total, 1)
        model.train()
        return results

    def save(step, metrics):
        config = model.config
        meta_out = {
            "model_config": config.to_dict(), "arch": config.arch, "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.get_vocab_size(), "train_args": vars(args), "metrics": metrics, "stage": "rl",
            "dataloader_state": {"ranks": gather_rank_states({"cursor": cursor})}, "rng": capture_rng_state(),
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
    mean_reward = float("nan")
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            metrics.update(evaluate_pass_at_k())
            print0(f"step {step:05d} | " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in metrics.items() if k.startswith("pass@")))
            wandb_run.log({"step": step, **{k: v for k, v in metrics.items() if k.startswith("pass@")}})
        if last_step:
            break

        t0 = time.time()
        rewards_seen, num_sampled = [], 0
        for example_idx in range(examples_per_rank):
            conversation = train_task[cursor % len(train_task)]
            prompt = tokenizer.render_for_completion(conversation)
            cursor += world_size
            if len(prompt) >= model.config.sequence_len - 1:
                continue  # no room to answer inside the context window: skip this prompt
            # sample the group (in device-sized chunks), then score it
            model.eval()
            sequences, masks = [], []
            for chunk_start in range(0, args.num_samples, args.device_batch_size):
                n = min(args.device_batch_size, args.num_samples - chunk_start)
                seed = hash((args.seed, step, rank, example_idx, chunk_start)) & 0x7FFFFFFF
                seqs, ms = engine.generate_batch(prompt, num_samples=n, max_tokens=args.max_new_tokens,
                                                 temperature=args.temperature, top_k=args.top_k, seed=seed)
                sequences += seqs
                masks += ms
            model.train()
            rewards = torch.tensor([reward_of(train_task, conversation, tokenizer.decode(s[len(prompt):]))
                                    for s in sequences], dtype=torch.float32, device=device)
            advantages = group_advantages(rewards)
            rewards_seen.append(rewards.mean().item())
            # policy gradient over the sampled tokens; the group's token count normalises the loss
            inputs_all, targets_all = pad_samples(sequences, masks, pad_id)
            num_valid = int((targets_all >= 0).sum().item())
            num_sampled += num_valid
            for b in range(0, len(sequences), args.device_batch_size):
                inputs = inputs_all[b:b + args.device_batch_size].to(device)
                targets = targets_all[b:b + args.device_batch_size].to(device)
                with autocast:
                    logprobs = -model(inputs, targets, loss_reduction="none")  # (n, T)
                loss = policy_gradient_loss(logprobs, targets, advantages[b:b + args.device_batch_size], num_valid)
                (loss / examples_per_rank).backward()
        lrm = 1.0 - step / num_iterations
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1
        mean_reward = all_reduce_mean(sum(rewards_seen) / max(len(rewards_seen), 1), device)
        dt = time.time() - t0
        eta = (time.time() - t_start) / (step - start_step) * (num_iterations - step)
        print0(f"step {step:05d}/{num_iterations} | mean reward {mean_reward:.3f} | lrm {lrm:.3f} | "
               f"{num_sampled * world_size / dt:,.0f} sampled tok/s | eta {format_duration(eta)}")
        wandb_run.log({"step": step, "reward": mean_reward, "lrm": lrm})
        if args.save_every > 0 and step % args.save_every == 0 and step < num_iterations:
            save(step, dict(metrics, mean_reward=mean_reward))

    # --- save and report
    metrics["mean_reward"] = mean_reward
    save(step, metrics)
    if rank == 0:
        from nanochat.report import get_report
        get_report().log(section="Chat RL", data=[
            {k: v for k, v in vars(args).items()},
            {"Training prompts": len(train_task), "Number of iterations": num_iterations,
             "Training time": format_duration(time.time() - t_start)},
            {k: v for k, v in metrics.items()},
        ])
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
