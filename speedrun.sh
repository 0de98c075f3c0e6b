#!/usr/bin/env bash
# nanochat speedrun: raw text -> tokenizer -> base model -> mid -> SFT (-> RL) -> evals -> report.md
#
#   bash speedrun.sh                 # 8xGPU node: the d20 run; a machine without GPUs: the CPU profile, offline
#   NANOCHAT_PROFILE=cpu bash speedrun.sh     # force the CPU profile (embedded corpus, small model)
#   NANOCHAT_PROFILE=smoke bash speedrun.sh   # every stage for a few steps (what the tests run)
#   NANOCHAT_PROFILE=rehearsal HF_ENDPOINT=... NANOCHAT_EVAL_BUNDLE_URL=... bash speedrun.sh
#                                    # the GPU profile on CPU: 2 ranks under torchrun, tiny sizes (tests run it)
#   WITH_RL=1 bash speedrun.sh       # also run chat_rl + its eval
#   FRESH=1 bash speedrun.sh         # forget finished stages and start over
#
# Knobs (environment variables): NANOCHAT_BASE_DIR (artifacts, default ~/.cache/nanochat), NANOCHAT_PROFILE
# (gpu|rehearsal|cpu|smoke, default: gpu when nvidia-smi sees a GPU, else cpu), NPROC (GPUs to use, default all;
# rehearsal: 2 CPU ranks), DEPTH, DEVICE_BATCH_SIZE, VOCAB_SIZE, MAX_SEQ_LEN, NUM_SHARDS (gpu: shards fetched before
# the tokenizer), BASE_ITERS/MID_ITERS/SFT_ITERS and BASE_WARMDOWN (CPU/smoke profiles), ITERS (rehearsal),
# SKIP_SETUP=1 (use $PYTHON or python3 instead of creating .venv), UNSAFE_EXECUTION=1 (gpu: let chat_eval run
# HumanEval's model-written code even where the kernel cannot confine it; by default the doctor stage refuses).
#
# Every stage logs to $NANOCHAT_BASE_DIR/logs/<stage>.log as well as the screen. A finished stage leaves a
# marker in $NANOCHAT_BASE_DIR/speedrun_done/, so rerunning after a failure resumes at the failed stage.
set -euo pipefail
LAUNCH_DIR="$PWD"   # report.md is copied here at the end
cd "$(dirname "$0")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR/logs" "$NANOCHAT_BASE_DIR/speedrun_done"
LOGS="$NANOCHAT_BASE_DIR/logs"
DONE="$NANOCHAT_BASE_DIR/speedrun_done"
if [ "${FRESH:-0}" = 1 ]; then rm -f "$DONE"/* "$DONE"/.[!.]*; fi

# --- profile
if [ -z "${NANOCHAT_PROFILE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        NANOCHAT_PROFILE=gpu
    else
        NANOCHAT_PROFILE=cpu
    fi
fi
case "$NANOCHAT_PROFILE" in
    gpu|rehearsal|cpu|smoke) ;;
    *) echo "error: NANOCHAT_PROFILE must be gpu, rehearsal, cpu or smoke (got '$NANOCHAT_PROFILE')" >&2; exit 2 ;;
esac
if [ "$NANOCHAT_PROFILE" = gpu ] && \
   ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then
    echo "error: NANOCHAT_PROFILE=gpu but nvidia-smi sees no GPU; fix the driver," \
         "or rehearse on CPU with NANOCHAT_PROFILE=rehearsal" >&2
    exit 2
fi
SECONDS=0

# --- environment: a venv with nanochat and our Rust tokenizer trainer (built by maturin)
if [ "${SKIP_SETUP:-0}" != 1 ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e .
    PY="$PWD/.venv/bin/python"
else
    PY="${PYTHON:-$(command -v python3)}"
fi
# the venv's tools (torchrun, hf, ...) first on PATH, so nothing runs under another Python by accident
export PATH="$(dirname "$PY"):$PATH"

# run_stage NAME CMD...: run CMD unless NAME already finished; tee its output to the stage log; stop on failure.
run_stage() {
    local name="$1"; shift
    if [ -f "$DONE/$name" ]; then
        echo "== $name: already done (rm $DONE/$name to redo)"
        return 0
    fi
    echo "== $name: $*"
    local start=$SECONDS
    if "$@" 2>&1 | tee "$LOGS/$name.log"; then
        touch "$DONE/$name"
        echo "== $name: done in $((SECONDS - start))s"
    else
        echo "error: stage '$name' failed after $((SECONDS - start))s; see $LOGS/$name.log, fix it, and rerun bash speedrun.sh to resume here" >&2
        exit 1
    fi
}

# resumable_stage NAME CMD...: like run_stage, but when a previous attempt of this stage was interrupted
# after it had saved a checkpoint, the rerun adds --resume (the script continues exactly from it).
resumable_stage() {
    local name="$1" ckpt="$2"; shift 2
    if [ ! -f "$DONE/$name" ] && [ -f "$DONE/.$name.started" ] && \
       ls "$NANOCHAT_BASE_DIR/$ckpt"/*/step_*/COMPLETE >/dev/null 2>&1; then
        run_stage "$name" "$@" --resume
    else
        [ -f "$DONE/$name" ] || touch "$DONE/.$name.started"
        run_stage "$name" "$@"
    fi
}

# --- per-profile settings
# TORCHRUN: how stages run (all GPUs on a GPU node, one process on CPU); "--" separates torchrun's flags.
if [ "$NANOCHAT_PROFILE" = gpu ] || [ "$NANOCHAT_PROFILE" = rehearsal ]; then
    # SIZE_*: what the rehearsal changes (sizes and the device); the stages, launches and flags are the same
    if [ "$NANOCHAT_PROFILE" = gpu ]; then
        NPROC="${NPROC:-$(nvidia-smi -L | grep -c GPU)}"
        DEPTH="${DEPTH:-20}"; VOCAB_SIZE="${VOCAB_SIZE:-65536}"; MAX_SEQ_LEN="${MAX_SEQ_LEN:-2048}"
        DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-32}"; NUM_SHARDS="${NUM_SHARDS:-8}"; MAX_CHARS=2000000000
        SIZE_BASE=(); SIZE_BASE_EVAL=(); SIZE_MID=(); SIZE_SFT=(); SIZE_EVAL=(); SIZE_RL=()
        echo "nanochat speedrun: GPU profile, depth $DEPTH on $NPROC GPU(s), logs in $LOGS"
    else
        # The GPU profile rehearsed on CPU: NPROC ranks on gloo, hub data from HF_ENDPOINT, the CORE bundle
        # from NANOCHAT_EVAL_BUNDLE_URL, a tiny model and a few steps of every stage.
        NPROC="${NPROC:-2}"
        DEPTH="${DEPTH:-1}"; VOCAB_SIZE="${VOCAB_SIZE:-512}"; MAX_SEQ_LEN="${MAX_SEQ_LEN:-128}"
        DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-2}"; NUM_SHARDS="${NUM_SHARDS:-3}"; MAX_CHARS=2000000
        ITERS="${ITERS:-2}"; EVAL_PROBLEMS="${EVAL_PROBLEMS:-4}"; WITH_RL="${WITH_RL:-1}"
        ROWS=$((NPROC * DEVICE_BATCH_SIZE * MAX_SEQ_LEN))
        SIZE_BASE=(--device cpu --total-batch-size "$ROWS" --num-iterations "$((2 * ITERS))" --eval-every "$ITERS"
                   --eval-tokens "$ROWS" --sample-every 0 --save-every "$ITERS")
        SIZE_BASE_EVAL=(--device cpu --device-batch-size "$DEVICE_BATCH_SIZE" --split-tokens "$ROWS"
                        --core-max-per-task "$EVAL_PROBLEMS")
        SIZE_MID=(--device cpu --total-batch-size "$ROWS" --num-iterations "$ITERS" --eval-every 0 --eval-steps 2)
        SIZE_SFT=(--device cpu --num-iterations "$ITERS" --device-batch-size 2 --target-examples-per-step 4
                  --eval-every 0 --eval-steps 2 --eval-metrics-every 0 --eval-max-problems 2 --eval-max-new-tokens 8)
        SIZE_EVAL=(--device cpu -x "$EVAL_PROBLEMS" -m 8)
        SIZE_RL=(--device cpu --num-iterations 1 --examples-per-step "$NPROC" --num-samples 2 --device-batch-size 2
                 --max-new-tokens 8 --eval-every 0 --eval-examples "$EVAL_PROBLEMS" --pass-k 1)
        echo "nanochat speedrun: rehearsal of the GPU profile on CPU: $NPROC ranks, depth $DEPTH, logs in $LOGS"
    fi
    TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m)  # = torchrun, this venv's
    SEP=(--)
    DATA_ARGS=(-n "$NUM_SHARDS")
    TOK_ARGS=(--max-chars "$MAX_CHARS" --vocab-size "$VOCAB_SIZE")
    BASE_ARGS=(--depth "$DEPTH" --device-batch-size "$DEVICE_BATCH_SIZE" --max-seq-len "$MAX_SEQ_LEN" "${SIZE_BASE[@]}")
    BASE_EVAL_ARGS=("${SIZE_BASE_EVAL[@]}")
    MID_ARGS=(--device-batch-size "$DEVICE_BATCH_SIZE" "${SIZE_MID[@]}")
    SFT_ARGS=("${SIZE_SFT[@]}")
    EVAL_ARGS=("${SIZE_EVAL[@]}")
    MID_EVAL_ARGS=("${SIZE_EVAL[@]}")
    # chat_eval's default tasks include HumanEval, which runs model-written code: the doctor stage stops the run
    # before training when the kernel cannot confine it (UNSAFE_EXECUTION=1 runs it unconfined instead)
    if [ "${UNSAFE_EXECUTION:-0}" = 1 ]; then
        DOCTOR_ARGS=(); EVAL_ARGS+=(--unsafe-execution); MID_EVAL_ARGS+=(--unsafe-execution)
    else
        DOCTOR_ARGS=(--require-sandbox)
    fi
    RL_ARGS=("${SIZE_RL[@]}")
else
    # CPU and smoke: one process, embedded offline corpus, offline tasks, small vocab and model.
    DOCTOR_ARGS=()
    TORCHRUN=("$PY" -m)
    SEP=()
    if [ "$NANOCHAT_PROFILE" = cpu ]; then
        # depth 3 (width 192) rather than 4: in the same wall-clock it trains 1.8x the tokens and reaches a
        # lower val bpb (dev/BENCHMARKS.md, "Learning per minute"); 2,000 pretraining steps (~3.6 passes: a long
        # document shows a new window in each, so the extra steps are new text); the final evals use every held-out problem
        DEPTH="${DEPTH:-3}"; VOCAB_SIZE="${VOCAB_SIZE:-4096}"; MAX_SEQ_LEN="${MAX_SEQ_LEN:-256}"
        DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-16}"; BASE_WARMDOWN="${BASE_WARMDOWN:-0.5}"
        BASE_ITERS="${BASE_ITERS:-2000}"; MID_ITERS="${MID_ITERS:-700}"; SFT_ITERS="${SFT_ITERS:-300}"
        EVAL_PROBLEMS="${EVAL_PROBLEMS:-256}"; MAX_CHARS=40000000; SFT_LR_FRAC="${SFT_LR_FRAC:-0.3}"
        echo "nanochat speedrun: CPU profile (no GPU found): embedded offline corpus, depth $DEPTH, vocab $VOCAB_SIZE;"
        echo "  every stage runs, sized for ~30 minutes on 2 cores. Logs in $LOGS"
    else
        DEPTH="${DEPTH:-1}"; VOCAB_SIZE="${VOCAB_SIZE:-512}"; MAX_SEQ_LEN="${MAX_SEQ_LEN:-128}"
        DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-2}"
        BASE_ITERS="${BASE_ITERS:-3}"; MID_ITERS="${MID_ITERS:-2}"; SFT_ITERS="${SFT_ITERS:-2}"; RL_ITERS="${RL_ITERS:-1}"
        EVAL_PROBLEMS="${EVAL_PROBLEMS:-2}"; MAX_CHARS=2000000; SFT_LR_FRAC="${SFT_LR_FRAC:-0.3}"
        echo "nanochat speedrun: smoke profile: every stage for a few steps (checks that the stages fit together)"
    fi
    DATA_ARGS=(--embedded)
    TOK_ARGS=(--max-chars "$MAX_CHARS" --vocab-size "$VOCAB_SIZE")
    ROWS=$((DEVICE_BATCH_SIZE * MAX_SEQ_LEN))
    BASE_ARGS=(--depth "$DEPTH" --device-batch-size "$DEVICE_BATCH_SIZE" --max-seq-len "$MAX_SEQ_LEN"
               --total-batch-size "$ROWS" --num-iterations "$BASE_ITERS" --eval-every "$(( BASE_ITERS / 4 > 0 ? BASE_ITERS / 4 : 1 ))"
               --eval-tokens "$(( ROWS * 8 ))" --sample-every 0 --save-every "$(( BASE_ITERS / 2 > 0 ? BASE_ITERS / 2 : 1 ))"
               --device cpu --value-embeds --smear)
    # value embeddings and smear: per-token parameters at almost no FLOPs, -0.20 val bpb at the CPU profile's
    # size in the same steps (dev/BENCHMARKS.md, "Learning per minute"); the smoke profile rehearses them too.
    # The CPU profile's own warmdown; otherwise base_train's default.
    if [ -n "${BASE_WARMDOWN:-}" ]; then BASE_ARGS+=(--warmdown-ratio "$BASE_WARMDOWN"); fi
    BASE_EVAL_ARGS=(--device cpu --device-batch-size "$DEVICE_BATCH_SIZE" --split-tokens "$(( ROWS * 16 ))" --skip-core)
    MID_ARGS=(--offline --device cpu --device-batch-size "$DEVICE_BATCH_SIZE" --max-seq-len "$MAX_SEQ_LEN"
              --num-iterations "$MID_ITERS" --eval-every 0 --eval-steps 4)
    # Generation budget of the evals and RL: the longest held-out answer (an arithmetic problem with five calculator
    # calls) is 128 tokens with the CPU profile's tokenizer; a smaller budget fails such answers however right they are
    GEN_TOKENS=160
    # SFT starts at a larger fraction of the base LRs than on GPU (0.02 is tuned for d20; a tiny model needs more)
    SFT_ARGS=(--offline --device cpu --num-iterations "$SFT_ITERS" --device-batch-size 8 --target-examples-per-step 16
              --init-lr-frac "$SFT_LR_FRAC" --eval-every 0 --eval-steps 4 --eval-metrics-every 0
              --eval-max-problems "$(( EVAL_PROBLEMS / 5 > 1 ? EVAL_PROBLEMS / 5 : 1 ))" --eval-max-new-tokens "$GEN_TOKENS")
    MID_EVAL_ARGS=(--offline --device cpu -a "Arithmetic|SpellingBee|SimpleSpelling" -x "$(( EVAL_PROBLEMS / 2 > 1 ? EVAL_PROBLEMS / 2 : 1 ))" -m "$GEN_TOKENS")
    EVAL_ARGS=(--offline --device cpu -x "$EVAL_PROBLEMS" -m "$GEN_TOKENS")
    RL_ARGS=(--offline --device cpu --num-iterations "${RL_ITERS:-20}" --examples-per-step 4 --num-samples 4
             --device-batch-size 8 --max-new-tokens "$GEN_TOKENS" --eval-every 0 --eval-examples "$EVAL_PROBLEMS" --pass-k 2)
fi

# --- data and tokenizer (on GPU nodes the rest of the shards download while the tokenizer trains)
run_stage report_reset "$PY" -m nanochat.report reset
run_stage data "$PY" -m nanochat.dataset "${DATA_ARGS[@]}"
DATA_PID=""
if [ "$NANOCHAT_PROFILE" = gpu ] || [ "$NANOCHAT_PROFILE" = rehearsal ]; then
    # Shards needed for the Chinchilla token budget: computed by base_train from the model size.
    # 20 tokens/param (Chinchilla), ~4.8 chars/token, ~250M chars/shard, +20% slack, +1 for validation.
    SHARDS="$("$PY" - "$DEPTH" "$VOCAB_SIZE" "$MAX_SEQ_LEN" <<'PYEOF'
import math, sys, torch
from nanochat.gpt import GPT, config_from_depth
depth, vocab, seq = map(int, sys.argv[1:])
with torch.device("meta"):
    n = GPT(config_from_depth(depth, vocab, sequence_len=seq)).num_params()
print(math.ceil(20 * n * 4.8 / 250e6 * 1.2) + 1)
PYEOF
)"
    echo "downloading $SHARDS shards in the background (log: $LOGS/data_all.log)"
    "$PY" -m nanochat.dataset -n "$SHARDS" > "$LOGS/data_all.log" 2>&1 &
    DATA_PID=$!
fi
run_stage tok_train "$PY" -m scripts.tok_train "${TOK_ARGS[@]}"
run_stage tok_eval "$PY" -m scripts.tok_eval
if [ -n "$DATA_PID" ]; then
    wait "$DATA_PID" || { echo "error: shard download failed; see $LOGS/data_all.log, then rerun bash speedrun.sh" >&2; exit 1; }
fi

# --- pretraining, midtraining, SFT (and RL), each followed by its evaluation
run_stage doctor "$PY" -m nanochat.doctor --depth "$DEPTH" --device-batch-size "$DEVICE_BATCH_SIZE" --max-seq-len "$MAX_SEQ_LEN" \
    "${DOCTOR_ARGS[@]}"
resumable_stage base_train base_checkpoints "${TORCHRUN[@]}" scripts.base_train "${SEP[@]}" "${BASE_ARGS[@]}"
run_stage base_eval "${TORCHRUN[@]}" scripts.base_eval "${SEP[@]}" "${BASE_EVAL_ARGS[@]}"
resumable_stage mid_train mid_checkpoints "${TORCHRUN[@]}" scripts.mid_train "${SEP[@]}" "${MID_ARGS[@]}"
run_stage mid_eval "${TORCHRUN[@]}" scripts.chat_eval "${SEP[@]}" -i mid "${MID_EVAL_ARGS[@]}"
resumable_stage chat_sft chatsft_checkpoints "${TORCHRUN[@]}" scripts.chat_sft "${SEP[@]}" "${SFT_ARGS[@]}"
run_stage sft_eval "${TORCHRUN[@]}" scripts.chat_eval "${SEP[@]}" -i sft "${EVAL_ARGS[@]}"
if [ "${WITH_RL:-0}" = 1 ] || [ "$NANOCHAT_PROFILE" = smoke ]; then
    resumable_stage chat_rl chatrl_checkpoints "${TORCHRUN[@]}" scripts.chat_rl "${SEP[@]}" "${RL_ARGS[@]}"
    run_stage rl_eval "${TORCHRUN[@]}" scripts.chat_eval "${SEP[@]}" -i rl "${EVAL_ARGS[@]}"
fi

# --- the report card
(cd "$LAUNCH_DIR" && "$PY" -m nanochat.report generate) | tee "$LOGS/report.log"
echo "speedrun ($NANOCHAT_PROFILE profile) finished in $((SECONDS / 60))m$((SECONDS % 60))s; report: $LAUNCH_DIR/report.md"
echo "talk to your model:  $PY -m scripts.chat_cli   or   $PY -m scripts.chat_web   (then open http://127.0.0.1:8000)"
