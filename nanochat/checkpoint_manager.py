"""
Saving, finding, validating and loading checkpoints: the module users and scripts import them from.

A checkpoint is self-contained: with one step directory alone a user can chat, evaluate,
resume or export.

    <base>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/step_000123/
        model.safetensors   weights (tied tensors stored once, see meta["tied_weights"])
        meta.json           model_config, arch, tokenizer_fingerprint, vocab_size, train_args,
                            step, metrics, dataloader_state, rng, world_size, tied_weights,
                            checksums (sha256 of every other file in the step directory)
        optim_rank{r}.pt    optimizer state of rank r
        tokenizer/          a copy of the tokenizer the model was trained with
        COMPLETE            written last (it holds meta.json's own sha256); a step without it is incomplete

Saves are atomic: everything is written into a hidden temp directory beside the final one,
fsynced, COMPLETE is written last, and the directory is renamed into place. A crash (even
kill -9) at any moment leaves the previous complete checkpoints untouched and loadable.

Every consumer (inference, each stage's --resume, export, doctor) goes through one validated
load path, `open_step`: the files are present, their checksums match (NANOCHAT_VERIFY_CHECKSUMS=0
skips this for very large checkpoints), the safetensors header is readable, the tensor shapes match
the meta's config and the tokenizer copy matches the meta's fingerprint, all before a real model is
built (those checks are in nanochat.checkpoint_integrity). Any failure is one NanochatError naming the
file; when a step is bad the error lists the steps that pass. Incomplete step directories newer than the one
used are reported, never silently skipped. What a resumed run carries over besides weights and optimizer
state (RNG state, its own arguments) is nanochat.run_state's.
"""

import glob
import json
import os
import re
import shutil

# the checks of a step directory (VERIFY_ENV and COMPLETE_MARKER are part of this module's surface too)
from nanochat.checkpoint_integrity import (COMPLETE_MARKER, META, VERIFY_ENV, WEIGHTS, file_checksum,  # noqa: F401
                                           make_config, missing_optimizer_message, step_files, tell,
                                           validate_checkpoint, verify_checksums, verify_enabled, verify_meta_checksum)
from nanochat.common import NanochatError, _fsync_dir, atomic_write_json, get_base_dir
# what a resumed run carries over; base_train and the tests use it from here with the rest
from nanochat.run_state import (capture_rng_state, continue_run_args, parse_args_noting_explicit,  # noqa: F401
                                restore_rng_state)

# source name (as the stage scripts call it) -> checkpoint folder, and the stage that writes it
STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
STAGE_SCRIPTS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}

_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dirname(step):
    return f"step_{step:06d}"


def step_of(dirname):
    """The step a step_NNNNNN directory name stands for, or None for any other name."""
    m = _STEP_RE.match(dirname)
    return int(m.group(1)) if m else None


def optimizer_filename(rank):
    return f"optim_rank{rank}.pt"


def checkpoints_root(source):
    if source not in STAGE_DIRS:
        raise NanochatError(f"unknown checkpoint source {source!r}; use one of {', '.join(STAGE_DIRS)}")
    return os.path.join(get_base_dir(), STAGE_DIRS[source])


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
    optim_rank{r}.pt, rank 0 writes the weights and tokenizer, then (once every shard is on disk) the
    meta with a checksum of every file, and renames the directory into place.
    `optimizer_states` is this rank's list of optimizer state dicts (or None).
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
        torch.save([opt for opt in optimizer_states], os.path.join(tmp_dir, optimizer_filename(rank)))
    if rank == 0:
        tensors, tied = _clean_state_dict(model_state)
        save_file(tensors, os.path.join(tmp_dir, WEIGHTS), metadata={"format": "pt"})
        tokenizer.save(os.path.join(tmp_dir, "tokenizer"))
    _barrier()  # all optimizer shards are on disk
    if rank == 0:
        meta = dict(meta)
        meta["step"] = step
        meta["tied_weights"] = tied
        meta.setdefault("tokenizer_fingerprint", tokenizer.fingerprint)
        meta.setdefault("vocab_size", tokenizer.get_vocab_size())
        import torch.distributed as dist
        meta["world_size"] = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        meta["checksums"] = {rel: file_checksum(os.path.join(tmp_dir, rel)) for rel in step_files(tmp_dir)}
        atomic_write_json(os.path.join(tmp_dir, META), meta)
        _fsync_tree(tmp_dir)
        with open(os.path.join(tmp_dir, COMPLETE_MARKER), "w") as f:
            f.write(f"step {step}\n{META} {file_checksum(os.path.join(tmp_dir, META))}\n")
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
    """Sorted steps that have a COMPLETE marker (temp dirs and partial steps are left out)."""
    return [s for s, complete in _step_dirs(checkpoint_dir) if complete]


def incomplete_steps(checkpoint_dir):
    """Sorted steps whose directory has no COMPLETE marker (an interrupted save or copy)."""
    return [s for s, complete in _step_dirs(checkpoint_dir) if not complete]


def _step_dirs(checkpoint_dir):
    if not os.path.isdir(checkpoint_dir):
        return []
    out = []
    for name in os.listdir(checkpoint_dir):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(checkpoint_dir, name)):
            out.append((int(m.group(1)), os.path.isfile(os.path.join(checkpoint_dir, name, COMPLETE_MARKER))))
    return sorted(out)


def _partial_note(checkpoint_dir):
    partial = incomplete_steps(checkpoint_dir)
    if not partial:
        return ""
    return f" (step {', '.join(map(str, partial))} has no {COMPLETE_MARKER} marker: an interrupted save or copy)"


def find_last_step(checkpoint_dir):
    steps = list_complete_steps(checkpoint_dir)
    if not steps:
        raise NanochatError(f"no complete checkpoint in {checkpoint_dir}{_partial_note(checkpoint_dir)}; "
                            f"train one first")
    return steps[-1]


def choose_step(checkpoint_dir, step=None):
    """`step`, or the newest complete one; incomplete step directories newer than the one used get a warning
    line."""
    if step is None:
        step = find_last_step(checkpoint_dir)
        newer = [s for s in incomplete_steps(checkpoint_dir) if s > step]
        for s in newer:
            tell(f"warning: {os.path.join(checkpoint_dir, step_dirname(s))} has no {COMPLETE_MARKER} marker "
                  f"(an interrupted save or copy) and is skipped; using step {step}. Delete it, or finish copying it")
    return step


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
        why = f"incomplete (no {COMPLETE_MARKER} marker: an interrupted save or copy): {path}" if os.path.isdir(path) \
            else f"missing in {checkpoint_dir}"
        raise NanochatError(f"checkpoint step {step} is {why} (complete steps: {', '.join(map(str, have)) or 'none'})")
    return path


def read_meta(checkpoint_dir, step, verify=None):
    """The meta of one complete step, checked against the checksum its COMPLETE marker holds."""
    step_dir = _step_dir(checkpoint_dir, step)
    path = os.path.join(step_dir, META)
    if not os.path.isfile(path):
        raise NanochatError(f"checkpoint meta missing: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanochatError(f"checkpoint meta is corrupt ({e.__class__.__name__}): {path}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanochatError(f"checkpoint meta is corrupt (no model_config): {path}")
    if verify_enabled(verify):
        verify_meta_checksum(step_dir)
    return meta


# -----------------------------------------------------------------------------
# Opening a step: the one validated path (the checks themselves are in nanochat.checkpoint_integrity)

class CheckpointStep:
    """One validated step directory: its meta, its tokenizer copy and its model config."""

    def __init__(self, checkpoint_dir, step, meta, tokenizer, config):
        self.checkpoint_dir = checkpoint_dir
        self.step = step
        self.dir = os.path.join(checkpoint_dir, step_dirname(step))
        self.meta, self.tokenizer, self.config = meta, tokenizer, config

    def path(self, name):
        return os.path.join(self.dir, name)


def open_step(checkpoint_dir, step, verify=None, optimizer_rank=None, all_files=False):
    """Validate one step: COMPLETE marker, meta, file presence, the tokenizer copy against the meta, the
    safetensors header and every tensor's shape against the config, the optimizer state's header (given
    optimizer_rank), then the checksums of the files this consumer reads (the weights, the tokenizer and,
    given optimizer_rank, that rank's optimizer state; all_files: every one). The checks that say *what*
    disagrees run first; the checksums catch the rest."""
    from nanochat.tokenizer import load_tokenizer
    step_dir = _step_dir(checkpoint_dir, step)
    meta = read_meta(checkpoint_dir, step, verify)
    needed = [WEIGHTS, "tokenizer"]
    if optimizer_rank is not None:
        needed.append(optimizer_filename(optimizer_rank))
    for name in needed:
        path = os.path.join(step_dir, name)
        if not os.path.exists(path):
            if name.startswith("optim_rank"):
                raise NanochatError(missing_optimizer_message(path, meta))
            raise NanochatError(f"checkpoint file missing: {path}")
    tokenizer = load_tokenizer(os.path.join(step_dir, "tokenizer"))
    config = make_config(meta, step_dir)
    validate_checkpoint(step_dir, meta, tokenizer, config)
    ckpt = CheckpointStep(checkpoint_dir, step, meta, tokenizer, config)
    if optimizer_rank is not None:
        load_optimizer_states(ckpt, optimizer_rank, "cpu", mmap=True)  # its header reads (memory-mapped: cheap)
    if verify_enabled(verify):
        files = None
        if not all_files:
            reads = (WEIGHTS, optimizer_filename(optimizer_rank) if optimizer_rank is not None else None)
            files = [rel for rel in (meta.get("checksums") or {})
                     if rel in reads or rel.startswith("tokenizer" + os.sep)]
        verify_checksums(step_dir, meta, files)
    return ckpt


def open_checkpoint(checkpoint_dir, step=None, verify=None, optimizer_rank=None, step_flag="--step", all_files=False):
    """open_step on `step` (default: the newest complete one). If it fails, the error lists the complete
    steps that pass the same checks and the flag that picks one."""
    step = choose_step(checkpoint_dir, step)
    try:
        return open_step(checkpoint_dir, step, verify, optimizer_rank, all_files)
    except NanochatError as e:
        good = []
        for other in reversed(list_complete_steps(checkpoint_dir)):
            if other == step:
                continue
            try:
                open_step(checkpoint_dir, other, verify, optimizer_rank)
                good.append(other)
            except NanochatError:
                pass
        hint = (f"steps that pass the checks: {', '.join(map(str, good))} (pick one with {step_flag} N)" if good else
                f"no other complete step in {checkpoint_dir} passes the checks: restore the file or train again")
        raise NanochatError(f"{e}; {hint}") from None


# -----------------------------------------------------------------------------
# Loading

def load_weights(ckpt, device="cpu"):
    """The state dict of a validated step, on `device`; bf16 weights loaded onto the CPU become fp32."""
    import torch
    from safetensors.torch import load_file
    path = ckpt.path(WEIGHTS)
    try:
        state = load_file(path, device="cpu")
    except Exception as e:
        raise NanochatError(f"checkpoint weights are truncated or corrupt ({e.__class__.__name__}: {e}): "
                            f"{path}") from None
    for alias, src in (ckpt.meta.get("tied_weights") or {}).items():
        state[alias] = state[src]
    device = torch.device(device)
    for k, v in state.items():
        if device.type == "cpu" and v.dtype == torch.bfloat16:
            v = v.float()
        state[k] = v.to(device)
    return state


def load_optimizer_states(ckpt, rank=0, device="cpu", mmap=False):
    """This rank's list of optimizer state dicts; a truncated or corrupt file is a NanochatError naming it."""
    import torch
    path = ckpt.path(optimizer_filename(rank))
    if not os.path.exists(path):
        raise NanochatError(missing_optimizer_message(path, ckpt.meta))
    try:
        states = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except Exception as e:
        reason = str(e).splitlines()[0].split(". ")[0][:120] if str(e) else ""  # torch's first sentence says it
        raise NanochatError(f"optimizer state is truncated or corrupt ({e.__class__.__name__}: {reason}): "
                            f"{path}") from None
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise NanochatError(f"optimizer state is not a list of optimizer state dicts: {path}")
    return states


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0, verify=None):
    """(model_state, optimizer_states or None, meta) of one complete step, validated first. Tensors come back
    on `device`; bf16 weights loaded onto the CPU are converted to fp32."""
    ckpt = open_checkpoint(checkpoint_dir, step, verify, optimizer_rank=rank if load_optimizer else None)
    state = load_weights(ckpt, device)
    optim = load_optimizer_states(ckpt, rank, device) if load_optimizer else None
    return state, optim, ckpt.meta


def _resolve_device(device):
    import torch
    from nanochat.common import resolve_device_type
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto") or device in ("cuda", "mps", "cpu"):
        return torch.device(resolve_device_type(device))
    return torch.device(device)


def model_from(ckpt, device, phase="eval"):
    """A GPT built from a validated step: on the meta device first, then materialised on `device` and loaded."""
    import torch
    from nanochat.gpt import GPT
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be eval or train, got {phase!r}")
    device = _resolve_device(device)
    state = load_weights(ckpt, "cpu")
    with torch.device("meta"):
        model = GPT(ckpt.config)
    model.to_empty(device=device)
    if ckpt.config.tie_embeddings:  # to_empty materialises each parameter on its own, which unties them
        model.lm_head.weight = model.transformer.wte.weight
    model.init_weights()  # fills non-persistent buffers (rotary tables); the weights are overwritten next
    model.load_state_dict(state, strict=True)
    model.train() if phase == "train" else model.eval()
    return model


def build_model(checkpoint_dir, step, device, phase="eval", verify=None, step_flag="--step"):
    """(model, tokenizer, meta) from one step (None: the newest complete one), validated before the model is built."""
    ckpt = open_checkpoint(checkpoint_dir, step, verify, step_flag=step_flag)
    return model_from(ckpt, device, phase), ckpt.tokenizer, ckpt.meta


def tag_dir(source, model_tag=None):
    """<base>/<source's checkpoints>/<tag>: tag defaults to the most recently modified one."""
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
    if not list_complete_steps(checkpoint_dir):
        raise NanochatError(f"no complete {source} checkpoint in {checkpoint_dir}{_partial_note(checkpoint_dir)}; "
                            f"run `python -m {stage}` first")
    return checkpoint_dir


def load_model(source, device=None, phase="eval", model_tag=None, step=None, verify=None):
    """(model, tokenizer, meta) from <base>/<source's checkpoints>/<tag>/step_N: tag defaults to the most
    recently modified one, step to the newest complete one."""
    return build_model(tag_dir(source, model_tag), step, device, phase, verify)



# -----------------------------------------------------------------------------
# Resuming a post-training stage: its own checkpoint, or the source stage's when it starts fresh

def resume_dir(stage, tag=None):
    """Where `--resume` of a post-training stage continues: <stage's folder>/<tag or the newest tag>."""
    root = checkpoints_root(stage)
    tag = tag or find_latest_tag(root)
    checkpoint_dir = os.path.join(root, tag or "?")
    if tag is None or not (list_complete_steps(checkpoint_dir) or incomplete_steps(checkpoint_dir)):
        which = f"tagged {tag!r} " if tag else ""
        raise NanochatError(f"--resume: no {stage} checkpoint {which}in {root}; run without --resume first")
    return checkpoint_dir


def start_or_resume(stage, source, device, rank=0, resume=False, model_tag=None, step=None, output_tag=None,
                    resume_step=None, verify=None):
    """Where a post-training stage (mid|sft|rl) starts. Fresh: `source`'s checkpoint (tag/step default:
    the newest), saving under <stage's folder>/<output_tag or model_tag or d{n_layer}>. With `resume`:
    this stage's own checkpoint (resume_step, default the newest complete one), its meta and this rank's
    optimizer state, through the validated load path.
    Returns (model, tokenizer, resume_meta or None, optimizer_states or None, checkpoint_dir, start_step)."""
    if resume:
        checkpoint_dir = resume_dir(stage, output_tag or model_tag)
        ckpt = open_checkpoint(checkpoint_dir, resume_step, verify, optimizer_rank=rank, step_flag="--resume-step")
        model = model_from(ckpt, device, phase="train")
        optimizer_states = load_optimizer_states(ckpt, rank, device)
        return model, ckpt.tokenizer, ckpt.meta, optimizer_states, checkpoint_dir, ckpt.step
    checkpoint_dir = tag_dir(source, model_tag)
    model, tokenizer, _ = build_model(checkpoint_dir, step, device, phase="train", verify=verify, step_flag="-s/--step")
    tag = output_tag or model_tag or f"d{model.config.n_layer}"
    return model, tokenizer, None, None, os.path.join(checkpoints_root(stage), tag), 0


def resumed_run_args(stage, args, explicit, may_change, runtime):
    """For a post-training stage's --resume: the run's own arguments from the checkpoint it continues
    (tag: --output-tag, -g or the newest; step: --resume-step or the newest complete one, pinned in
    args.resume_step). A checkpoint whose meta cannot be read is left to start_or_resume, which reports it
    with the steps that pass."""
    checkpoint_dir = resume_dir(stage, args.output_tag or args.model_tag)
    args.resume_step = step = choose_step(checkpoint_dir, args.resume_step)
    try:
        meta = read_meta(checkpoint_dir, step)
    except NanochatError:
        return args
    where = os.path.join(checkpoint_dir, step_dirname(step))
    return continue_run_args(args, explicit, meta, where, may_change, runtime)


def checkpoints_trained_with(fingerprint):
    """Every complete step directory (all stages, all tags) whose meta records this tokenizer fingerprint."""
    found = []
    for stage in STAGE_DIRS:
        root = checkpoints_root(stage)
        for tag in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            for step in list_complete_steps(os.path.join(root, tag)):
                step_dir = os.path.join(root, tag, step_dirname(step))
                try:
                    with open(os.path.join(step_dir, META), "r", encoding="utf-8") as f:
                        recorded = json.load(f).get("tokenizer_fingerprint")
                except (OSError, ValueError, AttributeError):
                    continue  # an unreadable meta is doctor's to report
                if recorded == fingerprint:
                    found.append(step_dir)
    return found
