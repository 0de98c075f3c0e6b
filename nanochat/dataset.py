"""
The pretraining data: parquet shards of documents, and the ways to get them.

Layout: `<base>/base_data/shard_00000.parquet, shard_00001.parquet, ...`, each with one
`text` column split into several row groups. The last shard by sorted name is the
validation split; all the others are the training split.

Three ways to fill that directory, and one to encode it (`python -m nanochat.dataset --help`):

    python -m nanochat.dataset --embedded      # offline: ~30 MB of this Python's stdlib sources and docs
    python -m nanochat.dataset -n 8            # download FineWeb-Edu train shards 0..7 + the val shard (the last)
    HF_ENDPOINT=https://hf-mirror.example python -m nanochat.dataset -n 8   # the same through a hub mirror
    python -m nanochat.dataset --from-files a.txt b.jsonl c.parquet   # .txt: blank-line separated documents
    python -m nanochat.dataset --pretokenize   # token ids -> <base>/base_data_tok/<fingerprint[:16]>/

Downloads come from the hub dataset through huggingface_hub (resume, retries, HF_TOKEN, HF_ENDPOINT
for a mirror), or with `--base-url` from a plain URL folder through nanochat.download (resumable,
retried). They run in parallel, and a shard is renamed into place only after it reads back as
parquet with a `text` column. Converted and embedded corpora are written to a staging folder and moved in
only when complete, so a failure never leaves half a corpus behind.

Readers: `list_parquet_files`, `parquets_iter_batched` / `iter_row_groups` (row groups by rank,
numbered across files so a reader can resume), `iter_documents` (documents in order, for the
tokenizer trainer), and `load_pretokenized` (token shards, checked against the model's
tokenizer fingerprint and vocab size).
"""

import concurrent.futures
import contextlib
import itertools
import os
import random
import re
import shutil
import sys
import sysconfig
import threading
import time

from nanochat.common import (ArgumentParser, NanochatError, atomic_path, atomic_write_json, format_duration, get_base_dir,
                             iter_jsonl, read_json, read_utf8_text)
from nanochat.download import DownloadStopped, RetryableError, download_file

DEFAULT_REPO_ID = "karpathy/fineweb-edu-100b-shuffle"  # a hub dataset repo of shard_XXXXX.parquet files
DEFAULT_REVISION = "main"
DEFAULT_NUM_SHARDS_TOTAL = 1823  # shard_00000 .. shard_01822; the last one is the validation shard
SHARD_PREFIX = "shard_"
MANIFEST_NAME = "manifest.json"
HOW_TO_GET_DATA = "run `python -m nanochat.dataset --embedded` (offline) or `python -m nanochat.dataset -n N` (download)"


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


def _open_parquet(path):
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
        pf = _open_parquet(path)
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


# -----------------------------------------------------------------------------
# Writing shards (used by --embedded and --from-files)

def _make_readable(path):
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
        _make_readable(tmp)


def plan_shards(num_docs, docs_per_shard, val_fraction):
    """Split document indices into train shards and one validation shard (last).
    Returns a list of (start, stop, split)."""
    if num_docs < 2:
        raise NanochatError(f"need at least 2 documents (one for training, one for validation), got {num_docs}")
    if not 0.0 < val_fraction < 1.0:
        raise NanochatError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    num_val = min(num_docs - 1, max(1, round(num_docs * val_fraction)))
    num_train = num_docs - num_val
    plan = [(i, min(i + docs_per_shard, num_train), "train") for i in range(0, num_train, docs_per_shard)]
    plan.append((num_train, num_docs, "val"))
    return plan


def existing_shards_guard(data_dir, overwrite, what):
    """Refuse to mix a new corpus with shards already there: the last shard by name would no
    longer be this corpus's validation split."""
    if list_parquet_files(data_dir) and not overwrite:
        raise NanochatError(f"{data_dir} already holds shards; pass --overwrite to replace them with {what}, "
                            f"or choose another --data-dir")


def write_corpus(docs, data_dir, docs_per_shard, row_group_docs, val_fraction, manifest, overwrite):
    """Write `docs` as train shards + a last validation shard, replacing the directory's shards only
    once every new shard is complete (built in a staging folder, then moved in)."""
    existing_shards_guard(data_dir, overwrite, manifest["source"])
    if docs_per_shard < 1 or row_group_docs < 1:
        raise NanochatError("--docs-per-shard and --row-group-docs must be at least 1")
    plan = plan_shards(len(docs), docs_per_shard, val_fraction)
    os.makedirs(data_dir, exist_ok=True)
    staging = os.path.join(data_dir, f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        shards = []
        for index, (a, b, split) in enumerate(plan):
            name = shard_name(index)
            write_shard(os.path.join(staging, name), docs[a:b], row_group_docs)
            shards.append({"name": name, "split": split, "num_docs": b - a,
                           "num_chars": sum(len(d) for d in docs[a:b])})
        manifest = dict(manifest, num_docs=len(docs), num_chars=sum(s["num_chars"] for s in shards), shards=shards)
        atomic_write_json(os.path.join(staging, MANIFEST_NAME), manifest)
        _make_readable(os.path.join(staging, MANIFEST_NAME))
        # every new shard is complete: now swap the old corpus out and the new one in
        for old in list_parquet_files(data_dir):
            os.remove(old)
        for s in shards:
            os.replace(os.path.join(staging, s["name"]), os.path.join(data_dir, s["name"]))
        os.replace(os.path.join(staging, MANIFEST_NAME), os.path.join(data_dir, MANIFEST_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def print_corpus_summary(manifest, data_dir):
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    size = sum(os.path.getsize(os.path.join(data_dir, s["name"])) for s in manifest["shards"])
    print(f"wrote {len(manifest['shards'])} shards to {data_dir} ({size / 1e6:.1f} MB on disk): "
          f"{manifest['num_docs']:,} documents, {manifest['num_chars'] / 1e6:.1f}M characters; "
          f"train {len(train)} shards / {sum(s['num_chars'] for s in train) / 1e6:.1f}M chars, "
          f"val {len(val)} shard / {sum(s['num_chars'] for s in val) / 1e6:.2f}M chars", flush=True)


# -----------------------------------------------------------------------------
# The embedded offline corpus: the running interpreter's standard library

EMBEDDED_SEED = 1337
EMBEDDED_DOC_CHARS = 4000  # target document size when cutting long files into pieces
EMBEDDED_MIN_CHARS = 20_000_000
_DEF_LINE = re.compile(r"(?:    )?(?:async def|def|class) |(?:    )?@")  # top level or one indent (methods)


def _read_utf8(path):
    """The file's text with \\n line ends, or None if it is not UTF-8 (a few stdlib test files
    are deliberately in other encodings)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
        return None


def _looks_generated(text):
    """Machine-made files (codec tables, sysconfig dumps, data blobs) are not human writing."""
    head = text[:2000]
    if "gencodec.py" in head or "DO NOT EDIT" in head or "generated by" in head.lower():
        return True
    lines = text.split("\n")
    long_lines = sum(1 for line in lines if len(line) > 200)
    return long_lines > 0.05 * len(lines) or max(map(len, lines)) > 5000


def _join_pieces(pieces, target):
    """Greedily glue consecutive pieces into documents of about `target` characters."""
    docs, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > target:
            docs.append(current)
            current = ""
        current += piece
    if current.strip():
        docs.append(current)
    return docs


def split_python_source(text, target=EMBEDDED_DOC_CHARS):
    """Cut a module at def/class/decorator lines (top level or methods) that follow a blank line,
    then glue the pieces back into documents of about `target` characters. Joining the documents
    gives back the module exactly."""
    lines = text.split("\n")
    pieces, start = [], 0
    for i in range(1, len(lines)):
        if _DEF_LINE.match(lines[i]) and not lines[i - 1].strip():
            pieces.append("\n".join(lines[start:i]) + "\n")
            start = i
    pieces.append("\n".join(lines[start:]))
    return _join_pieces(pieces, target)


def split_paragraphs(text, target=EMBEDDED_DOC_CHARS):
    """Cut prose at blank lines, then glue paragraphs into documents of about `target` characters."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return _join_pieces([p.strip("\n") + "\n\n" for p in paragraphs], target)


def _walk_sorted(root, skip_dirs=("site-packages", "dist-packages", "__pycache__")):
    """(relative path, absolute path) of every file under root, in a fixed order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            yield os.path.relpath(path, root).replace(os.sep, "/"), path


def collect_embedded_documents(min_chars=EMBEDDED_MIN_CHARS):
    """Documents from the standard library of the running Python: module sources cut into
    def/class-sized pieces, the pydoc topics (the language reference prose), and the stdlib's
    text files. If that is under `min_chars` (distributions that leave out Lib/test), the
    interpreter's own site-packages (pip, setuptools, ...) top it up. Returns (docs, sources)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, sources = [], {}

    def add(source, new_docs):
        docs.extend(d for d in new_docs if d.strip())
        sources[source] = sources.get(source, 0) + sum(len(d) for d in new_docs)

    # 1. Python sources of the standard library (the topics module is taken as prose below)
    skip = {"pydoc_data/topics.py", "this.py"}  # this.py is the Zen of Python in rot13
    for rel, path in _walk_sorted(stdlib):
        if not rel.endswith(".py") or rel in skip or rel.startswith("_sysconfigdata"):
            continue
        text = _read_utf8(path)
        if not text or not text.strip() or _looks_generated(text):
            continue
        add("stdlib_py", [f"# Lib/{rel}\n{d}" for d in split_python_source(text)])

    # 2. The pydoc topics: the language reference as plain text, one document per topic
    from pydoc_data.topics import topics
    for key in sorted(topics):
        add("pydoc_topics", split_paragraphs(topics[key]))

    # 3. Text files that ship with the stdlib (license, idle help, grammar notes, ...)
    for rel, path in _walk_sorted(stdlib):
        if rel.startswith("test/") or "/test/" in rel or not rel.endswith((".txt", ".rst")):
            continue
        text = _read_utf8(path)
        if text and text.strip() and not _looks_generated(text):
            add("stdlib_text", split_paragraphs(text))

    # 4. Top-up from the base interpreter's own packages when the stdlib alone is too small
    if sum(sources.values()) < min_chars:
        purelib = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
        for rel, path in _walk_sorted(purelib, skip_dirs=("__pycache__",)):
            if sum(sources.values()) >= min_chars:
                break
            if not rel.endswith(".py") or "/_vendor/" in rel:
                continue
            text = _read_utf8(path)
            if text and text.strip() and not _looks_generated(text):
                add("site_packages_py", [f"# {rel}\n{d}" for d in split_python_source(text)])
    return docs, sources


def build_embedded(data_dir, overwrite=False, docs_per_shard=2000, row_group_docs=128, val_fraction=0.03):
    """Build the embedded corpus into data_dir. Same interpreter -> same documents, same shards."""
    manifest_path = os.path.join(data_dir, MANIFEST_NAME)
    python_version = sys.version.split()[0]
    if os.path.exists(manifest_path) and list_parquet_files(data_dir) and not overwrite:
        old = read_json(manifest_path, "shard manifest")
        names = [os.path.basename(p) for p in list_parquet_files(data_dir)]
        if (old.get("source") == "embedded" and old.get("python_version") == python_version
                and names == [s["name"] for s in old.get("shards", [])]):
            print(f"embedded corpus already built in {data_dir} (Python {python_version}); nothing to do", flush=True)
            return old
        if old.get("source") == "embedded":
            overwrite = True  # an older embedded build (another Python): just rebuild it
    existing_shards_guard(data_dir, overwrite, "the embedded corpus")  # fail before the work
    t0 = time.time()
    docs, sources = collect_embedded_documents()
    random.Random(EMBEDDED_SEED).shuffle(docs)
    manifest = {"source": "embedded", "python_version": python_version,
                "sources_chars": dict(sorted(sources.items()))}
    manifest = write_corpus(docs, data_dir, docs_per_shard, row_group_docs, val_fraction, manifest, overwrite)
    print_corpus_summary(manifest, data_dir)
    print("sources: " + ", ".join(f"{k} {v / 1e6:.1f}M chars" for k, v in manifest["sources_chars"].items())
          + f"; took {time.time() - t0:.1f}s", flush=True)
    if manifest["num_chars"] < EMBEDDED_MIN_CHARS:
        print(f"note: only {manifest['num_chars'] / 1e6:.1f}M characters found (goal {EMBEDDED_MIN_CHARS / 1e6:.0f}M); "
              f"this Python ships a small standard library", flush=True)
    return manifest


# -----------------------------------------------------------------------------
# Custom corpora: local text / JSONL / parquet files -> shards

def read_documents_from_file(path, text_field="text", txt_split="paragraph"):
    """Documents of one input file, by extension:
    .txt/.md: one document per blank-line-separated block (txt_split='paragraph'), per file ('file')
              or per line ('line');
    .jsonl:   one JSON object per line, the document is its `text_field`;
    .parquet: the `text_field` column."""
    if not os.path.isfile(path):
        raise NanochatError(f"input file not found: {path}")
    if os.path.getsize(path) == 0:
        raise NanochatError(f"input file is empty: {path}; remove it from --from-files")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq
        pf = _open_parquet(path)
        if text_field not in pf.schema_arrow.names:
            raise NanochatError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                f"pass --text-field")
        docs = [d for d in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist() if d]
    elif ext in (".jsonl", ".ndjson"):
        docs = []
        for lineno, obj in iter_jsonl(path):
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise NanochatError(f"{path}:{lineno} has no string field {text_field!r}; pass --text-field")
            if obj[text_field]:
                docs.append(obj[text_field])
    elif ext in (".txt", ".md", ".text", ".rst"):
        text = read_utf8_text(path).replace("\r\n", "\n")
        if txt_split == "file":
            docs = [text]
        elif txt_split == "line":
            docs = text.split("\n")
        else:
            docs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
        docs = [d for d in docs if d.strip()]
    else:
        raise NanochatError(f"don't know how to read {path}; use .txt/.md, .jsonl or .parquet files")
    if not docs:
        raise NanochatError(f"input file has no documents: {path}")
    return docs


def build_from_files(paths, data_dir, text_field="text", txt_split="paragraph", docs_per_shard=8192,
                     row_group_docs=512, val_fraction=0.05, shuffle=True, seed=EMBEDDED_SEED, overwrite=False):
    existing_shards_guard(data_dir, overwrite, "the converted files")  # fail before reading anything
    docs = []
    for path in paths:
        docs.extend(read_documents_from_file(path, text_field, txt_split))
    if shuffle:
        random.Random(seed).shuffle(docs)
    manifest = {"source": "files", "inputs": [os.path.abspath(p) for p in paths], "shuffled": shuffle}
    manifest = write_corpus(docs, data_dir, docs_per_shard, row_group_docs, val_fraction, manifest, overwrite)
    print_corpus_summary(manifest, data_dir)
    return manifest


# -----------------------------------------------------------------------------
# Downloading shards: parallel, retried with backoff, resumed, checked before renaming

class Progress:
    """One status line: shards done/total, download speed, ETA. On a terminal it redraws in place
    (also between shards, see tick); in a log it prints one line per finished shard."""

    def __init__(self, total, already_done):
        self.total, self.done, self.bytes = total, already_done, 0
        self.start_done, self.t0 = already_done, time.time()
        self.lock = threading.Lock()
        self.tty = sys.stdout.isatty()

    def add_bytes(self, n):
        with self.lock:
            self.bytes += n

    def _line(self, name):
        elapsed = max(time.time() - self.t0, 1e-6)
        fetched = self.done - self.start_done
        eta = f"ETA {format_duration(elapsed / fetched * (self.total - self.done))}" if fetched else "ETA ?"
        return f"[{self.done}/{self.total} shards] {name} | {self.bytes / 1e6 / elapsed:.1f} MB/s | {eta}"

    def _show(self, line):
        print(("\r" + line.ljust(80)) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def shard_done(self, name):
        with self.lock:
            self.done += 1
            self._show(self._line(name))

    def tick(self):
        if self.tty:
            with self.lock:
                self._show(self._line("downloading"))

    def finish(self):
        if self.tty:
            print(flush=True)


def check_parquet_shard(path):
    """Raise RetryableError unless `path` is a parquet file with a readable `text` column."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise RetryableError(f"no 'text' column (columns: {pf.schema_arrow.names})")
        for i in range(pf.num_row_groups):  # decode every page (damage in the middle too), one group at a time
            pf.read_row_group(i, columns=["text"])
    except RetryableError:
        raise
    except Exception as e:
        raise RetryableError(f"not a readable parquet file ({e.__class__.__name__}: {str(e)[:100]})") from None


def download_shard_url(index, base_url, data_dir, retries, backoff, timeout, progress, stop):
    """One shard from a plain URL folder (`--base-url`), with the shared resumable downloader."""
    name = shard_name(index)
    download_file(f"{base_url.rstrip('/')}/{name}", os.path.join(data_dir, name), check=check_parquet_shard,
                  retries=retries, backoff=backoff, timeout=timeout, on_bytes=progress.add_bytes, stop=stop,
                  hint="check --base-url and --num-shards-total")
    progress.shard_done(name)


def download_shard_hub(index, repo_id, revision, data_dir, retries, backoff, timeout, progress, stop):
    """One shard from a hub dataset repo via huggingface_hub (resume, retries, HF_TOKEN, HF_ENDPOINT mirrors,
    its faster transfer backends). It lands in <data_dir>/.hub/ (huggingface_hub's own bookkeeping and
    .incomplete files live there too) and moves to its shard name only once it reads back as parquet."""
    import huggingface_hub
    from huggingface_hub import errors
    missing = (getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError),  # older hubs: one class
               errors.RepositoryNotFoundError, errors.RevisionNotFoundError)
    name = shard_name(index)
    staging = os.path.join(data_dir, ".hub")
    last_error = None
    for attempt in range(retries + 1):
        if attempt and stop.wait(backoff * 2 ** (attempt - 1)):
            raise DownloadStopped()
        try:
            path = huggingface_hub.hf_hub_download(repo_id, name, repo_type="dataset", revision=revision,
                                                   local_dir=staging, etag_timeout=timeout, force_download=attempt > 0)
            try:
                check_parquet_shard(path)
            except RetryableError:
                os.remove(path)  # corrupt bytes: fetch it again from scratch
                raise
            size = os.path.getsize(path)
            os.replace(path, os.path.join(data_dir, name))
            progress.add_bytes(size)
            progress.shard_done(name)
            return
        except missing as e:  # (a gated repo without HF_TOKEN is a RepositoryNotFoundError too)
            raise NanochatError(f"the hub has no {name} in dataset {repo_id}@{revision} ({e.__class__.__name__}); "
                                f"check --repo-id, --num-shards-total, HF_TOKEN and HF_ENDPOINT") from None
        except RetryableError as e:
            last_error = str(e)
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise NanochatError(f"disk full while downloading {name}; free some space and run again") from None
            last_error = f"{e.__class__.__name__}: {str(e)[:200]}"
        except Exception as e:  # huggingface_hub's HTTP and connection errors: worth another try
            last_error = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    raise NanochatError(f"could not download {name} from {repo_id} after {retries + 1} attempts (last: {last_error}); "
                        f"run the same command again to resume")


def shards_to_download(num_shards, num_shards_total):
    """-n N: the first N training shards plus the validation shard (the last of the full set), so a
    run always has validation data. -n -1: every shard."""
    if num_shards_total < 2:
        raise NanochatError("--num-shards-total must be at least 2 (train shards + the validation shard)")
    num_train = num_shards_total - 1
    if num_shards == -1 or num_shards >= num_train:
        return list(range(num_shards_total))
    if num_shards < 1:
        raise NanochatError(f"-n must be a positive number of shards (or -1 for all), got {num_shards}")
    return list(range(num_shards)) + [num_shards_total - 1]


def download(num_shards, data_dir, repo_id=DEFAULT_REPO_ID, revision=DEFAULT_REVISION, base_url=None,
             num_shards_total=DEFAULT_NUM_SHARDS_TOTAL, workers=4, retries=5, backoff=2.0, timeout=60.0,
             overwrite=False):
    """Shards from the hub dataset `repo_id` (via huggingface_hub), or from a plain URL folder if `base_url`."""
    indices = shards_to_download(num_shards, num_shards_total)
    if base_url:
        source = {"source": "download", "base_url": base_url.rstrip("/"), "num_shards_total": num_shards_total}
        fetch, where = download_shard_url, (base_url,)
    else:
        source = {"source": "download", "repo_id": repo_id, "num_shards_total": num_shards_total}
        fetch, where = download_shard_hub, (repo_id, revision)
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()  # our one progress line instead of a bar per worker
    guard_download_target(data_dir, source, overwrite)
    os.makedirs(data_dir, exist_ok=True)
    todo = [i for i in indices if not os.path.exists(os.path.join(data_dir, shard_name(i)))]
    print(f"{len(indices)} shards wanted ({len(indices) - 1} train + val), {len(indices) - len(todo)} already here, "
          f"downloading {len(todo)} to {data_dir} with {workers} workers", flush=True)
    progress = Progress(len(indices), len(indices) - len(todo))
    failures, stop = [], threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(fetch, i, *where, data_dir, retries, backoff, timeout, progress, stop) for i in todo]
        pending = set(futures)
        while pending:  # wake up every second to redraw the progress line
            _, pending = concurrent.futures.wait(pending, timeout=1.0)
            progress.tick()
        for future in futures:
            try:
                future.result()
            except NanochatError as e:
                failures.append(str(e))
    except KeyboardInterrupt:
        stop.set()  # workers stop at their next chunk; their .partial files resume next time
        print("\nstopping: partial downloads are kept and resume when you run the command again", flush=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    progress.finish()
    present = sorted(os.path.basename(p) for p in list_parquet_files(data_dir))
    atomic_write_json(os.path.join(data_dir, MANIFEST_NAME), dict(source, shards=present))
    _make_readable(os.path.join(data_dir, MANIFEST_NAME))
    if failures:
        more = f" (and {len(failures) - 1} more shards failed)" if len(failures) > 1 else ""
        raise NanochatError(failures[0] + more)
    print(f"done: {len(indices)} shards in {data_dir}", flush=True)


def guard_download_target(data_dir, source, overwrite):
    """Downloaded shards share names with embedded/converted ones (shard_00000.parquet ...), so
    downloading into a directory that holds another corpus would silently keep its files. Refuse,
    or with --overwrite clear that corpus first."""
    manifest_path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        return  # nothing there, or shards from before manifests: nothing to compare against
    old = read_json(manifest_path, "shard manifest")
    same = all(old.get(k) == v for k, v in source.items())
    if same:
        return
    what = old.get("source") if old.get("source") != "download" else \
        f"download from {old.get('repo_id') or old.get('base_url')}"
    if not overwrite:
        raise NanochatError(f"{data_dir} holds another corpus ({what}); pass --overwrite to replace it, "
                            f"or choose another --data-dir")
    for path in list_parquet_files(data_dir) + [manifest_path]:
        os.remove(path)


# -----------------------------------------------------------------------------
# Pre-tokenized shards: token ids on disk, tied to one tokenizer by its fingerprint

PRETOK_META = "meta.json"
# tokens sampled per check when verifying a file's recorded max_id against its data
_VERIFY_BLOCK = 1 << 16
_VERIFY_BLOCKS = 8


def pretokenized_dir(fingerprint, base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "base_data_tok", fingerprint[:16])


def token_dtype(vocab_size):
    return "uint16" if vocab_size < 65536 else "uint32"


def pretokenize(tokenizer, data_dir=None, out_dir=None, overwrite=False):
    """Encode every shard (each document prefixed with BOS) into train_XXXXX.bin / val_00000.bin
    and write meta.json last; meta.json's presence means the directory is complete."""
    import numpy as np
    data_dir = data_dir or default_data_dir()
    fingerprint = tokenizer.fingerprint
    out_dir = out_dir or pretokenized_dir(fingerprint)
    meta_path = os.path.join(out_dir, PRETOK_META)
    groups = [("train", split_files("train", data_dir)), ("val", split_files("val", data_dir))]
    sources = [(os.path.basename(p), os.path.getsize(p)) for _, paths in groups for p in paths]
    if os.path.exists(meta_path) and not overwrite:
        meta = read_json(meta_path, "pre-tokenized shard metadata")
        done = [(f.get("source"), f.get("source_bytes")) for f in meta.get("files", [])]
        if meta.get("fingerprint") == fingerprint and done == sources:
            print(f"already pre-tokenized in {out_dir}; pass --overwrite to redo it", flush=True)
            return out_dir
    vocab_size = tokenizer.get_vocab_size()
    bos = tokenizer.get_bos_token_id()
    dtype = token_dtype(vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(meta_path)  # the directory is incomplete until the new meta.json lands
    files, t0 = [], time.time()
    for split, paths in groups:
        for k, path in enumerate(paths):
            name = f"{split}_{k:05d}.bin"
            num_tokens, max_id = 0, -1
            with atomic_path(os.path.join(out_dir, name)) as tmp, open(tmp, "wb") as f:
                for texts in _iter_file_row_groups(path):
                    ids = tokenizer.encode(texts, prepend=bos)
                    if not ids:
                        continue
                    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                                       count=sum(map(len, ids)))
                    if flat.size:
                        if flat.min() < 0 or flat.max() >= vocab_size:
                            raise NanochatError(f"tokenizer produced id {int(flat.max())} outside its vocab of "
                                                f"{vocab_size}; the tokenizer is broken, retrain it")
                        max_id = max(max_id, int(flat.max()))
                        f.write(flat.astype(dtype).tobytes())
                        num_tokens += flat.size
                _make_readable(tmp)
            files.append({"name": name, "split": split, "source": os.path.basename(path),
                          "source_bytes": os.path.getsize(path), "num_tokens": num_tokens, "max_id": max_id})
            print(f"{name}: {num_tokens:,} tokens from {os.path.basename(path)} "
                  f"({time.time() - t0:.1f}s so far)", flush=True)
    meta = {"fingerprint": fingerprint, "vocab_size": vocab_size, "dtype": dtype, "bos_id": bos,
            "data_dir": os.path.abspath(data_dir), "files": files}
    atomic_write_json(meta_path, meta)
    _make_readable(meta_path)
    print(f"pre-tokenized {sum(f['num_tokens'] for f in files):,} tokens ({dtype}) into {out_dir}", flush=True)
    return out_dir


def _iter_file_row_groups(path):
    pf = _open_parquet(path)
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def load_pretokenized(directory, expected_fingerprint, model_vocab_size, split="train"):
    """Memory-mapped token arrays of one split, after checking that they were made by the
    expected tokenizer and that every id fits the model's vocab. Raises NanochatError otherwise."""
    import numpy as np
    meta_path = os.path.join(directory, PRETOK_META)
    if not os.path.exists(meta_path):
        raise NanochatError(f"no pre-tokenized shards in {directory} (meta.json missing); "
                            f"run `python -m nanochat.dataset --pretokenize`")
    meta = read_json(meta_path, "pre-tokenized shard metadata")
    if meta.get("fingerprint") != expected_fingerprint:
        raise NanochatError(f"pre-tokenized shards in {directory} were made by tokenizer {meta.get('fingerprint')} "
                            f"but the model uses tokenizer {expected_fingerprint}; run "
                            f"`python -m nanochat.dataset --pretokenize` with the model's tokenizer")
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise NanochatError(f"{meta_path} has unknown dtype {dtype!r}; delete {directory} and pre-tokenize again")
    arrays = []
    for entry in meta["files"]:
        if entry.get("split") != split:
            continue
        path = os.path.join(directory, entry["name"])
        if entry["max_id"] >= model_vocab_size:
            raise NanochatError(f"{path} holds token id {entry['max_id']} but the model's vocab size is "
                                f"{model_vocab_size}; the model and the data disagree on the tokenizer")
        itemsize = np.dtype(dtype).itemsize
        if not os.path.exists(path) or os.path.getsize(path) != entry["num_tokens"] * itemsize:
            raise NanochatError(f"{path} is missing or not {entry['num_tokens']} tokens long; "
                                f"delete {directory} and pre-tokenize again")
        if entry["num_tokens"] == 0:
            continue
        tokens = np.memmap(path, dtype=dtype, mode="r")
        _verify_tokens(tokens, entry, meta, path, model_vocab_size)
        arrays.append(tokens)
    if not arrays:
        raise NanochatError(f"no {split} tokens in {directory}; pre-tokenize again")
    return arrays


def _verify_tokens(tokens, entry, meta, path, model_vocab_size):
    """Cheap spot check that the bytes match the metadata: a few blocks spread over the file must
    not hold ids above the recorded max_id, and the file must start with BOS."""
    n = len(tokens)
    starts = sorted({min(n - 1, (n * k) // _VERIFY_BLOCKS) for k in range(_VERIFY_BLOCKS)} | {max(0, n - _VERIFY_BLOCK)})
    seen = max(int(tokens[s:s + _VERIFY_BLOCK].max()) for s in starts)
    limit = min(entry["max_id"], model_vocab_size - 1)
    if seen > limit:
        raise NanochatError(f"{path} holds token id {seen}, above its recorded max id {entry['max_id']} "
                            f"(model vocab {model_vocab_size}); the file is corrupt: delete it and pre-tokenize again")
    if "bos_id" in meta and int(tokens[0]) != meta["bos_id"]:
        raise NanochatError(f"{path} does not start with BOS ({meta['bos_id']}); delete it and pre-tokenize again")


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
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
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID,
                        help="hub dataset repo of the shards (set HF_ENDPOINT for a mirror)")
    parser.add_argument("--revision", default=DEFAULT_REVISION, help="branch, tag or commit of --repo-id")
    parser.add_argument("--base-url", default=None,
                        help="instead of the hub: a plain URL folder with shard_XXXXX.parquet")
    parser.add_argument("--num-shards-total", type=int, default=DEFAULT_NUM_SHARDS_TOTAL,
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
    parser.add_argument("--val-fraction", type=float, default=None, help="fraction of documents in the validation shard")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order of documents (--from-files)")
    # pre-tokenizing
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer to encode with (default: <base>/tokenizer)")
    parser.add_argument("--out-dir", default=None, help="pre-tokenized output (default: <base>/base_data_tok/<fp16>)")
    args = parser.parse_args(argv)

    data_dir = args.data_dir or default_data_dir()
    sizes = {k: v for k, v in (("docs_per_shard", args.docs_per_shard), ("row_group_docs", args.row_group_docs),
                               ("val_fraction", args.val_fraction)) if v is not None}
    if args.embedded:
        build_embedded(data_dir, overwrite=args.overwrite, **sizes)
    elif args.from_files:
        build_from_files(args.from_files, data_dir, text_field=args.text_field, txt_split=args.txt_split,
                         shuffle=not args.no_shuffle, overwrite=args.overwrite, **sizes)
    elif args.num_shards is not None:
        if args.retries < 0 or args.backoff < 0 or args.workers < 1:
            raise NanochatError("--retries and --backoff must be >= 0 and --workers >= 1")
        download(args.num_shards, data_dir, repo_id=args.repo_id, revision=args.revision, base_url=args.base_url,
                 num_shards_total=args.num_shards_total,
                 workers=args.workers, retries=args.retries, backoff=args.backoff, timeout=args.timeout,
                 overwrite=args.overwrite)
    elif args.pretokenize:
        from nanochat.tokenizer import get_tokenizer, load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
        pretokenize(tokenizer, data_dir, args.out_dir, overwrite=args.overwrite)
    else:
        raise NanochatError("nothing to do: pass --embedded, -n N, --from-files FILE..., or --pretokenize (see --help)")
    return 0


if __name__ == "__main__":
    from nanochat.common import run_main
    run_main(main)
