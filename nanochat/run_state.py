"""
What a resumed run carries over besides its weights and optimizer state: the random number generators'
state (as plain JSON, so it fits in the checkpoint's meta.json) and the run's own arguments (a resumed
run continues with the flags it was started with; changing one is refused unless it may change).
checkpoint_manager saves and restores both; the stage scripts import them from there.
"""

import argparse
import random

from nanochat.common import NanochatError, print0


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
# A resumed run's arguments: the run's own

def parse_args_noting_explicit(parser, argv=None):
    """(args, names of the flags given on the command line). argparse fills in a default only for a name the
    namespace does not have yet, so parsing into one pre-filled with a sentinel leaves the flags not given at it."""
    defaults = vars(parser.parse_args([]))
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in defaults}))
    explicit = {k for k, v in vars(probe).items() if v is not unset}
    return argparse.Namespace(**{k: (defaults[k] if v is unset else v) for k, v in vars(probe).items()}), explicit


def _flag(name):
    return "--" + name.replace("_", "-")


def continue_run_args(args, explicit, meta, where, may_change=(), runtime=()):
    """The arguments of a resumed run: the run's own (the checkpoint meta's train_args), except `runtime` flags
    (always this invocation's: device, tags, ...) and the `may_change` flags the user gave (applied and logged).
    Any other flag given with a value different from the run's would silently change the run: it is refused
    unless args.override_args."""
    saved = meta.get("train_args")
    if not isinstance(saved, dict) or not saved:
        print0(f"note: {where} records no training arguments (an older checkpoint); the flags are used as given")
        return args
    merged = dict(vars(args))
    override = getattr(args, "override_args", False)
    changed, refused = [], []
    for key, run_value in saved.items():
        if key not in merged or key in runtime:
            continue
        if key not in explicit or merged[key] == run_value:
            merged[key] = run_value
        elif key in may_change or override:
            changed.append(f"{_flag(key)} {run_value} -> {merged[key]}")
        else:
            refused.append(f"{_flag(key)} {merged[key]} (the run used {run_value})")
    if refused:
        raise NanochatError(f"--resume continues the run saved in {where}, but {', '.join(refused)} would change it; "
                            f"drop {'that flag' if len(refused) == 1 else 'those flags'}, "
                            f"or add --override-args to change the run")
    print0(f"resume: continuing the run saved in {where} with its own arguments"
           + (f"; changed: {', '.join(changed)}" if changed else ""))
    return argparse.Namespace(**merged)
