"""
Downloading pretraining shards: `python -m nanochat.dataset -n N` (see nanochat.dataset for the layout).

Shards come from a hub dataset repo through huggingface_hub (resume, retries, HF_TOKEN, HF_ENDPOINT
for a mirror), or with `--base-url` from a plain URL folder through nanochat.download (resumable,
retried). They run in parallel, and a shard is renamed into place only after it reads back as
parquet with a `text` column; a run that stops keeps its partial downloads and the next one resumes them.
"""

import concurrent.futures
import os
import sys
import threading
import time

from nanochat.common import NanochatError, atomic_write_json, read_json
from nanochat.dataset import MANIFEST_NAME, list_parquet_files, make_readable, shard_name
from nanochat.download import DownloadStopped, RetryableError, download_file
from nanochat.progress import is_interactive, progress

DEFAULT_REPO_ID = "karpathy/fineweb-edu-100b-shuffle"  # a hub dataset repo of shard_XXXXX.parquet files
DEFAULT_REVISION = "main"
DEFAULT_NUM_SHARDS_TOTAL = 1823  # shard_00000 .. shard_01822; the last one is the validation shard


class ShardProgress:
    """One progress bar for all workers: shards fetched of those to fetch (rate, ETA), and the bytes received."""

    def __init__(self, total):
        # on stdout with the command's other output: stderr holds nothing but a failure's one-line error
        self.bar = progress(total=total, desc="downloading shards", unit="shard", stream=sys.stdout)
        self.live = is_interactive(sys.stdout)
        self.bytes, self.t0 = 0, time.time()
        self.lock = threading.Lock()

    def add_bytes(self, n):
        with self.lock:
            self.bytes += n

    def _received(self):
        return f"{self.bytes / 1e6:.1f} MB, {self.bytes / 1e6 / max(time.time() - self.t0, 1e-6):.1f} MB/s"

    def shard_done(self, name):
        with self.lock:
            self.bar.set_postfix_str(self._received(), refresh=False)
            self.bar.update(1)

    def tick(self):
        """Between shards, a live bar shows the bytes still arriving (a log gets a line per shard only)."""
        if self.live:
            with self.lock:
                self.bar.set_postfix_str(self._received())

    def close(self):
        with self.lock:
            self.bar.set_postfix_str(self._received(), refresh=False)
            self.bar.close()



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


def download_shard_url(index, base_url, data_dir, retries, backoff, timeout, shard_progress, stop):
    """One shard from a plain URL folder (`--base-url`), with the shared resumable downloader."""
    name = shard_name(index)
    download_file(f"{base_url.rstrip('/')}/{name}", os.path.join(data_dir, name), check=check_parquet_shard,
                  retries=retries, backoff=backoff, timeout=timeout, on_bytes=shard_progress.add_bytes, stop=stop,
                  hint="check --base-url and --num-shards-total")
    shard_progress.shard_done(name)


def download_shard_hub(index, repo_id, revision, data_dir, retries, backoff, timeout, shard_progress, stop):
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
            shard_progress.add_bytes(size)
            shard_progress.shard_done(name)
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
        disable_progress_bars()  # our one bar for all workers instead of one per worker
    guard_download_target(data_dir, source, overwrite)
    os.makedirs(data_dir, exist_ok=True)
    todo = [i for i in indices if not os.path.exists(os.path.join(data_dir, shard_name(i)))]
    print(f"{len(indices)} shards wanted ({len(indices) - 1} train + val), {len(indices) - len(todo)} already here, "
          f"downloading {len(todo)} to {data_dir} with {workers} workers", flush=True)
    shard_progress = ShardProgress(len(todo))
    failures, stop = [], threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(fetch, i, *where, data_dir, retries, backoff, timeout, shard_progress, stop)
                   for i in todo]
        pending = set(futures)
        while pending:  # wake up every second: Ctrl-C is seen at once, and a live bar shows bytes arriving
            _, pending = concurrent.futures.wait(pending, timeout=1.0)
            shard_progress.tick()
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
        shard_progress.close()
    present = sorted(os.path.basename(p) for p in list_parquet_files(data_dir))
    atomic_write_json(os.path.join(data_dir, MANIFEST_NAME), dict(source, shards=present))
    make_readable(os.path.join(data_dir, MANIFEST_NAME))
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

