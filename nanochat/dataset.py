"""
The pretraining data: parquet shards of documents, where they live and how they are read.

Layout: `<base>/base_data/shard_00000.parquet, shard_00001.parquet, ...`, each with one
`text` column split into several row groups. The last shard by sorted name is the
validation split; all the others are the training split. A `manifest.json` next to the
shards says where they came from.

Readers: `list_parquet_files`, `parquets_iter_batched` / `iter_row_groups` (row groups by rank,
numbered across files so a reader can resume), `iter_documents` (documents in order, for the
tokenizer trainer). `write_shard` writes one shard atomically.

This module is also the one command line for the data (`python -m nanochat.dataset --help`);
each way of filling the directory lives in its own module:

    python -m nanochat.dataset --embedded      # nanochat.corpus: ~30 MB of this Python's stdlib sources and docs
    python -m nanochat.dataset --from-files a.txt b.jsonl c.parquet   # nanochat.corpus: .txt, .jsonl, .parquet
    python -m nanochat.dataset -n 8            # nanochat.shard_download: FineWeb-Edu train shards 0..7 + val
    HF_ENDPOINT=https://hf-mirror.example python -m nanochat.dataset -n 8   # the same through a hub mirror
    python -m nanochat.dataset --pretokenize   # nanochat.pretokenized: token ids -> <base>/base_data_tok/<fp[:16]>/
"""

import os

from nanochat.common import ArgumentParser, NanochatError, atomic_path, get_base_dir

SHARD_PREFIX = "shard_"
MANIFEST_NAME = "manifest.json"
HOW_TO_GET_DATA = ("run `python -m nanochat.dataset --embedded` (offline) "
                   "or `python -m nanochat.dataset -n N` (download)")


def shard_name(index):
    return f"{SHARD_PREFIX}{index:05d}.parquet"


def default_data_dir():
    return os.path.join(get_base_dir(), "base_data")


# -----------------------------------------------------------------------------
# Reading shards

def list_parquet_files(data_dir=None):
    """All shard paths in `data_dir` (default <base>/base_data), sorted by name.
    Temp files (leading dot) and unfinished downloads (.partial) are not shards."""
    data_dir = data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def split_files(split, data_dir=None):
    """The shard paths of one split: 'val' is the last shard, 'train' all the others."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    data_dir = data_dir or default_data_dir()
    files = list_parquet_files(data_dir)
    if not files:
        raise NanochatError(f"no parquet shards in {data_dir}; {HOW_TO_GET_DATA}")
    if split == "val":
        return files[-1:]
    if len(files) == 1:
        raise NanochatError(f"only one shard in {data_dir} and the last shard is the validation split, so there is "
                            f"no training data; add shards ({HOW_TO_GET_DATA})")
    return files[:-1]


def open_parquet(path):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with long messages
        raise NanochatError(f"shard {path} is not a readable parquet file ({e.__class__.__name__}); "
                            f"delete it and fetch or build it again") from None


def iter_row_groups(split, start=0, step=1, data_dir=None):
    """Yield (index, texts) for row groups start, start+step, ... of a split, where `index`
    numbers the split's row groups consecutively across its files (file 0's row groups first).
    A reader that has consumed row group i resumes exactly with start=i+step, same step."""
    if step < 1 or start < 0:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start} step={step}")
    offset = 0  # global index of the current file's first row group
    for path in split_files(split, data_dir):
        pf = open_parquet(path)
        n = pf.num_row_groups
        # first global index >= max(start, offset) that is congruent to start modulo step
        first = start if start >= offset else start + -(-(offset - start) // step) * step
        for g in range(first, offset + n, step):
            table = pf.read_row_group(g - offset, columns=["text"])
            yield g, table.column("text").to_pylist()
        offset += n


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield one list of texts per row group; row groups start, start+step, ... across the
    split's files (rank r of w uses start=r, step=w)."""
    for _, texts in iter_row_groups(split, start, step, data_dir):
        yield texts


def iter_documents(split, max_chars=None, doc_cap=None, data_dir=None):
    """Documents of a split in order, each cut to `doc_cap` characters; stops once
    `max_chars` characters in total have been yielded (the last document is cut to fit)."""
    total = 0
    for texts in parquets_iter_batched(split, data_dir=data_dir):
        for text in texts:
            if doc_cap is not None and len(text) > doc_cap:
                text = text[:doc_cap]
            if max_chars is not None and total + len(text) >= max_chars:
                yield text[:max_chars - total]
                return
            total += len(text)
            yield text


def iter_file_row_groups(path):
    """The texts of one shard file, one list per row group."""
    pf = open_parquet(path)
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


# -----------------------------------------------------------------------------
# Writing a shard (corpus building)

def make_readable(path):
    """atomic_path's temp files are private (0600); shards and metadata are meant to be shared."""
    os.chmod(path, 0o644)


def write_shard(path, docs, row_group_docs):
    """Write one shard atomically: `docs` in row groups of `row_group_docs` documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("text", pa.string())])
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for i in range(0, len(docs), row_group_docs):
                chunk = docs[i:i + row_group_docs]
                writer.write_table(pa.table({"text": chunk}, schema=schema), row_group_size=len(chunk))
        make_readable(tmp)


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    from nanochat import corpus, pretokenized, shard_download  # they build on this module's layout
    parser = ArgumentParser(
        prog="python -m nanochat.dataset",
        description="Fill <base>/base_data with parquet shards of documents (last shard = validation): "
                    "download FineWeb-Edu (-n N), build the offline corpus (--embedded), convert local files "
                    "(--from-files), or encode the shards with the trained tokenizer (--pretokenize).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-n", "--num-shards", type=int, default=None,
                      help="download the first N training shards plus the validation shard (-1: all)")
    mode.add_argument("--embedded", action="store_true",
                      help="build the offline corpus from this Python's standard library (no network)")
    mode.add_argument("--from-files", nargs="+", metavar="FILE",
                      help="convert .txt/.md (blank-line separated documents), .jsonl or .parquet files")
    mode.add_argument("--pretokenize", action="store_true",
                      help="encode all shards with the trained tokenizer into <base>/base_data_tok/<fingerprint>/")
    parser.add_argument("--data-dir", default=None, help="shard directory (default: <base>/base_data)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards / pre-tokenized files already there")
    # downloading
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--repo-id", default=shard_download.DEFAULT_REPO_ID,
                        help="hub dataset repo of the shards (set HF_ENDPOINT for a mirror)")
    parser.add_argument("--revision", default=shard_download.DEFAULT_REVISION,
                        help="branch, tag or commit of --repo-id")
    parser.add_argument("--base-url", default=None,
                        help="instead of the hub: a plain URL folder with shard_XXXXX.parquet")
    parser.add_argument("--num-shards-total", type=int, default=shard_download.DEFAULT_NUM_SHARDS_TOTAL,
                        help="shards in the remote set; the last is the validation shard")
    parser.add_argument("--retries", type=int, default=5, help="retries per shard")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles each time)")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    # converting
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    parser.add_argument("--txt-split", choices=["paragraph", "file", "line"], default="paragraph",
                        help="how .txt files become documents: blank-line separated blocks, whole file, or lines")
    parser.add_argument("--docs-per-shard", type=int, default=None, help="documents per training shard")
    parser.add_argument("--row-group-docs", type=int, default=None, help="documents per parquet row group")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="fraction of documents in the validation shard")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order of documents (--from-files)")
    # pre-tokenizing
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer to encode with (default: <base>/tokenizer)")
    parser.add_argument("--out-dir", default=None, help="pre-tokenized output (default: <base>/base_data_tok/<fp16>)")
    args = parser.parse_args(argv)

    data_dir = args.data_dir or default_data_dir()
    sizes = {k: v for k, v in (("docs_per_shard", args.docs_per_shard), ("row_group_docs", args.row_group_docs),
                               ("val_fraction", args.val_fraction)) if v is not None}
    if args.embedded:
        corpus.build_embedded(data_dir, overwrite=args.overwrite, **sizes)
    elif args.from_files:
        corpus.build_from_files(args.from_files, data_dir, text_field=args.text_field, txt_split=args.txt_split,
                         shuffle=not args.no_shuffle, overwrite=args.overwrite, **sizes)
    elif args.num_shards is not None:
        if args.retries < 0 or args.backoff < 0 or args.workers < 1:
            raise NanochatError("--retries and --backoff must be >= 0 and --workers >= 1")
        shard_download.download(args.num_shards, data_dir, repo_id=args.repo_id, revision=args.revision,
                                base_url=args.base_url, num_shards_total=args.num_shards_total,
                                workers=args.workers, retries=args.retries, backoff=args.backoff,
                                timeout=args.timeout, overwrite=args.overwrite)
    elif args.pretokenize:
        from nanochat.tokenizer import get_tokenizer, load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
        pretokenized.pretokenize(tokenizer, data_dir, args.out_dir, overwrite=args.overwrite)
    else:
        raise NanochatError("nothing to do: pass --embedded, -n N, --from-files FILE..., or --pretokenize (see --help)")
    return 0


if __name__ == "__main__":
    from nanochat.common import run_main
    run_main(main)
