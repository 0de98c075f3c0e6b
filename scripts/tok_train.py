"""
Train the tokenizer on the pretraining shards and save it to <base>/tokenizer.

    python -m scripts.tok_train                      # BPE, vocab 65536, first 2B characters
    python -m scripts.tok_train --vocab-size 4096 --max-chars 50000000
    python -m scripts.tok_train --tokenizer char     # one id per character, for tiny experiments
    python -m scripts.tok_train --tokenizer hf:PATH/tokenizer.json   # import a Hugging Face tokenizer

Reads documents from <base>/base_data/*.parquet (make them with `python -m nanochat.dataset --embedded`
or `-n N`), each capped at --doc-cap characters so a few huge documents cannot dominate the merges.
The tokenizer directory is written atomically: a crash leaves the previous one (or none), never half of one.
A tokenizer that checkpoints in this base dir were trained with is not replaced unless --overwrite (the
checkpoints carry their own copy, but it is the only tokenizer for their data and their --resume). An imported
tokenizer must give back the text it encodes (checked on sample documents); one that maps text to [UNK] or
normalises it needs --allow-lossy.
"""

import os
import time

from nanochat.checkpoint_manager import checkpoints_trained_with
from nanochat.common import ArgumentParser, NanochatError, format_duration, get_base_dir, read_json, run_main
from nanochat.hf_tokenizer import HFTokenizer
from nanochat.tokenizer import MANIFEST, SPECIAL_TOKENS, CharTokenizer, RustBPETokenizer

# Round-trip sample for an imported tokenizer (beside the first documents of the train shards, if there are any)
SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. It's 3:45 pm, 21.5 C; \"quotes\" & (brackets) [1]!\n"
               "  Indented line\twith a tab, CamelCase, snake_case, e-mail@example.com, 1,234,567.89 + 42 = ?\n")


def parse_args(argv=None):
    parser = ArgumentParser(description="Train the nanochat tokenizer")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters per document")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size including the 9 special tokens")
    parser.add_argument("--tokenizer", default="bpe", help="bpe | char | hf:PATH/tokenizer.json")
    parser.add_argument("--output-dir", default=None, help="where to save (default <base>/tokenizer)")
    parser.add_argument("--data-dir", default=None, help="shard directory (default <base>/base_data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tokenizer in --output-dir even if checkpoints were trained with it")
    parser.add_argument("--allow-lossy", action="store_true",
                        help="import a tokenizer that does not give back the text it encodes (e.g. maps it to [UNK])")
    return parser.parse_args(argv)


class CountingIterator:
    """Wraps the document stream to count (and print, every 100M characters) what the trainer consumed."""
    report_every = 100_000_000

    def __init__(self, documents):
        self.documents = documents
        self.num_docs = 0
        self.num_chars = 0

    def __iter__(self):
        next_report = self.report_every
        for text in self.documents:
            self.num_docs += 1
            self.num_chars += len(text)
            if self.num_chars >= next_report:
                print(f"  read {self.num_docs:,} documents, {self.num_chars:,} characters", flush=True)
                next_report += self.report_every
            yield text


def training_documents(args):
    """Documents of the train split, capped per document and in total."""
    from nanochat import dataset
    files = dataset.list_parquet_files(args.data_dir)
    if not files:
        where = args.data_dir or os.path.join(get_base_dir(), "base_data")
        raise NanochatError(f"no data shards in {where}; run python -m nanochat.dataset --embedded (offline) "
                            f"or python -m nanochat.dataset -n N")
    return dataset.iter_documents("train", max_chars=args.max_chars, doc_cap=args.doc_cap, data_dir=args.data_dir)


def refuse_to_replace_a_tokenizer_in_use(output_dir):
    """The tokenizer in output_dir may be replaced only if no checkpoint in this base dir was trained with it."""
    manifest = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(manifest):
        return
    fingerprint = read_json(manifest, "tokenizer manifest").get("fingerprint")
    users = checkpoints_trained_with(fingerprint) if fingerprint else []
    if users:
        shown = ", ".join(os.path.relpath(u, get_base_dir()) for u in users[:4])
        shown += f" and {len(users) - 4} more" if len(users) > 4 else ""
        raise NanochatError(f"{output_dir} holds tokenizer {fingerprint[:16]}, which {len(users)} checkpoint(s) were "
                            f"trained with ({shown}); pass --overwrite to replace it anyway, or --output-dir to save "
                            f"the new one elsewhere")


def check_round_trip(tokenizer, args):
    """An imported tokenizer must decode the sample documents (or SAMPLE_TEXT) back to themselves."""
    from nanochat import dataset
    texts = [SAMPLE_TEXT]
    if len(dataset.list_parquet_files(args.data_dir)) >= 2:  # the last shard is validation
        texts += list(dataset.iter_documents("train", max_chars=200_000, doc_cap=2_000, data_dir=args.data_dir))
    failure = tokenizer.round_trip_failure(texts)
    if failure is None:
        print(f"round trip: {len(texts):,} sample texts decode back exactly", flush=True)
        return
    text, back = failure
    i = next((k for k, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    lossy = f"{text[max(0, i - 20):i + 20]!r} decodes back as {back[max(0, i - 20):i + 20]!r}"
    if not args.allow_lossy:
        raise NanochatError(f"the imported tokenizer is lossy: {lossy} (unknown text becomes [UNK], or it normalises); "
                            f"a model trained with it cannot write such text back. Pass --allow-lossy to import it "
                            f"anyway")
    print(f"warning: the imported tokenizer is lossy ({lossy}); imported anyway (--allow-lossy)", flush=True)


def main(argv=None):
    args = parse_args(argv)
    output_dir = args.output_dir or os.path.join(get_base_dir(), "tokenizer")
    kind = "hf" if args.tokenizer.startswith("hf:") else args.tokenizer
    if kind not in ("bpe", "char", "hf"):
        raise NanochatError(f"unknown --tokenizer {args.tokenizer!r}; use bpe, char or hf:PATH/tokenizer.json")
    if kind == "bpe" and args.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise NanochatError(f"--vocab-size {args.vocab_size} is too small: BPE needs 256 byte tokens "
                            f"+ {len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)} at least")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise NanochatError("--max-chars and --doc-cap must be positive")
    if not args.overwrite:
        refuse_to_replace_a_tokenizer_in_use(output_dir)  # before any training time is spent

    # -------------------------------------------------------------------------
    # Train (or import)
    t0 = time.time()
    documents = None
    if kind == "hf":
        path = args.tokenizer[len("hf:"):]
        print(f"importing Hugging Face tokenizer {path}", flush=True)
        tokenizer = HFTokenizer.from_file(path)
        check_round_trip(tokenizer, args)
    else:
        documents = CountingIterator(training_documents(args))
        print(f"training a {kind} tokenizer on up to {args.max_chars:,} characters "
              f"(documents capped at {args.doc_cap:,})" + (f", vocab {args.vocab_size:,}" if kind == "bpe" else ""),
              flush=True)
        if kind == "bpe":
            tokenizer = RustBPETokenizer.train_from_iterator(iter(documents), args.vocab_size)
        else:
            tokenizer = CharTokenizer.train_from_iterator(iter(documents))
        if documents.num_chars == 0:
            raise NanochatError("the training corpus is empty (no text in the train shards); "
                                "rebuild it with python -m nanochat.dataset --embedded")
    train_time = time.time() - t0
    if documents is not None:
        print(f"read {documents.num_docs:,} documents, {documents.num_chars:,} characters", flush=True)
    print(f"trained in {train_time:.2f}s ({format_duration(train_time)})", flush=True)
    if kind == "bpe" and tokenizer.get_vocab_size() < args.vocab_size:
        print(f"note: the corpus only supports {tokenizer.get_vocab_size():,} ids (asked for {args.vocab_size:,}): "
              f"nothing was left to merge", flush=True)

    # -------------------------------------------------------------------------
    # Save
    tokenizer.save(output_dir)
    print(f"saved {kind} tokenizer, vocab {tokenizer.get_vocab_size():,}, fingerprint {tokenizer.fingerprint[:16]} "
          f"to {output_dir}", flush=True)

    # -------------------------------------------------------------------------
    # Report card
    token_bytes = tokenizer.token_bytes()
    nonzero = [b for b in token_bytes if b > 0]
    try:
        from nanochat.report import get_report
    except ImportError:
        return 0
    get_report().log(section="Tokenizer training", data=[
        {"tokenizer": args.tokenizer, "vocab_size_requested": args.vocab_size, "max_chars": args.max_chars,
         "doc_cap": args.doc_cap, "output_dir": output_dir},
        {"kind": kind, "vocab_size": tokenizer.get_vocab_size(), "fingerprint": tokenizer.fingerprint,
         "train_time_s": round(train_time, 3),
         "num_docs": documents.num_docs if documents else None,
         "num_chars": documents.num_chars if documents else None},
        {"token_bytes_min": min(nonzero) if nonzero else 0, "token_bytes_max": max(nonzero) if nonzero else 0,
         "token_bytes_mean": round(sum(nonzero) / max(1, len(nonzero)), 3),
         "num_special_tokens": len(tokenizer.get_special_tokens())},
    ])
    return 0


if __name__ == "__main__":
    run_main(main)
