"""
Evaluate a chat model (mid, sft or rl checkpoint) on a list of tasks, and compute ChatCORE.

Categorical tasks (multiple choice: ARC, MMLU) are scored by restricted-letter logits: the
prompt is rendered up to the assistant's turn, and the prediction is the allowed letter whose
token has the highest logit at that position. Generative tasks (GSM8K, HumanEval, spelling,
synthetic arithmetic) are scored by sampling completions with the Engine (tool use included)
and calling task.evaluate on each. ChatCORE is the mean over tasks of the centred accuracy
(acc - baseline) / (1 - baseline), baseline = 1/num_choices for multiple choice, 0 otherwise.

Run:
    python -m scripts.chat_eval -i sft                              # all default tasks
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 200
    python -m scripts.chat_eval -i sft --offline                    # offline tasks (CPU profile)
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft
Under torchrun the problems are sharded by rank and the counts all-reduced.
"""

import sys
import time

import torch
import torch.distributed as dist

from nanochat.common import ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration, print0, run_main
from tasks.common import TaskDataUnavailable

ONLINE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
OFFLINE_TASKS = ["Arithmetic", "SimpleSpelling", "SpellingBee", "HumanEval"]


# -----------------------------------------------------------------------------
# Task lookup (held-out eval splits)

def build_eval_task(name, offline=False):
    """The held-out evaluation split of a task by its report name."""
    import tasks as task_pkg
    builder = getattr(task_pkg, "get_eval_task", None)
    if builder is not None:
        return builder(name, offline=offline)
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
    return list(range(rank, num, world_size)), num


def _all_reduce_counts(passed, total, device):
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0].item()), int(counts[1].item())


def letter_token_ids(tokenizer, letters):
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise NanochatError(f"answer letter {letter!r} is not a single token in this tokenizer; "
                                "categorical eval needs one token per letter")
        ids.append(encoded[0])
    return ids


def _show_progress(progress, passed, total, final=False):
    """A running 'passed/total' line on a terminal (rank 0's share), ended with a newline when final."""
    if not (progress and sys.stdout.isatty()):
        return
    if final:
        print0()
    else:
        print0(f"\r\033[K{passed}/{total} ({100 * passed / max(total, 1):.2f}%) on rank 0", end="")


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, rank=0, world_size=1,
                         device="cpu", progress=True):
    """Multiple choice by restricted-letter logits, `batch_size` prompts per forward pass."""
    indices, num = _problem_indices(task, max_problems, rank, world_size)
    bos = tokenizer.get_bos_token_id()
    passed, total = 0, 0
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
        _show_progress(progress, passed, total)
    _show_progress(progress, passed, total, final=True)
    return _all_reduce_counts(passed, total, device)


@torch.no_grad()
def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=256, temperature=0.0,
                        top_k=50, max_problems=None, rank=0, world_size=1, device="cpu", seed=42,
                        progress=True):
    """Sample `num_samples` completions per problem (one batched generate call); a problem passes
    if any sample passes task.evaluate (so num_samples=k gives pass@k)."""
    indices, num = _problem_indices(task, max_problems, rank, world_size)
    passed, total = 0, 0
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        if len(prompt) >= engine.model.config.sequence_len:
            total += 1  # the prompt alone fills the context window: counted as a failure
            continue
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + i)
        completions = [tokenizer.decode(sample[len(prompt):]) for sample in results]
        outcomes = [bool(task.evaluate(conversation, completion)) for completion in completions]
        passed += int(any(outcomes))
        total += 1
        _show_progress(progress, passed, total)
    _show_progress(progress, passed, total, final=True)
    return _all_reduce_counts(passed, total, device)


def run_task_eval(task, tokenizer, model, engine, args_like, rank=0, world_size=1, device="cpu", progress=True):
    """Dispatch on the task's eval type; returns accuracy in [0, 1] over all ranks."""
    if task.eval_type == "categorical":
        passed, total = run_categorical_eval(task, tokenizer, model, args_like["batch_size"],
                                             args_like["max_problems"], rank, world_size, device, progress)
    elif task.eval_type == "generative":
        passed, total = run_generative_eval(task, tokenizer, engine, args_like["num_samples"],
                                            args_like["max_new_tokens"], args_like["temperature"],
                                            args_like["top_k"], args_like["max_problems"], rank, world_size,
                                            device, progress=progress)
    else:
        raise NanochatError(f"task {task.__class__.__name__} has unknown eval_type {task.eval_type!r}")
    return passed / max(total, 1), total


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(description="Evaluate a chat model on tasks and compute ChatCORE.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoint family to evaluate")
    parser.add_argument("-a", "--tasks", default=None,
                        help="'|'-separated task names (default: all online tasks, or all offline ones with --offline)")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass (categorical)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (generative, pass@n)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-m", "--max-new-tokens", type=int, default=256)
    parser.add_argument("--offline", action="store_true", help="use the offline task set (no network)")
    parser.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--unsafe-execution", action="store_true",
                        help="run model-written code (HumanEval) even where the kernel sandbox cannot be set up: "
                             "DANGEROUS, the code could harm this machine")
    args = parser.parse_args(argv)
    if args.max_problems is not None and args.max_problems < 1:
        raise NanochatError("--max-problems must be >= 1")
    if args.batch_size < 1 or args.num_samples < 1 or args.max_new_tokens < 1:
        raise NanochatError("--batch-size, --num-samples and --max-new-tokens must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)

    # --- init
    ddp, rank, local_rank, world_size, device = compute_init(args.device, seed=args.seed)
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    # --- model (load_model checks the tokenizer fingerprint against the checkpoint's)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    print0(f"evaluating {args.source} checkpoint, step {meta.get('step')} on {device}")

    # --- tasks
    names = args.tasks.split("|") if args.tasks else (OFFLINE_TASKS if args.offline else ONLINE_TASKS)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise NanochatError("-a/--tasks is empty; give e.g. -a 'ARC-Easy|GSM8K'")
    eval_tasks = {}
    for name in names:
        try:
            eval_tasks[name] = build_eval_task(name, offline=args.offline)
        except TaskDataUnavailable as e:
            if args.tasks or not args.offline:  # asked for by name, or online (rerun to retry): a one-line error
                raise
            print0(f"--- {name}: skipped ({e})")  # a default offline task without local data (HumanEval)
    if not eval_tasks:
        raise NanochatError("no task could be loaded; see the lines above, or name tasks with -a")
    if "HumanEval" in eval_tasks:  # it runs model-written code: say what confines it, or refuse now
        from nanochat.sandbox import require_sandbox
        require_sandbox(unsafe_execution=args.unsafe_execution)

    # --- evaluate
    settings = dict(batch_size=args.batch_size, max_problems=args.max_problems, num_samples=args.num_samples,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    results, centred, timings = {}, {}, {}
    for name, task in eval_tasks.items():
        t0 = time.time()
        print0(f"--- {name} ({task.eval_type}, {len(task)} problems)")
        accuracy, total = run_task_eval(task, tokenizer, model, engine, settings, rank, world_size, device)
        timings[name] = time.time() - t0
        results[name] = accuracy
        centred[name] = centred_accuracy(accuracy, chance_baseline(task))
        print0(f"{name} accuracy: {100 * accuracy:.2f}% ({total} problems, {format_duration(timings[name])})")
    chatcore = sum(centred.values()) / len(centred)
    print0(f"ChatCORE: {chatcore:.4f}")

    # --- report card
    if rank == 0:
        from nanochat.report import get_report
        section = {"mid": "Chat evaluation mid", "sft": "Chat evaluation sft", "rl": "Chat evaluation rl",
                   "base": "Chat evaluation base"}[args.source]
        get_report().log(section=section, data=[
            {"source": args.source, "step": meta.get("step"), "model_tag": args.model_tag,
             "max_problems": args.max_problems, "num_samples": args.num_samples},
            {name: acc for name, acc in results.items()},
            {"ChatCORE": chatcore},
        ])
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
