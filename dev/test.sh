#!/usr/bin/env bash
# Set up everything the tests need, then run them: the Rust crate's unit tests and the Python suite.
# The suite includes what users run: the smoke profile through `bash speedrun.sh` with its own setup
# (a plain `pip install -e .` venv in .cache/fresh_install/), the GPU profile rehearsed on CPU with
# 2 torchrun ranks against a local hub mirror, and a 2-node torchrun rendezvous on loopback.
#   bash dev/test.sh            # from a fresh clone; safe to rerun (reuses .venv)
#   bash dev/test.sh -k tokenizer   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# --- Python environment: a venv with nanochat (and our Rust rustbpe, built by maturin) + test extras
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# --- PyPI rustbpe 0.1.0, installed aside (not as `rustbpe`), for the merge-for-merge equality tests
export RUSTBPE_PYPI_PATH="$PWD/.cache/pypi_rustbpe"
if [ ! -d "$RUSTBPE_PYPI_PATH/rustbpe" ]; then
    .venv/bin/python -m pip install -q --no-deps --target "$RUSTBPE_PYPI_PATH" rustbpe==0.1.0
fi

# --- libseccomp for the code sandbox's syscall filter (on every Debian system; installed if missing)
if ! ldconfig -p 2>/dev/null | grep 'libseccomp\.so\.2' >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libseccomp2 >/dev/null) \
        || echo "warning: could not install libseccomp2; model-written code will be refused"
fi

# --- a real browser for the web chat test (Debian's chromium; needs root for apt)
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the browser test will be skipped"
fi

# --- Rust unit tests, then the Python suite
(cd rustbpe && cargo test -q)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python -m pytest -q "$@"
