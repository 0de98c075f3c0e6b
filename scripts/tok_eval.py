"""
Evaluate the tokenizer's compression: bytes of UTF-8 text per token (higher = fewer tokens for the
same text), on train and val shard text and on a few sample texts (news-like prose, code, math, Korean).

    python -m scripts.tok_eval
    python -m scripts.tok_eval --tokenizer-dir DIR --max-chars 1000000

Compared with the GPT-2 and GPT-4 (cl100k_base) encodings when tiktoken can load them; they are
downloaded on first use, so offline they are skipped with a note.
"""

import os

from nanochat.common import ArgumentParser, NanochatError, get_base_dir, run_main
from nanochat.tokenizer import load_tokenizer

SAMPLE_TEXTS = {
    "news": (
        "The city council voted on Tuesday to expand the bus network after a year of complaints about "
        "overcrowded routes. Officials said the first new lines would open in the spring, and that fares "
        "would stay the same until at least 2027. \"We heard people loud and clear,\" the mayor told reporters."
    ),
    "code": (
        "def merge_sorted(left, right):\n"
        "    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
        "    out, i, j = [], 0, 0\n"
        "    while i < len(left) and j < len(right):\n"
        "        if left[i] <= right[j]:\n"
        "            out.append(left[i]); i += 1\n"
        "        else:\n"
        "            out.append(right[j]); j += 1\n"
        "    return out + left[i:] + right[j:]\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which vanishes at x = 2, so the minimum is "
        "f(2) = 12 - 24 + 7 = -5. For the integral, \\int_0^1 x^2 dx = 1/3 and 2^{10} = 1024; "
        "also 355/113 = 3.14159292..."
    ),
    "korean": (
        "오늘 아침에는 비가 많이 내렸지만 오후가 되자 하늘이 맑아졌다. 우리는 공원에 가서 산책을 하고 "
        "작은 카페에서 따뜻한 차를 마셨다. 저녁에는 친구들과 함께 저녁을 먹으며 이야기를 나누었다."
    ),
}


def parse_args(argv=None):
    parser = ArgumentParser(description="Evaluate tokenizer compression")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default <base>/tokenizer)")
    parser.add_argument("--max-chars", type=int, default=10_000_000, help="characters of train/val text to evaluate on")
    parser.add_argument("--data-dir", default=None, help="shard directory (default <base>/base_data)")
    return parser.parse_args(argv)


def shard_text(split, args):
    """Concatenated documents of a split, at most --max-chars characters; '' when there are no shards."""
    from nanochat import dataset
    if not dataset.list_parquet_files(args.data_dir):
        return ""
    return "\n".join(dataset.iter_documents(split, max_chars=args.max_chars, data_dir=args.data_dir))


def load_reference_encodings():
    """GPT-2 and GPT-4 encodings if tiktoken can load them (cached or downloadable), else a note."""
    import tiktoken
    encodings, missing = {}, []
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            encodings[label] = tiktoken.get_encoding(name)
        except Exception:  # offline: the download fails with a network error
            missing.append(name)
    return encodings, missing


def bytes_per_token(text, encode):
    num_tokens = len(encode(text))
    return len(text.encode("utf-8")) / max(1, num_tokens), num_tokens


def main(argv=None):
    args = parse_args(argv)
    if args.max_chars <= 0:
        raise NanochatError("--max-chars must be positive")
    tokenizer = load_tokenizer(args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))
    print(f"tokenizer: {tokenizer.kind}, vocab {tokenizer.get_vocab_size():,}, "
          f"fingerprint {tokenizer.fingerprint[:16]}", flush=True)

    # -------------------------------------------------------------------------
    # Texts to evaluate on
    texts = {}
    for split in ("train", "val"):
        text = shard_text(split, args)
        if text:
            texts[split] = text
        else:
            print(f"note: no {split} shard text found; skipping it", flush=True)
    texts.update(SAMPLE_TEXTS)

    # -------------------------------------------------------------------------
    # Encoders to compare
    encoders = {"ours": lambda t: tokenizer.encode(t)}
    references, missing = load_reference_encodings()
    for label, enc in references.items():
        encoders[label] = lambda t, enc=enc: enc.encode_ordinary(t)
    if missing:
        print(f"note: {'/'.join(missing)} unavailable offline (tiktoken could not download them); "
              f"comparing ours only", flush=True)

    # -------------------------------------------------------------------------
    # Table: bytes per token per text and encoder
    rows = []
    for name, text in texts.items():
        row = {"text": name, "bytes": len(text.encode("utf-8"))}
        for label, encode in encoders.items():
            ratio, num_tokens = bytes_per_token(text, encode)
            row[f"{label}_tokens"] = num_tokens
            row[f"{label}_bytes_per_token"] = round(ratio, 3)
        rows.append(row)
    header = f"{'text':<8} {'bytes':>12}" + "".join(f" {label + ' tok':>12} {label + ' B/tok':>11}" for label in encoders)
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['text']:<8} {row['bytes']:>12,}"
        for label in encoders:
            line += f" {row[label + '_tokens']:>12,} {row[label + '_bytes_per_token']:>11.3f}"
        print(line)

    # -------------------------------------------------------------------------
    # Report card
    try:
        from nanochat.report import get_report
    except ImportError:
        return 0
    get_report().log(section="Tokenizer evaluation", data=[
        {"kind": tokenizer.kind, "vocab_size": tokenizer.get_vocab_size(), "fingerprint": tokenizer.fingerprint,
         "compared_with": ", ".join(sorted(references)) or f"none ({'/'.join(missing)} unavailable offline)"},
        {f"{row['text']}_{key}": value for row in rows for key, value in row.items() if key != "text"},
    ])
    return 0


if __name__ == "__main__":
    run_main(main)
