"""
The CORE metric (from the DCLM paper): a base model's in-context-learning accuracy on the tasks of
the DCLM eval bundle, each centered against its random baseline and then averaged.

Bundle layout (eval_bundle.zip): core.yaml (icl_tasks: label, dataset_uri, num_fewshot,
icl_task_type, continuation_delimiter), eval_meta_data.csv ("Eval Task", "Random baseline" in %),
eval_data/<dataset_uri> (jsonl). Three task types, all scored by the model's loss, no sampling:
- multiple_choice {query, choices, gold}: the prompt is the query; each choice is a continuation;
  the choice whose tokens get the lowest mean loss is the answer.
- schema {context_options, continuation, gold}: the continuation is fixed and each context is an
  option; the context under which the continuation has the lowest mean loss is the answer.
- language_modeling {context, continuation}: correct if greedy decoding reproduces every token of
  the continuation.
Few-shot examples are drawn (seeded per item) from the task's other items and prepended, separated
by blank lines. centered = (accuracy - baseline) / (1 - baseline); CORE = mean over tasks.
"""

import csv
import fcntl
import json
import os
import random
import shutil
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist

from nanochat.common import NanochatError, get_base_dir
from nanochat.download import RetryableError, download_file

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"


# -----------------------------------------------------------------------------
# The bundle: downloaded once (a file lock makes concurrent ranks wait), extracted atomically

def _is_bundle(path):
    return os.path.isfile(os.path.join(path, "core.yaml")) and os.path.isdir(os.path.join(path, "eval_data"))


def _check_zip(path):
    if not zipfile.is_zipfile(path):
        raise RetryableError("not a zip file (truncated or an error page)")


def eval_bundle_url():
    """$NANOCHAT_EVAL_BUNDLE_URL (a mirror or a local server), else the public bundle."""
    return os.environ.get(EVAL_BUNDLE_URL_ENV) or EVAL_BUNDLE_URL


def ensure_eval_bundle(url=None, base_dir=None, retries=4, backoff=1.0, timeout=60):
    """Path of the extracted bundle under <base>/eval_bundle, downloading it first if needed
    (resumable: an interrupted download continues from <base>/.eval_bundle.zip.partial)."""
    url = url or eval_bundle_url()
    base_dir = base_dir or get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if _is_bundle(bundle_dir):
        return bundle_dir
    os.makedirs(base_dir, exist_ok=True)
    with open(os.path.join(base_dir, ".eval_bundle.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process downloads; the others wait here, then find it
        try:
            if _is_bundle(bundle_dir):
                return bundle_dir
            archive = os.path.join(base_dir, ".eval_bundle.zip")
            download_file(url, archive, check=_check_zip, retries=retries, backoff=backoff, timeout=timeout,
                          hint="check --eval-bundle-url / NANOCHAT_EVAL_BUNDLE_URL, or pass --skip-core")
            work = tempfile.mkdtemp(prefix=".eval_bundle.", dir=base_dir)
            try:
                extracted = os.path.join(work, "x")
                try:
                    with zipfile.ZipFile(archive) as z:
                        z.extractall(extracted)
                except zipfile.BadZipFile as e:
                    raise NanochatError(f"the eval bundle from {url} is corrupt ({e}); try again or pass --skip-core") from None
                root = extracted
                if not _is_bundle(root):  # the zip usually holds one top folder, eval_bundle/
                    inner = [os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
                    root = next((d for d in inner if _is_bundle(d)), None)
                    if root is None:
                        raise NanochatError(f"the archive from {url} has no core.yaml + eval_data/; is it the DCLM eval bundle?")
                shutil.rmtree(bundle_dir, ignore_errors=True)
                os.rename(root, bundle_dir)
                os.remove(archive)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return bundle_dir


def load_tasks(bundle_dir):
    """[{label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter, baseline}]"""
    try:
        import yaml
    except ImportError:
        raise NanochatError("the CORE metric needs PyYAML to read core.yaml; pip install pyyaml") from None
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
    tasks = []
    for t in config["icl_tasks"]:
        fewshot = t.get("num_fewshot", [0])
        task = {"label": t["label"], "dataset_uri": t["dataset_uri"], "icl_task_type": t["icl_task_type"],
                "num_fewshot": fewshot[0] if isinstance(fewshot, list) else int(fewshot),
                "continuation_delimiter": t.get("continuation_delimiter", " ")}
        if task["label"] not in baselines:
            raise NanochatError(f"task {task['label']} has no random baseline in {bundle_dir}/eval_meta_data.csv")
        task["baseline"] = baselines[task["label"]]
        tasks.append(task)
    return tasks


def load_task_data(bundle_dir, task):
    with open(os.path.join(bundle_dir, "eval_data", task["dataset_uri"]), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Prompts: (token sequences of the options, [start, end) of the scored tokens in each)

def _fewshot(data, idx, k):
    if k <= 0:
        return []
    rng = random.Random(1234 + idx)
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(others, min(k, len(others)))]


def _common_prefix(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs):
    return _common_prefix([s[::-1] for s in seqs])


def render_item(task, data, idx, tokenizer):
    """(sequences, spans, gold): token lists (BOS first), the scored span of each, the right option."""
    item, delim, kind = data[idx], task["continuation_delimiter"], task["icl_task_type"]
    shots = _fewshot(data, idx, task["num_fewshot"])
    bos = tokenizer.get_bos_token_id()
    if kind == "multiple_choice":
        head = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
        texts = [f"{head}{item['query']}{delim}{c}" for c in item["choices"]]
        seqs = tokenizer.encode(texts, prepend=bos)
        start = _common_prefix(seqs)
        return seqs, [(start, len(s)) for s in seqs], item["gold"]
    if kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
        texts = [f"{head}{c}{delim}{item['continuation']}" for c in item["context_options"]]
        seqs = tokenizer.encode(texts, prepend=bos)
        n = _common_suffix(seqs)
        return seqs, [(len(s) - n, len(s)) for s in seqs], item["gold"]
    if kind == "language_modeling":
        head = "".join(f"{s['context']}{delim}{s['continuation']}\n\n" for s in shots)
        context, full = tokenizer.encode([f"{head}{item['context']}{delim}".rstrip(), f"{head}{item['context']}{delim}{item['continuation']}"],
                                         prepend=bos)
        return [full], [(_common_prefix([context, full]), len(full))], 0
    raise NanochatError(f"unknown icl_task_type {kind!r} in core.yaml (task {task['label']})")


def _crop(seqs, spans, max_len):
    """Keep the last max_len tokens of every sequence (the scored end matters most)."""
    out_seqs, out_spans = [], []
    for s, (a, b) in zip(seqs, spans):
        cut = max(0, len(s) - max_len)
        out_seqs.append(s[cut:])
        out_spans.append((max(1, a - cut), b - cut))
    return out_seqs, out_spans


@torch.no_grad()
def evaluate_item(model, seqs, spans, gold, kind, device, max_len):
    seqs, spans = _crop(seqs, spans, max_len)
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    ids = ids.to(device)
    logits = model(ids)  # (N, T, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if kind == "language_modeling":
        (a, b), s = spans[0], ids[0]
        predicted = logits[0, a - 1:b - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, s[a:b]))
    mean_losses = []
    for i, (a, b) in enumerate(spans):
        target = ids[i, a:b]
        nll = -logprobs[i, a - 1:b - 1].gather(1, target[:, None]).squeeze(1)
        mean_losses.append(nll.mean().item())
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == gold


def evaluate_task(model, tokenizer, task, data, device, max_per_task=-1):
    """Accuracy on one task (items split over ranks under DDP)."""
    n = len(data) if max_per_task is None or max_per_task < 0 else min(len(data), max_per_task)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    max_len = getattr(model.config, "sequence_len", 2048)
    counts = torch.zeros(2, dtype=torch.long, device=device)  # correct, total
    for idx in range(rank, n, world):
        seqs, spans, gold = render_item(task, data, idx, tokenizer)
        counts[0] += int(evaluate_item(model, seqs, spans, gold, task["icl_task_type"], device, max_len))
        counts[1] += 1
    if world > 1:
        dist.all_reduce(counts)
    return counts[0].item() / max(1, counts[1].item())


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=-1, log=print):
    """{"results": {label: accuracy}, "centered": {label: centered}, "core": mean centered}."""
    results, centered = {}, {}
    for task in load_tasks(bundle_dir):
        t0 = time.time()
        acc = evaluate_task(model, tokenizer, task, load_task_data(bundle_dir, task), device, max_per_task)
        results[task["label"]] = acc
        centered[task["label"]] = (acc - task["baseline"]) / (1.0 - task["baseline"])
        log(f"{task['label']:<35} accuracy {acc:.4f} | centered {centered[task['label']]:+.4f} | {time.time() - t0:.1f}s")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered": centered, "core": core}
