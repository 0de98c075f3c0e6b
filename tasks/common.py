"""
What every task shares: the `Task` base class (length, indexing, slicing, evaluation), `TaskMixture`
and `TaskSequence`, multiple-choice rendering, and loading a dataset from the Hugging Face hub or
from a local folder with the same code.

A task item is a conversation `{"messages": [...]}` (see dev/CONTRACTS.md); categorical
(multiple-choice) items also carry `"letters"`, the allowed answer letters.

Local data (no network): point `data_dir=` (scripts: `--data-dir`) or the environment variable
`NANOCHAT_TASK_DATA` at a folder that mirrors the hub repositories, as
`huggingface-cli download <repo> --repo-type dataset --local-dir <folder>/<repo>` leaves them:

    <folder>/openai/gsm8k/main/train-00000-of-00001.parquet      (hub layout: <config>/<split>-*.parquet)
    <folder>/allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet
    <folder>/cais/mmlu/auxiliary_train/train-00000-of-00001.parquet
    <folder>/HuggingFaceTB/smol-smoltalk/data/train-00000-of-00001.parquet   (no config: data/<split>-*)

The `<owner>/` level may be left out (`<folder>/gsm8k/main/...`), and a split may also be a single
JSONL file in the dataset's own format (`<folder>/gsm8k/main/train.jsonl` or `<folder>/gsm8k/train.jsonl`).
Either way the files are read by `datasets.load_dataset("parquet"|"json", data_files=...)`.

Without a local folder, the split's parquet files are fetched from the hub with huggingface_hub (retries,
resume, HF_TOKEN, and HF_ENDPOINT for a mirror) into `<base>/task_data/<repo>/`, in the same layout, then
read the same way. An offline caller (`offline=True`) uses what an earlier online run left there.
"""

import contextlib
import fcntl
import glob
import math
import os
import random

from nanochat.common import NanochatError, get_base_dir, get_rank

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"
MIXTURE_SEED = 42


class TaskDataUnavailable(NanochatError):
    """A task's data cannot be had right now (offline, no local copy); a default task list may skip it."""


class Task:
    """A dataset of conversations, optionally viewed through start/stop/step (like a slice)."""

    eval_type = "generative"  # or "categorical"

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    # subclasses implement these two over the whole underlying dataset
    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.__class__.__name__} index {index} out of range (length {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskSequence(Task):
    """Tasks one after the other (useful for curricula)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(index)


class TaskMixture(Task):
    """All items of several tasks, deterministically shuffled together (fixed seed), so a training run
    sees the tasks interleaved. Passing a task twice oversamples it."""

    def __init__(self, tasks, seed=MIXTURE_SEED, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


# -----------------------------------------------------------------------------
# Multiple choice

LETTERS = "ABCDEFGHIJ"


def render_mc(question, letters, choices):
    """The multiple-choice prompt: the question, one 'A. choice' line per choice, then 'Answer:'.
    The expected answer is a single letter."""
    lines = [question.strip(), ""]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer:"]
    return "\n".join(lines)


def evaluate_letter(conversation, completion):
    """A categorical answer is right when its first letter-like token is the reference letter."""
    reference = conversation["messages"][-1]["content"]
    answer = completion.strip().lstrip("(").upper()[:1]
    return answer == reference


# -----------------------------------------------------------------------------
# Loading datasets: the hub, or a local folder in the hub's formats

def task_data_dir(data_dir=None):
    return data_dir or os.environ.get(TASK_DATA_ENV) or None


def hub_cache_dir():
    """Where splits fetched from the hub land, in the hub's layout (so it reads like a local mirror)."""
    return os.path.join(get_base_dir(), "task_data")


def _split_patterns(config, split, jsonl=True):
    patterns = []
    if config:
        patterns += [f"{config}/{split}-*.parquet", f"{config}/{split}.parquet", f"{config}/{split}.jsonl",
                     f"{config}/{split}/*.parquet"]
    patterns += [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet", f"{split}.jsonl"]
    return [p for p in patterns if jsonl or not p.endswith(".jsonl")]


def find_local_files(folder, repo_id, config, split):
    """Files of one split in a local mirror of the hub repo (layouts in the module docstring)."""
    owner_name = repo_id.strip("/")
    roots = [os.path.join(folder, owner_name), os.path.join(folder, owner_name.split("/")[-1])]
    for root in roots:
        for pattern in _split_patterns(config, split):
            files = sorted(glob.glob(os.path.join(root, pattern)))
            if files:
                return files
    return []


def cached_split_files(repo_id, config, split):
    """The files of a split that an earlier online run fetched into <base>/task_data (maybe none)."""
    return find_local_files(hub_cache_dir(), repo_id, config, split)


@contextlib.contextmanager
def _hub_lock():
    """Ranks of one run fetch the same files: the first downloads, the others wait and then find them."""
    os.makedirs(hub_cache_dir(), exist_ok=True)
    with open(os.path.join(hub_cache_dir(), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch_split(repo_id, config, split):
    """Download one split's parquet files from the hub (or HF_ENDPOINT's mirror) into <base>/task_data."""
    from huggingface_hub import snapshot_download
    with _hub_lock():
        try:
            snapshot_download(repo_id, repo_type="dataset", allow_patterns=_split_patterns(config, split, jsonl=False),
                              local_dir=os.path.join(hub_cache_dir(), repo_id))
        except Exception as e:  # network, missing repo, bad token, ...: say how to work offline
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise TaskDataUnavailable(f"could not fetch {repo_id} ({config or 'default'}, {split}) from the hub "
                                      f"({e.__class__.__name__}: {first}); check the network "
                                      f"(or HF_ENDPOINT/HF_TOKEN), "
                                      f"or set {TASK_DATA_ENV} (or --data-dir) to a local mirror (see tasks/common.py)"
                                      ) from None
    files = cached_split_files(repo_id, config, split)
    if not files:
        raise NanochatError(f"the hub dataset {repo_id} has no parquet files for ({config or 'default'}, {split}) "
                            f"in the expected layout ({', '.join(_split_patterns(config, split, jsonl=False))})")
    return files


def load_split(repo_id, config, split, data_dir=None, offline=False):
    """A `datasets.Dataset` for one split: from the local mirror if a data dir is set, else from the hub
    (offline: from what an earlier online run fetched)."""
    import datasets
    if get_rank() != 0:  # under torchrun: one set of progress bars, not one per rank
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
        datasets.disable_progress_bars()
    folder = task_data_dir(data_dir)
    cache_dir = os.path.join(get_base_dir(), "datasets_cache")
    if folder:
        files = find_local_files(folder, repo_id, config, split)
        if not files:
            where = f"{folder}/{repo_id}/{config + '/' if config else 'data/'}{split}-*.parquet"
            raise NanochatError(f"no local files for {repo_id} ({config or 'default'}, {split}) in {folder}; "
                                f"expected e.g. {where} or {split}.jsonl beside it")
    elif offline:
        files = cached_split_files(repo_id, config, split)
        if not files:
            raise TaskDataUnavailable(f"{repo_id} ({config or 'default'}, {split}) is not available offline; run "
                                      f"once with network or set {TASK_DATA_ENV} to a local mirror")
    else:
        files = fetch_split(repo_id, config, split)
    kind = "json" if files[0].endswith(".jsonl") else "parquet"
    return datasets.load_dataset(kind, data_files={split: files}, split=split, cache_dir=cache_dir)
