#!/usr/bin/env bash
# GPU reality check: every CUDA path the speedrun uses, on one GPU, in <= 8 minutes; one summary table.
#   bash dev/gpu_check.sh                 # on a CUDA machine (d20, vocab 65536, seq 2048, bf16)
#   bash dev/gpu_check.sh --dry-run       # the same checks on CPU at toy sizes
#   bash dev/gpu_check.sh --prepare DIR   # corpus + tokenizer into DIR, for a GPU box without a Rust toolchain
#   bash dev/gpu_check.sh --assets DIR    # ... then use it there
# Python: $PYTHON, else .venv/bin/python, else python3. See dev/gpu_check.py for what each check does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" dev/gpu_check.py "$@"
