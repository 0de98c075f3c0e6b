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

import time

from nanochat.chat_evaluation import (OFFLINE_TASKS, ONLINE_TASKS, answers_beyond_budget, build_eval_task,
                                      centred_accuracy, chance_baseline, run_task_eval)
from nanochat.common import (ArgumentParser, NanochatError, compute_cleanup, compute_init, format_duration, print0,
                             run_main)
from nanochat.engine import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPES
from tasks.common import TaskDataUnavailable


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(description="Evaluate a chat model on tasks and compute ChatCORE.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which checkpoint family to evaluate")
    parser.add_argument("-a", "--tasks", default=None,
                        help="'|'-separated task names (default: all online tasks, or all offline ones with --offline)")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("-x", "--max-problems", type=int, default=None,
                        help="evaluate at most this many problems per task")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass (categorical)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (generative, pass@n)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-m", "--max-new-tokens", type=int, default=256)
    parser.add_argument("--offline", action="store_true", help="use the offline task set (no network)")
    parser.add_argument("--device", default="", help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--weights-dtype", default="model", choices=list(WEIGHTS_DTYPES),
                        help="generative tasks: " + WEIGHTS_DTYPE_HELP + "; categorical tasks use the model's own")
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
    engine = Engine(model, tokenizer, weights_dtype=WEIGHTS_DTYPES[args.weights_dtype])
    print0(f"evaluating {args.source} checkpoint, step {meta.get('step')} on {device}"
           + (f", decoding with {args.weights_dtype} weights" if args.weights_dtype != "model" else ""))

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
        if task.eval_type == "generative":
            beyond, considered, longest = answers_beyond_budget(task, tokenizer, args.max_new_tokens, args.max_problems)
            if beyond:
                print0(f"warning: {beyond} of {considered} {name} reference answers are longer than --max-new-tokens "
                       f"{args.max_new_tokens} (the longest: {longest} tokens); those problems cannot pass: "
                       f"raise -m to {longest} to score them")
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
             "max_problems": args.max_problems, "num_samples": args.num_samples, "weights_dtype": args.weights_dtype},
            {name: acc for name, acc in results.items()},
            {"ChatCORE": chatcore},
        ])
    compute_cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
