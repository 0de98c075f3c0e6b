"""
Extend a trained tokenizer without renumbering any existing id: add new special tokens, and/or the
tokens of a second tokenizer (e.g. one trained on a new language) that the first one lacks.

    python -m scripts.tok_extend --add-special "<|tool_start|>" "<|tool_end|>"
    python -m scripts.tok_extend --from-tokenizer ~/.cache/nanochat/tokenizer_ko --output-dir ~/.cache/nanochat/tokenizer_ext

New tokens get ids V0, V0+1, ... after every existing id (for BPE that is after the special tokens;
the second tokenizer's tokens go in its own rank order, so each is the merge of two earlier tokens and
tiktoken can reach it). The result has a new fingerprint; its manifest records the parent's
fingerprint and the original vocab size V0 (the default freeze index when the checkpoint is extended).
By default the extended tokenizer replaces --tokenizer-dir, and the parent is kept beside it as
<tokenizer-dir>.parent-<fingerprint[:16]>.
"""

import os
import shutil

from nanochat.common import ArgumentParser, NanochatError, get_base_dir, run_main
from nanochat.tokenizer import load_tokenizer
from nanochat.vocab_extension import extend_tokenizer


def parse_args(argv=None):
    parser = ArgumentParser(description="Add tokens to a trained tokenizer without renumbering existing ids")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer to extend (default <base>/tokenizer)")
    parser.add_argument("--add-special", nargs="+", default=[], metavar="NAME", help="new special tokens, e.g. <|tool|>")
    parser.add_argument("--from-tokenizer", default=None, metavar="DIR",
                        help="a second tokenizer directory whose missing tokens are appended")
    parser.add_argument("--output-dir", default=None, help="where to save (default: replace --tokenizer-dir)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.add_special and not args.from_tokenizer:
        raise NanochatError("nothing to add; pass --add-special NAME ... and/or --from-tokenizer DIR")
    tokenizer_dir = os.path.abspath(args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))
    output_dir = os.path.abspath(args.output_dir or tokenizer_dir)

    # -------------------------------------------------------------------------
    # Load and extend
    tokenizer = load_tokenizer(tokenizer_dir)
    second = load_tokenizer(args.from_tokenizer) if args.from_tokenizer else None
    extended = extend_tokenizer(tokenizer, add_special=args.add_special, from_tokenizer=second)
    v0, v1 = tokenizer.get_vocab_size(), extended.get_vocab_size()
    new_specials = sorted(set(extended.special_tokens) - set(tokenizer.special_tokens))
    print(f"parent: {tokenizer.kind}, vocab {v0:,}, fingerprint {tokenizer.fingerprint[:16]} ({tokenizer_dir})")
    print(f"added {v1 - v0:,} tokens ({len(new_specials)} special: {' '.join(new_specials) or '-'}); "
          f"ids {v0:,}..{v1 - 1:,}" if v1 > v0 else "added 0 tokens: everything asked for is already present")
    if v1 == v0:
        return 0

    # -------------------------------------------------------------------------
    # Save (keeping the parent when replacing it in place)
    if output_dir == tokenizer_dir:
        backup = f"{tokenizer_dir}.parent-{tokenizer.fingerprint[:16]}"
        if not os.path.exists(backup):
            shutil.copytree(tokenizer_dir, backup)
        print(f"parent kept at {backup}")
    extended.save(output_dir)
    print(f"saved extended tokenizer, vocab {v1:,}, fingerprint {extended.fingerprint[:16]} to {output_dir}")

    try:
        from nanochat.report import get_report
    except ImportError:
        return 0
    get_report().log(section="Tokenizer extension", data=[
        {"parent_fingerprint": tokenizer.fingerprint, "original_vocab_size": v0, "vocab_size": v1,
         "fingerprint": extended.fingerprint, "new_special_tokens": new_specials, "from_tokenizer": args.from_tokenizer},
    ])
    return 0


if __name__ == "__main__":
    run_main(main)
