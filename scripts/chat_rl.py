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

import time

import torch

from nanochat.chat_evaluation import build_eval_task, run_generative_eval
from nanochat.common import ArgumentParser, NanochatError, print0, run_main
from nanochat.conversation_loader import collate_supervised
from nanochat.policy_gradient import group_advantages, policy_gradient_loss, reward_of
from nanochat.post_training import (StageRun, add_optimizer_flags, add_run_flags, add_source_flags, all_reduce_mean,
                                    lr_multiplier, num_iterations_for, parse_stage_args, periodic_save_due)


# -----------------------------------------------------------------------------
# Tasks

def build_tasks(offline):
    """(train task, held-out eval task)."""
    if offline:
        from tasks.arithmetic import Arithmetic
        return Arithmetic(split="train"), build_eval_task("Arithmetic", offline=True)
    from tasks.gsm8k import GSM8K
    return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")


# -----------------------------------------------------------------------------

# flags that --resume may change (applied and logged); see nanochat.post_training.parse_stage_args
RESUME_MAY_CHANGE = {"num_iterations", "num_epochs", "eval_every", "save_every", "eval_examples", "pass_k"}


def parse_args(argv=None):
    parser = ArgumentParser(description="On-policy RL (group-relative policy gradient) on math problems.")
    add_source_flags(parser, "sft", ["sft", "mid"], offline_help="synthetic arithmetic instead of GSM8K (no network)")
    parser.add_argument("--num-epochs", type=float, default=1.0)
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    parser.add_argument("--examples-per-step", type=int, default=16, help="prompts per optimizer step, all ranks")
    parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt (the group)")
    parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward pass")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    add_optimizer_flags(parser, init_lr_frac=0.05)
    parser.add_argument("--eval-every", type=int, default=60, help="pass@k eval every N steps (0: only at the end)")
    parser.add_argument("--eval-examples", type=int, default=400, help="held-out problems in the pass@k eval")
    parser.add_argument("--pass-k", type=int, default=8, help="k of the pass@k eval (samples per problem)")
    add_run_flags(parser, "RL")
    args = parse_stage_args(parser, argv, "rl", RESUME_MAY_CHANGE,
                            positive=("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens",
                                      "eval_examples", "pass_k"))
    return args


def main(argv=None):
    args = parse_args(argv)

    # --- init and model: the SFT checkpoint, or our own newest one when resuming (checks tokenizer/model agreement)
    run = StageRun("rl", args, "RL")
    from nanochat.engine import Engine
    model, tokenizer, rank, world_size, device = run.model, run.tokenizer, run.rank, run.world_size, run.device
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    # --- data: rank r takes prompts r, r+w, ... ; the cursor is saved for an exact resume
    train_task, eval_task = build_tasks(args.offline)
    if args.examples_per_step % world_size != 0:
        raise NanochatError(f"--examples-per-step {args.examples_per_step} is not a multiple of the "
                            f"{world_size} ranks")
    examples_per_rank = args.examples_per_step // world_size
    num_iterations = num_iterations_for(args, len(train_task), args.examples_per_step)
    loader_state = run.loader_state()
    cursor = loader_state["cursor"] if loader_state else rank
    prompt_ids = tokenizer.render_for_completion(train_task[0])
    if max(prompt_ids) >= model.config.vocab_size:
        raise NanochatError("task prompts render to ids outside the model's vocab; run python -m nanochat.doctor")
    print0(f"{len(train_task):,} training prompts, {num_iterations} steps of {args.examples_per_step} prompts x "
           f"{args.num_samples} samples")

    # --- optimizers
    run.start_training()

    def evaluate_pass_at_k():
        model.eval()
        results = {}
        for k in sorted({1, args.pass_k}):
            passed, total = run_generative_eval(eval_task, tokenizer, engine, num_samples=k,
                                                max_new_tokens=args.max_new_tokens,
                                                temperature=1.0 if k > 1 else 0.0,
                                                top_k=args.top_k, max_problems=args.eval_examples, rank=rank,
                                                world_size=world_size, device=device, progress=False)
            results[f"pass@{k}"] = passed / max(total, 1)
        model.train()
        return results

    # --- training loop
    metrics = run.metrics
    step = run.start_step
    mean_reward = float("nan")
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            metrics.update(evaluate_pass_at_k())
            pass_at = {k: v for k, v in metrics.items() if k.startswith("pass@")}
            print0(f"step {step:05d} | " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in pass_at.items()))
            run.wandb_run.log({"step": step, **pass_at})
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
            inputs_all, targets_all = collate_supervised(list(zip(sequences, masks)), pad_id)
            num_valid = int((targets_all >= 0).sum().item())
            num_sampled += num_valid
            for b in range(0, len(sequences), args.device_batch_size):
                inputs = inputs_all[b:b + args.device_batch_size].to(device)
                targets = targets_all[b:b + args.device_batch_size].to(device)
                with run.autocast:
                    logprobs = -model(inputs, targets, loss_reduction="none")  # (n, T)
                loss = policy_gradient_loss(logprobs, targets, advantages[b:b + args.device_batch_size], num_valid)
                (loss / examples_per_rank).backward()
        lrm = lr_multiplier(step / num_iterations, warmdown_ratio=1.0)  # linear decay to zero
        run.step_optimizers(lrm)
        step += 1
        mean_reward = all_reduce_mean(sum(rewards_seen) / max(len(rewards_seen), 1), device)
        dt = time.time() - t0
        run.log_step(step, num_iterations, f"mean reward {mean_reward:.3f} | lrm {lrm:.3f} | "
                     f"{num_sampled * world_size / dt:,.0f} sampled tok/s", reward=mean_reward, lrm=lrm)
        if periodic_save_due(step, args.save_every, num_iterations):
            run.save(step, {"cursor": cursor}, mean_reward=mean_reward)

    # --- save and report (the last row: the final metrics)
    run.finish(step, {"cursor": cursor}, "Chat RL",
               {"Training prompts": len(train_task), "Number of iterations": num_iterations},
               mean_reward=mean_reward)
    return 0


if __name__ == "__main__":
    run_main(main)
