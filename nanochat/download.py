"""
One small resumable downloader for plain URLs (the CORE eval bundle, a `--base-url` shard mirror).
Hub-hosted data (FineWeb shards, the task datasets) goes through huggingface_hub instead.

    download_file(url, dest, check=is_zip)   # -> dest, or NanochatError saying what to do

Unfinished bytes live in `<dest>.partial` and continue with an HTTP Range request on the next try
(or the next run); a server that ignores Range sends the whole file again. Failures are retried with
exponential backoff; a 4xx (other than 408/429) fails at once. `dest` only ever holds a file that passed
`check` (which raises RetryableError for bad bytes; those are thrown away, not resumed).
"""

import http.client
import os
import time
import urllib.error
import urllib.request

from nanochat.common import NanochatError


class RetryableError(Exception):
    pass


class DownloadStopped(BaseException):
    """Raised inside a worker after Ctrl-C, so it stops between chunks (its .partial stays for resume)."""


def fetch_to_partial(url, partial, timeout, on_bytes=None, stop=None, hint="check the URL"):
    """Fetch `url` into `partial`, continuing from its current size with an HTTP Range request.
    A server that ignores Range (200 instead of 206) gets the file from the start."""
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our partial is already as long as (or longer than) the file
            os.remove(partial)
            raise RetryableError("range not satisfiable; restarting from scratch") from None
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise NanochatError(f"{url} answered HTTP {e.code} {e.reason}; {hint}") from None
        raise RetryableError(f"HTTP {e.code} {e.reason}") from None
    with response:
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                os.remove(partial)  # we cannot trust how the pieces fit: start over
                raise RetryableError(f"server sent the wrong range ({content_range!r})")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # the server sent the whole file
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        written = offset
        try:
            with open(partial, mode) as f:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    if stop is not None and stop.is_set():
                        raise DownloadStopped()
                    f.write(chunk)
                    written += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise NanochatError(f"disk full while downloading {partial}; free some space and run again "
                                    f"(the download resumes where it stopped)") from None
            raise
    if expected is not None and written < expected:
        raise RetryableError(f"connection closed after {written} of {expected} bytes")


def download_file(url, dest, check=None, retries=5, backoff=2.0, timeout=60.0, on_bytes=None, stop=None,
                  hint="check the URL"):
    """Download `url` to `dest` (resuming `<dest>.partial`), retried; returns dest or raises NanochatError.
    `hint` ends the message of a 4xx answer (what to check)."""
    partial = dest + ".partial"
    name = os.path.basename(dest)
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise DownloadStopped()
        try:
            fetch_to_partial(url, partial, timeout, on_bytes, stop, hint)
            if check is not None:
                try:
                    check(partial)
                except RetryableError:
                    os.remove(partial)  # corrupt bytes cannot be resumed: start over
                    raise
            os.replace(partial, dest)
            return dest
        except RetryableError as e:
            last_error = str(e)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            # refused, reset, DNS failure, timeout: worth another try
            last_error = f"{e.__class__.__name__}: {getattr(e, 'reason', e)}"
        except http.client.HTTPException as e:  # IncompleteRead, RemoteDisconnected, BadStatusLine, ...
            last_error = f"{e.__class__.__name__}: {e}"
    raise NanochatError(f"could not download {name} from {url} after {retries + 1} attempts (last: {last_error}); "
                        f"run the same command again to resume")
