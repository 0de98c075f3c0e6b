"""
Building a corpus of shards from documents we have here: the embedded offline corpus (this Python's
standard library) and local files (.txt/.md, .jsonl, .parquet). Run through the data command line:

    python -m nanochat.dataset --embedded                              # build_embedded
    python -m nanochat.dataset --from-files a.txt b.jsonl c.parquet    # build_from_files

Documents are shuffled with a fixed seed, cut into train shards plus one last validation shard, written
to a staging folder and moved in only when every shard is complete, so a failure never leaves half a
corpus behind and the corpus already there is replaced only by a finished one.
"""

import os
import random
import re
import shutil
import sys
import sysconfig
import time

from nanochat.common import NanochatError, atomic_write_json, iter_jsonl, read_json, read_utf8_text
from nanochat.dataset import MANIFEST_NAME, list_parquet_files, make_readable, open_parquet, shard_name, write_shard
from nanochat.progress import progress


# -----------------------------------------------------------------------------
# Writing a corpus: train shards + the last validation shard

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
        for index, (a, b, split) in enumerate(progress(plan, desc="writing shards", unit="shard", stream=sys.stdout)):
            name = shard_name(index)
            write_shard(os.path.join(staging, name), docs[a:b], row_group_docs)
            shards.append({"name": name, "split": split, "num_docs": b - a,
                           "num_chars": sum(len(d) for d in docs[a:b])})
        manifest = dict(manifest, num_docs=len(docs), num_chars=sum(s["num_chars"] for s in shards), shards=shards)
        atomic_write_json(os.path.join(staging, MANIFEST_NAME), manifest)
        make_readable(os.path.join(staging, MANIFEST_NAME))
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
        pf = open_parquet(path)
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
    for path in progress(paths, desc="reading files", unit="file", stream=sys.stdout):
        docs.extend(read_documents_from_file(path, text_field, txt_split))
    if shuffle:
        random.Random(seed).shuffle(docs)
    manifest = {"source": "files", "inputs": [os.path.abspath(p) for p in paths], "shuffled": shuffle}
    manifest = write_corpus(docs, data_dir, docs_per_shard, row_group_docs, val_fraction, manifest, overwrite)
    print_corpus_summary(manifest, data_dir)
    return manifest

