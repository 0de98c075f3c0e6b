"""
Evaluating a chat model on tasks: the held-out task splits by name, and the two kinds of evaluation.

Categorical tasks (multiple choice: ARC, MMLU) are scored by restricted-letter logits: the prompt is
rendered up to the assistant's turn, and the prediction is the allowed letter whose token has the highest
logit at that position. Generative tasks (GSM8K, HumanEval, spelling, synthetic arithmetic) are scored by
sampling completions with the Engine (tool use included) and calling task.evaluate on each. Problems are
sharded by rank (rank r of w takes r, r+w, ...) and the counts summed over ranks. ChatCORE centres each
accuracy on its chance baseline: (acc - baseline) / (1 - baseline).

A generative problem whose reference answer is longer than the token budget (--max-new-tokens) fails
whatever the model writes: the answer is cut off before its last line. `answers_beyond_budget` counts
them, so that an evaluation says so instead of quietly capping its own score.
"""

import sys

import torch
import torch.distributed as dist

from nanochat.common import NanochatError
from nanochat.progress import progress as progress_bar

ONLINE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
OFFLINE_TASKS = ["Arithmetic", "SimpleSpelling", "SpellingBee", "HumanEval"]


# -----------------------------------------------------------------------------
# Task lookup (held-out eval splits)

def build_eval_task(name, offline=False):
    """The held-out evaluation split of a task by its report name."""
    key = name.lower()
    if key in ("arc-easy", "arc-challenge"):
        from tasks.arc import ARC
        return ARC(subset="ARC-Easy" if key == "arc-easy" else "ARC-Challenge", split="test")
    if key == "mmlu":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if key == "gsm8k":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if key == "humaneval":
        from tasks.humaneval import HumanEval
        return HumanEval(offline=offline)
    if key == "spellingbee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=256, split="test")
    if key == "simplespelling":
        from tasks.spellingbee import SimpleSpelling
        return SimpleSpelling(size=256, split="test")
    if key == "arithmetic":
        from tasks.arithmetic import Arithmetic
        return Arithmetic(split="test")
    raise NanochatError(f"unknown task {name!r}; known: {', '.join(ONLINE_TASKS + OFFLINE_TASKS)}")


def task_choices(conversation):
    """The allowed answer letters of a multiple-choice conversation."""
    letters = conversation.get("letters")
    if not letters:
        raise NanochatError("a categorical task's conversation carries no 'letters'; fix the task")
    return list(letters)


def chance_baseline(task):
    """Accuracy of random guessing: 1/num_choices for multiple choice, 0 for generative tasks."""
    if task.eval_type == "categorical" and len(task) > 0:
        return 1.0 / len(task_choices(task[0]))
    return 0.0


def centred_accuracy(accuracy, baseline):
    return (accuracy - baseline) / (1.0 - baseline)


# -----------------------------------------------------------------------------
# The two kinds of evaluation. Both return (num_passed, num_total) over ALL ranks.

def _problem_indices(task, max_problems, rank, world_size):
    num = len(task) if max_problems is None else min(len(task), max_problems)
    return list(range(rank, num, world_size))


def reference_answer_tokens(tokenizer, conversation):
    """Tokens a model generates to write the conversation's final (reference) assistant answer: its text,
    tool calls and the tool outputs the engine forces in (they count against the budget too), without
    the closing <|assistant_end|>."""
    ids, _ = tokenizer.render_conversation(conversation, max_tokens=sys.maxsize)
    return len(ids) - len(tokenizer.render_for_completion(conversation)) - 1


def answers_beyond_budget(task, tokenizer, max_new_tokens, max_problems=None):
    """(how many, of how many, the longest): of the problems a generative eval runs, those whose
    reference answer needs more than max_new_tokens tokens and so cannot pass."""
    lengths = [reference_answer_tokens(tokenizer, task[i]) for i in _problem_indices(task, max_problems, 0, 1)]
    return sum(n > max_new_tokens for n in lengths), len(lengths), max(lengths, default=0)


def _all_reduce_counts(passed, total, device):
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0].item()), int(counts[1].item())


def _eval_progress(num_problems, show):
    """rank 0's share of the problems, with its running passed count (progress_bar hides other ranks)."""
    return progress_bar(total=num_problems, desc="problems (rank 0)", unit="problem", disable=None if show else True)


def _advance(bar, passed, total, n=1):
    bar.set_postfix_str(f"{passed}/{total} passed ({100 * passed / max(total, 1):.1f}%)", refresh=False)
    bar.update(n)


def letter_token_ids(tokenizer, letters):
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise NanochatError(f"answer letter {letter!r} is not a single token in this tokenizer; "
                                "categorical eval needs one token per letter")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, rank=0, world_size=1,
                         device="cpu", progress=True):
    """Multiple choice by restricted-letter logits, `batch_size` prompts per forward pass."""
    indices = _problem_indices(task, max_problems, rank, world_size)
    bos = tokenizer.get_bos_token_id()
    passed, total = 0, 0
    with _eval_progress(len(indices), progress) as bar:
        for start in range(0, len(indices), batch_size):
            conversations = [task[i] for i in indices[start:start + batch_size]]
            prompts = [tokenizer.render_for_completion(c) for c in conversations]
            max_len = max(len(p) for p in prompts)
            # right-pad with BOS; the answer is read at each prompt's own last position
            batch = torch.full((len(prompts), max_len), bos, dtype=torch.long, device=device)
            for row, prompt in enumerate(prompts):
                batch[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
            logits = model(batch)  # (B, T, vocab_size)
            for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
                letters = task_choices(conversation)
                allowed = letter_token_ids(tokenizer, letters)
                answer_logits = logits[row, len(prompt) - 1, allowed]
                predicted = letters[int(answer_logits.argmax().item())]
                passed += int(bool(task.evaluate(conversation, predicted)))
                total += 1
            _advance(bar, passed, total, len(conversations))
    return _all_reduce_counts(passed, total, device)


@torch.no_grad()
def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=256, temperature=0.0,
                        top_k=50, max_problems=None, rank=0, world_size=1, device="cpu", seed=42,
                        progress=True):
    """Sample `num_samples` completions per problem (one batched generate call); a problem passes
    if any sample passes task.evaluate (so num_samples=k gives pass@k)."""
    indices = _problem_indices(task, max_problems, rank, world_size)
    passed, total = 0, 0
    with _eval_progress(len(indices), progress) as bar:
        for i in indices:
            conversation = task[i]
            prompt = tokenizer.render_for_completion(conversation)
            total += 1
            if len(prompt) < engine.model.config.sequence_len:  # else the prompt alone fills the context: a failure
                results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                                   temperature=temperature, top_k=top_k, seed=seed + i)
                completions = [tokenizer.decode(sample[len(prompt):]) for sample in results]
                passed += int(any(bool(task.evaluate(conversation, completion)) for completion in completions))
            _advance(bar, passed, total)
    return _all_reduce_counts(passed, total, device)


def run_task_eval(task, tokenizer, model, engine, settings, rank=0, world_size=1, device="cpu", progress=True):
    """Dispatch on the task's eval type; returns (accuracy in [0, 1], number of problems) over all ranks."""
    if task.eval_type == "categorical":
        passed, total = run_categorical_eval(task, tokenizer, model, settings["batch_size"],
                                             settings["max_problems"], rank, world_size, device, progress)
    elif task.eval_type == "generative":
        passed, total = run_generative_eval(task, tokenizer, engine, settings["num_samples"],
                                            settings["max_new_tokens"], settings["temperature"],
                                            settings["top_k"], settings["max_problems"], rank, world_size,
                                            device, progress=progress)
    else:
        raise NanochatError(f"task {task.__class__.__name__} has unknown eval_type {task.eval_type!r}")
    return passed / max(total, 1), total
