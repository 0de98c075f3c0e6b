"""
Saving, finding, validating and loading checkpoints.

A checkpoint is self-contained: with one step directory alone a user can chat, evaluate,
resume or export.

    <base>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/step_000123/
        model.safetensors   weights (tied tensors stored once, see meta["tied_weights"])
        meta.json           model_config, arch, tokenizer_fingerprint, vocab_size, train_args,
                            step, metrics, dataloader_state, rng, world_size, tied_weights
        optim_rank{r}.pt    optimizer state of rank r
        tokenizer/          a copy of the tokenizer the model was trained with
        COMPLETE            written last; readers ignore step directories without it

Saves are atomic: everything is written into a hidden temp directory beside the final one,
fsynced, COMPLETE is written last, and the directory is renamed into place. A crash (even
kill -9) at any moment leaves the previous complete checkpoints untouched and loadable.
Loading checks the tokenizer fingerprint, the vocab size and every tensor's shape against the
config before any real model is built, and names both sides of any disagreement.
"""

import glob
import os
import random
import re
import shutil
import time

from nanochat.common import NanochatError, _fsync_dir, get_base_dir, read_json, atomic_write_json

# source name (as the stage scripts call it) -> checkpoint folder, and the stage that writes it
STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
STAGE_SCRIPTS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}

COMPLETE_MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")
# Test hook "STEP:SECONDS": sleep that long inside the save of STEP, after the weights are written
# (so a test can kill -9 a save midway).
_SLEEP_ENV = "NANOCHAT_TEST_SLEEP_IN_SAVE"


def step_dirname(step):
    return f"step_{step:06d}"


def checkpoints_root(source):
    if source not in STAGE_DIRS:
        raise NanochatError(f"unknown checkpoint source {source!r}; use one of {', '.join(STAGE_DIRS)}")
    return os.path.join(get_base_dir(), STAGE_DIRS[source])


# -----------------------------------------------------------------------------
# RNG state as plain JSON (so it fits in meta.json)

def capture_rng_state():
    import base64
    import numpy as np
    import torch
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "torch_cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state):
    import base64
    import numpy as np
    import torch
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8))
    if state.get("torch_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cuda"])), dtype=torch.uint8))


# -----------------------------------------------------------------------------
# Saving

def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(path):
    for root, dirs, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(root, name))
        _fsync_dir(root)


def _clean_state_dict(model_state):
    """CPU, contiguous, names without torch.compile's `_orig_mod.` prefix; tensors that share
    storage (tied embeddings) are kept once and the aliases returned separately."""
    tensors, tied, seen = {}, {}, {}
    for name, t in model_state.items():
        name = name.replace("_orig_mod.", "")
        if name.startswith("module."):  # a DDP wrapper's prefix
            name = name[len("module."):]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, tied


def _agree_on_tmp_name(step):
    """All ranks must write into the same temp directory: rank 0's pid names it."""
    token = [os.getpid()]
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return f".{step_dirname(step)}.tmp-{token[0]}"


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, meta, tokenizer, rank=0, keep_last=2):
    """Write step `step` atomically. Under DDP every rank calls this (collectively): rank r writes
    optim_rank{r}.pt, rank 0 writes the weights, meta and tokenizer and renames the directory into
    place after a barrier. `optimizer_states` is this rank's list of optimizer state dicts (or None).
    Older complete steps beyond the newest `keep_last` are deleted only after the new one is complete
    (keep_last=0 keeps all). Returns the final step directory."""
    import torch
    from safetensors.torch import save_file
    if keep_last and keep_last < 2:
        raise NanochatError(f"keep_last={keep_last}: keep at least 2 checkpoints (or 0 for all) so a crash during a save never leaves none")
    os.makedirs(checkpoint_dir, exist_ok=True)
    final_dir = os.path.join(checkpoint_dir, step_dirname(step))
    tmp_dir = os.path.join(checkpoint_dir, _agree_on_tmp_name(step))
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    _barrier()
    # every rank: its optimizer shard
    if optimizer_states is not None:
        torch.save([opt for opt in optimizer_states], os.path.join(tmp_dir, f"optim_rank{rank}.pt"))
    if rank == 0:
        tensors, tied = _clean_state_dict(model_state)
        save_file(tensors, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        hook_step, _, sleep_s = os.environ.get(_SLEEP_ENV, "").partition(":")
        if hook_step and int(hook_step) == step:
            print(f"[test hook] sleeping {sleep_s}s inside the save of step {step}", flush=True)
            time.sleep(float(sleep_s))
        meta = dict(meta)
        meta["step"] = step
        meta["tied_weights"] = tied
        meta.setdefault("tokenizer_fingerprint", tokenizer.fingerprint)
        meta.setdefault("vocab_size", tokenizer.get_vocab_size())
        import torch.distributed as dist
        meta["world_size"] = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        atomic_write_json(os.path.join(tmp_dir, "meta.json"), meta)
        tokenizer.save(os.path.join(tmp_dir, "tokenizer"))
    _barrier()  # all optimizer shards are on disk
    if rank == 0:
        _fsync_tree(tmp_dir)
        with open(os.path.join(tmp_dir, COMPLETE_MARKER), "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp_dir)
        if os.path.exists(final_dir):  # re-saving a step (e.g. after a resume): swap the old one out first
            trash = os.path.join(checkpoint_dir, f".{step_dirname(step)}.old-{os.getpid()}")
            os.rename(final_dir, trash)
            os.rename(tmp_dir, final_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp_dir, final_dir)
        _fsync_dir(checkpoint_dir)
        _prune(checkpoint_dir, keep_last)
    _barrier()
    return final_dir


def _prune(checkpoint_dir, keep_last):
    """Delete complete steps older than the newest keep_last, plus the temp dirs of crashed saves
    (called by the single writer of this directory, after its own save has been renamed into place)."""
    steps = list_complete_steps(checkpoint_dir)
    if keep_last:
        for s in steps[:-keep_last]:
            shutil.rmtree(os.path.join(checkpoint_dir, step_dirname(s)), ignore_errors=True)
    for path in glob.glob(os.path.join(checkpoint_dir, ".step_*.tmp-*")) + glob.glob(os.path.join(checkpoint_dir, ".step_*.old-*")):
        shutil.rmtree(path, ignore_errors=True)


# -----------------------------------------------------------------------------
# Finding

def list_complete_steps(checkpoint_dir):
    """Sorted steps that have a COMPLETE marker (temp dirs and partial steps are ignored)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(checkpoint_dir, name, COMPLETE_MARKER)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = list_complete_steps(checkpoint_dir)
    if not steps:
        raise NanochatError(f"no complete checkpoint in {checkpoint_dir} (step_* dirs with a {COMPLETE_MARKER} marker); train one first")
    return steps[-1]


def find_latest_tag(root):
    """The most recently modified tag directory under a stage's checkpoint folder."""
    if not os.path.isdir(root):
        return None
    tags = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    if not tags:
        return None
    return max(tags, key=lambda d: os.path.getmtime(os.path.join(root, d)))


def _step_dir(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, step_dirname(step))
    if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
        have = list_complete_steps(checkpoint_dir)
        raise NanochatError(f"checkpoint step {step} is missing or incomplete in {checkpoint_dir} (complete steps: {have or 'none'})")
    return path


def read_meta(checkpoint_dir, step):
    return read_json(os.path.join(_step_dir(checkpoint_dir, step), "meta.json"), "checkpoint meta")


# -----------------------------------------------------------------------------
# Validation: everything is compared before a real model is built or any compute runs

def expected_shapes(config):
    """Parameter/buffer shapes a GPT with this config has, from a model on the meta device (no memory, no compute)."""
    import torch
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def checkpoint_shapes(path):
    """Tensor shapes from a safetensors header, without reading the data."""
    from safetensors import safe_open
    shapes = {}
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    except FileNotFoundError:
        raise NanochatError(f"checkpoint weights missing: {path}") from None
    except Exception as e:
        raise NanochatError(f"checkpoint weights are unreadable ({e.__class__.__name__}: {e}): {path}") from None
    return shapes


def make_config(meta, step_dir="?"):
    from nanochat.gpt import GPTConfig
    try:
        return GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, AttributeError) as e:
        raise NanochatError(f"checkpoint meta has an unusable model_config ({e}): {step_dir}/meta.json") from None


def validate_checkpoint(step_dir, meta, tokenizer, config):
    """Raise NanochatError naming both sides if tokenizer, vocab size or tensor shapes disagree."""
    meta_path = os.path.join(step_dir, "meta.json")
    tok_path = os.path.join(step_dir, "tokenizer")
    fp_meta = meta.get("tokenizer_fingerprint")
    if fp_meta != tokenizer.fingerprint:
        raise NanochatError(
            f"tokenizer fingerprint mismatch: checkpoint meta {meta_path} says {str(fp_meta)[:16]} but the tokenizer "
            f"{getattr(tokenizer, 'source_dir', tok_path)} is {tokenizer.fingerprint[:16]}; use the tokenizer the model was trained with")
    vocab_tok = tokenizer.get_vocab_size()
    if config.vocab_size != vocab_tok:
        raise NanochatError(
            f"vocab size mismatch: model config in {meta_path} has vocab_size {config.vocab_size} but the tokenizer "
            f"{tok_path} has {vocab_tok} ids; the model must be built (or extended) for this tokenizer")
    if "vocab_size" in meta and meta["vocab_size"] != vocab_tok:
        raise NanochatError(f"vocab size mismatch: meta {meta_path} records vocab_size {meta['vocab_size']} but the tokenizer {tok_path} has {vocab_tok}")
    weights = os.path.join(step_dir, "model.safetensors")
    have = checkpoint_shapes(weights)
    for alias, src in (meta.get("tied_weights") or {}).items():
        if src in have:
            have[alias] = have[src]
    want = expected_shapes(config)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise NanochatError(
            f"checkpoint tensors do not match the config in {meta_path}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'…' if len(extra) > 5 else ''} in {weights}")
    for k in sorted(want):
        if want[k] != have[k]:
            raise NanochatError(f"tensor shape mismatch for {k}: {weights} has {list(have[k])} but the config in {meta_path} needs {list(want[k])}")


# -----------------------------------------------------------------------------
# Loading

def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optimizer_states or None, meta) of one complete step. Tensors come back on `device`;
    bf16 weights loaded onto the CPU are converted to fp32."""
    import torch
    from safetensors.torch import load_file
    step_dir = _step_dir(checkpoint_dir, step)
    meta = read_json(os.path.join(step_dir, "meta.json"), "checkpoint meta")
    device = torch.device(device)
    state = load_file(os.path.join(step_dir, "model.safetensors"), device="cpu")
    for alias, src in (meta.get("tied_weights") or {}).items():
        state[alias] = state[src]
    for k, v in state.items():
        if device.type == "cpu" and v.dtype == torch.bfloat16:
            v = v.float()
        state[k] = v.to(device)
    optim = None
    if load_optimizer:
        path = os.path.join(step_dir, f"optim_rank{rank}.pt")
        if not os.path.exists(path):
            raise NanochatError(f"optimizer state {path} not found: the checkpoint was saved with world size "
                                f"{meta.get('world_size', '?')}; resume with the same number of processes")
        optim = torch.load(path, map_location=device, weights_only=False)
    return state, optim, meta


def _resolve_device(device):
    import torch
    from nanochat.common import resolve_device_type
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto") or device in ("cuda", "mps", "cpu"):
        return torch.device(resolve_device_type(device))
    return torch.device(device)


def build_model(checkpoint_dir, step, device, phase="eval"):
    """(model, tokenizer, meta) from one step, validated before the model is built."""
    import torch
    from nanochat.gpt import GPT
    from nanochat.tokenizer import load_tokenizer
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be eval or train, got {phase!r}")
    device = _resolve_device(device)
    step_dir = _step_dir(checkpoint_dir, step)
    meta = read_json(os.path.join(step_dir, "meta.json"), "checkpoint meta")
    tokenizer = load_tokenizer(os.path.join(step_dir, "tokenizer"))
    config = make_config(meta, step_dir)
    validate_checkpoint(step_dir, meta, tokenizer, config)
    state, _, meta = load_checkpoint(checkpoint_dir, step, "cpu")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty materialises each parameter on its own, which unties them
        model.lm_head.weight = model.transformer.wte.weight
    model.init_weights()  # fills non-persistent buffers (rotary tables); the weights are overwritten next
    model.load_state_dict(state, strict=True)
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta


def load_model(source, device=None, phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) from <base>/<source's checkpoints>/<tag>/step_N: tag defaults to the most
    recently modified one, step to the newest complete one."""
    root = checkpoints_root(source)
    stage = STAGE_SCRIPTS[source]
    if model_tag is None:
        model_tag = find_latest_tag(root)
        if model_tag is None:
            raise NanochatError(f"no {source} checkpoints in {root}; run `python -m {stage}` first")
    checkpoint_dir = os.path.join(root, model_tag)
    if not os.path.isdir(checkpoint_dir):
        tags = sorted(d for d in os.listdir(root) if not d.startswith(".")) if os.path.isdir(root) else []
        raise NanochatError(f"no {source} checkpoint tag {model_tag!r} in {root} (have: {tags or 'none'}); run `python -m {stage}` first")
    if step is None:
        if not list_complete_steps(checkpoint_dir):
            raise NanochatError(f"no complete {source} checkpoint in {checkpoint_dir}; run `python -m {stage}` first")
        step = find_last_step(checkpoint_dir)
    return build_model(checkpoint_dir, step, device, phase)


def start_or_resume(stage, source, device, rank=0, resume=False, model_tag=None, step=None, output_tag=None):
    """Where a post-training stage (mid|sft|rl) starts. Fresh: `source`'s checkpoint (tag/step default:
    the newest), saving under <stage's folder>/<output_tag or model_tag or d{n_layer}>. With `resume`:
    this stage's own newest complete checkpoint, its meta and this rank's optimizer state.
    Returns (model, tokenizer, resume_meta or None, optimizer_states or None, checkpoint_dir, start_step)."""
    root = checkpoints_root(stage)
    if resume:
        tag = output_tag or model_tag or find_latest_tag(root)
        checkpoint_dir = os.path.join(root, tag or "?")
        if tag is None or not list_complete_steps(checkpoint_dir):
            raise NanochatError(f"--resume: no complete {stage} checkpoint in {root}; run without --resume first")
        start_step = find_last_step(checkpoint_dir)
        model, tokenizer, meta = build_model(checkpoint_dir, start_step, device, phase="train")
        _, optimizer_states, _ = load_checkpoint(checkpoint_dir, start_step, device, load_optimizer=True, rank=rank)
        return model, tokenizer, meta, optimizer_states, checkpoint_dir, start_step
    model, tokenizer, _ = load_model(source, device, phase="train", model_tag=model_tag, step=step)
    tag = output_tag or model_tag or f"d{model.config.n_layer}"
    return model, tokenizer, None, None, os.path.join(root, tag), 0
