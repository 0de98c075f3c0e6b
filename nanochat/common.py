"""
Things every stage needs: where artifacts live, which device to use, distributed
init/teardown, rank-0 printing, atomic file writes, and the one user-facing error
type with its one-line handler.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile


# -----------------------------------------------------------------------------
# The user-facing error: what is wrong and what to do, in one line.

class NanochatError(Exception):
    """A problem the user can act on (bad flag, missing file, mismatch, corrupt download).
    Scripts print it as one line and exit non-zero; anything else is a bug and keeps its traceback."""


def run_main(main, argv=None):
    """Run a stage's main(); NanochatError becomes one line on stderr and exit code 2."""
    try:
        rc = main(argv) if argv is not None else main()
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        compute_cleanup()
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        compute_cleanup()
        sys.exit(130)
    sys.exit(rc or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error for a wrong flag (what is wrong + where to look) and exit code 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Where artifacts live

def get_base_dir():
    """~/.cache/nanochat, or $NANOCHAT_BASE_DIR. Created on first use."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


# -----------------------------------------------------------------------------
# Atomic writes: a reader sees the old file or the complete new one, never half of one.

def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.
    On any exception the temp file is removed and `path` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            raise NanochatError(f"disk full while writing {path}; free some space and run again") from e
        raise


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, what="file"):
    """Read a JSON file, turning a missing or corrupt file into a NanochatError."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise NanochatError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanochatError(f"{what} is corrupt ({e.__class__.__name__}): {path}; delete it and recreate it") from None


def read_utf8_text(path):
    """A file's text, or a NanochatError saying it is not UTF-8 (and how to convert it)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanochatError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                            f"convert it first, e.g. `iconv -f latin1 -t utf-8`") from None


def iter_jsonl(path):
    """(line number, object) for every non-blank line of a JSONL file; a bad line is a NanochatError naming it."""
    for lineno, line in enumerate(read_utf8_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise NanochatError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None


def sha256_hex(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# Devices and distributed

def autodetect_device_type():
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device_type(device_type=None):
    """'' or None or 'auto' -> autodetect; otherwise validate the name."""
    if device_type in (None, "", "auto"):
        return autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise NanochatError(f"unknown --device {device_type!r}; use cuda, mps or cpu")
    import torch
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    if device_type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise NanochatError("--device mps asked for but MPS is not available; use --device cpu")
    return device_type


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_ddp():
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def compute_init(device_type=None, seed=42):
    """Set up the device (and the process group under torchrun). Returns
    (ddp, rank, local_rank, world_size, device). NCCL on CUDA, gloo elsewhere."""
    import torch
    import torch.distributed as dist
    device_type = resolve_device_type(device_type)
    ddp, rank, local_rank, world_size = get_dist_info()
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_type == "cuda":
        device = torch.device("cuda", 0)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    # Only if torch.distributed is already loaded: importing torch just to print an error costs seconds.
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank():
    return get_dist_info()[1]


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed, so logs interleave sanely under torchrun."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def format_duration(seconds):
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# -----------------------------------------------------------------------------
# Optional wandb: off unless --run names a run (and wandb is installed).

class DummyWandb:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run, project, config):
    if not run or run == "dummy" or get_rank() != 0:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise NanochatError("--run was given but wandb is not installed; pip install wandb, or drop --run") from None
    return wandb.init(project=project, name=run, config=config)


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@functools.lru_cache(maxsize=None)
def peak_flops_for_device(device_name):
    """bf16 dense peak FLOP/s for known GPUs (by torch.cuda.get_device_name()), else None."""
    name = device_name.lower()
    table = [
        ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("gh200", 989e12),
        ("b200", 2250e12), ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12),
        ("a6000", 155e12), ("4090", 165e12), ("3090", 71e12), ("a10", 125e12), ("l4", 121e12),
    ]
    for key, flops in table:
        if key in name:
            return flops
    return None
