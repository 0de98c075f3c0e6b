"""
Chat with a trained model in the terminal, or have a base model continue a text. The tokenizer
travels with the checkpoint, so naming the stage (and optionally tag/step) is enough. Answers
stream as they are generated.

    python -m scripts.chat_cli -i sft                     # newest sft checkpoint, interactive
    python -m scripts.chat_cli -i sft -p "Why is the sky blue?"    # one answer, then exit
    python -m scripts.chat_cli -i rl -g d20 -s 500 -t 0.6 -k 50
    python -m scripts.chat_cli -i base -p "The capital of France is"   # continue a text

A base model never saw chat tokens, so `-i base` (and `--raw`, for any model) continues the text
as given: BOS + its tokens, no chat turns, no calculator; each line is continued on its own.
In a chat, `clear` starts a new conversation; `quit` or `exit` (or Ctrl-D) leaves.
"""

import random
import sys

from nanochat.common import ArgumentParser, NanochatError, resolve_device_type, run_main
from nanochat.engine import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPES, Engine, StreamDecoder


def parse_args(argv):
    parser = ArgumentParser(description="Chat with a nanochat checkpoint in the terminal.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which stage's checkpoint")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("-p", "--prompt", default=None, help="answer (raw: continue) this one prompt and exit")
    parser.add_argument("--raw", action="store_true",
                        help="continue the text as given, without chat tokens (always so with -i base)")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k filtering")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per answer)")
    parser.add_argument("--device", default="", help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--weights-dtype", default="model", choices=list(WEIGHTS_DTYPES), help=WEIGHTS_DTYPE_HELP)
    args = parser.parse_args(argv)
    if not 0.0 <= args.temperature <= 2.0:
        raise NanochatError(f"--temperature {args.temperature} is out of range; use 0 to 2")
    if args.top_k < 0 or not 0.0 < args.top_p <= 1.0 or args.max_tokens < 1:
        raise NanochatError("use --top-k >= 0, 0 < --top-p <= 1 and --max-tokens >= 1")
    return args


def answer(engine, tokenizer, tokens, args, out, raw=False):
    """Stream one assistant turn (raw: one continuation) after `tokens` to `out`; returns the ids it
    generated (the terminal <|assistant_end|> included, so the conversation can continue)."""
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    decoder = StreamDecoder(tokenizer, show_tool_calls=not raw)
    generated = []
    for column, _ in engine.generate(tokens, num_samples=1, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k or None, top_p=args.top_p, seed=seed):
        token = column[0]
        if token in (engine.assistant_end, engine.bos):
            break
        generated.append(token)
        out.write(decoder.push(token))
        out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    return generated + [engine.assistant_end]


def continue_lines(engine, tokenizer, args, window, interactive):
    """Raw mode: every line is a text of its own, continued after BOS (no history, no chat tokens)."""
    while True:
        try:
            text = input("\nText: " if interactive else "")
        except EOFError:
            print()
            return 0
        if text.strip() in ("quit", "exit"):
            return 0
        if not text.strip():
            continue
        tokens = [engine.bos] + tokenizer.encode(text)
        if len(tokens) >= window:
            print(f"(that text is too long for this model's {window}-token window)")
            continue
        if interactive:
            print(f"\n{text}", end="", flush=True)  # the continuation follows the text it continues
        try:
            answer(engine, tokenizer, tokens, args, sys.stdout, raw=True)
        except KeyboardInterrupt:
            print("\n(stopped)")


def main(argv=None):
    args = parse_args(argv)

    # --- load the model; the checkpoint brings its own tokenizer
    from nanochat.checkpoint_manager import load_model
    device = resolve_device_type(args.device)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    raw = args.raw or args.source == "base"
    engine = Engine(model, tokenizer, tools=not raw, weights_dtype=WEIGHTS_DTYPES[args.weights_dtype])
    if args.weights_dtype != "model":
        print(f"(decoding with a {args.weights_dtype} copy of the weights)", file=sys.stderr)
    bos, user_start, user_end, assistant_start = (tokenizer.encode_special(name) for name in
                                                  ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>"))
    window = model.config.sequence_len

    def user_turn(text):
        return [user_start] + tokenizer.encode(text) + [user_end, assistant_start]

    # --- one prompt and exit
    if args.prompt is not None:
        tokens = [bos] + (tokenizer.encode(args.prompt) if raw else user_turn(args.prompt))
        if len(tokens) >= window:
            raise NanochatError(f"the prompt is {len(tokens)} tokens; this model's context window is {window}")
        answer(engine, tokenizer, tokens, args, sys.stdout, raw=raw)
        return 0

    # --- interactive loop
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"nanochat ({args.source} step {meta.get('step')}, {model.num_params() / 1e6:.1f}M params, {device}). "
              + ("Each line is continued as plain text; 'quit' to leave." if raw else
                 "Type 'clear' for a new chat, 'quit' to leave."))
    if raw:
        return continue_lines(engine, tokenizer, args, window, interactive)
    tokens = [bos]
    while True:
        try:
            text = input("\nUser: " if interactive else "")
        except EOFError:
            print()
            return 0
        text = text.strip()
        if text in ("quit", "exit"):
            return 0
        if text == "clear":
            tokens = [bos]
            print("(new conversation)")
            continue
        if not text:
            continue
        turn = user_turn(text)
        if len(tokens) + len(turn) >= window - 1:
            if 1 + len(turn) >= window - 1:
                print(f"(that message is too long for this model's {window}-token window)")
                continue
            print("(the conversation filled the context window; starting a new one)")
            tokens = [bos]
        tokens += turn
        if interactive:
            print("\nAssistant: ", end="", flush=True)
        try:
            tokens += answer(engine, tokenizer, tokens, args, sys.stdout)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n(stopped)")
            tokens += [engine.assistant_end]


if __name__ == "__main__":
    run_main(main)
