"""
The GPU profile rehearsed on CPU: `NANOCHAT_PROFILE=rehearsal bash speedrun.sh` runs the GPU profile's stage
list with the same torchrun launches and flags (2 ranks on gloo, a tiny model, a few steps). Every download
goes to a local server that looks like the real sources, reached through the switches a user with a mirror
sets: HF_ENDPOINT (FineWeb-style shards and the hub datasets SmolTalk, MMLU, ARC, GSM8K, HumanEval, in their
real file layouts and columns) and NANOCHAT_EVAL_BUNDLE_URL (a small generated CORE bundle).

Checked: every stage ran under torchrun with 2 ranks and each loaded the previous stage's 2-rank checkpoint,
the data came from the mirror, CORE and chat_eval give the same numbers on one rank as on two, the report
card is complete, and a rerun resumes (finished stages skipped; an interrupted base_train continues from
its last checkpoint to the same weights).
"""

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers_http import HubMirror
from tests.test_core_eval import bundle_zip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SHARDS_TOTAL = 1823  # the real set: shard_00000 .. shard_01822 (the last is validation)
STAGES = ["data", "tok_train", "tok_eval", "doctor", "base_train", "base_eval", "mid_train", "mid_eval",
          "chat_sft", "sft_eval", "chat_rl", "rl_eval"]
TORCHRUN_STAGES = {"base_train": "scripts.base_train", "base_eval": "scripts.base_eval",
                   "mid_train": "scripts.mid_train", "mid_eval": "scripts.chat_eval", "chat_sft": "scripts.chat_sft", "sft_eval": "scripts.chat_eval",
                   "chat_rl": "scripts.chat_rl", "rl_eval": "scripts.chat_eval"}


# -----------------------------------------------------------------------------
# The mirror's contents: small, generated, in the real layouts

def parquet(rows, row_group_size=None):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


def words():
    with open(os.path.join(REPO, "tasks", "words.txt")) as f:
        return [w.strip() for w in f if w.strip()][:3000]


def fineweb_shards(rng, vocab):
    def doc():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(40, 160))).capitalize() + "."
    indices = [0, 1, 2, NUM_SHARDS_TOTAL - 1]
    return {f"shard_{i:05d}.parquet": parquet([{"text": doc()} for _ in range(60)], row_group_size=15)
            for i in indices}


def hub_datasets(rng, vocab):
    def sentence(n=8):
        return " ".join(rng.choice(vocab) for _ in range(n))

    def chat(_):
        return {"messages": [{"content": sentence() + "?", "role": "user"},
                             {"content": sentence(12) + ".", "role": "assistant"}], "source": "generated"}

    def mmlu(_):
        return {"question": sentence() + "?", "subject": "misc", "choices": [sentence(2) for _ in range(4)],
                "answer": rng.randrange(4)}

    def arc(i):
        return {"id": f"gen-{i}", "question": sentence() + "?", "answerKey": "ABCD"[rng.randrange(4)],
                "choices": {"text": [sentence(2) for _ in range(4)], "label": list("ABCD")}}

    def gsm8k(_):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return {"question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
                "answer": f"Sam has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}

    def humaneval(i):
        return {"task_id": f"HumanEval/{i}", "prompt": f'def add_{i}(x):\n    """Return x plus {i}."""\n',
                "canonical_solution": f"    return x + {i}\n",
                "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n", "entry_point": f"add_{i}"}

    def rows(make, n=12):
        return parquet([make(i) for i in range(n)])

    one = "-00000-of-00001.parquet"
    return {
        "HuggingFaceTB/smol-smoltalk": {f"data/train{one}": rows(chat, 40), f"data/test{one}": rows(chat)},
        "cais/mmlu": {f"all/test{one}": rows(mmlu), f"auxiliary_train/train{one}": parquet(
            [{"train": mmlu(i)} for i in range(24)])},  # the hub nests each auxiliary_train row under "train"
        "allenai/ai2_arc": {f"{subset}/{split}{one}": rows(arc) for subset in ("ARC-Easy", "ARC-Challenge")
                            for split in ("train", "validation", "test")},
        "openai/gsm8k": {f"main/train{one}": rows(gsm8k, 24), f"main/test{one}": rows(gsm8k)},
        "openai/openai_humaneval": {f"openai_humaneval/test{one}": rows(humaneval, 6)},
    }


# -----------------------------------------------------------------------------
# The run

def run_speedrun(base_dir, env, timeout=900):
    return subprocess.run(["bash", os.path.join(REPO, "speedrun.sh")], cwd=str(base_dir), env=env,
                          capture_output=True, text=True, timeout=timeout)


def stage_log(base_dir, stage):
    return (base_dir / "logs" / f"{stage}.log").read_text()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    rng = random.Random(0)
    vocab = words()
    repos = dict(hub_datasets(rng, vocab), **{"karpathy/fineweb-edu-100b-shuffle": fineweb_shards(rng, vocab)})
    base_dir = tmp_path_factory.mktemp("rehearsal")
    with HubMirror(repos, files={"eval_bundle.zip": bundle_zip()}) as hub:
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_PROFILE="rehearsal", SKIP_SETUP="1",
                   PYTHON=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_ENDPOINT=hub.url,
                   HF_HOME=str(base_dir / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                   NANOCHAT_EVAL_BUNDLE_URL=hub.url + "/files/eval_bundle.zip")
        env.pop("NANOCHAT_TASK_DATA", None)
        proc = run_speedrun(base_dir, env)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        yield base_dir, proc.stdout, hub, env


def test_every_stage_of_the_gpu_profile_runs_under_torchrun_with_two_ranks(rehearsal):
    base_dir, out, _, _ = rehearsal
    positions = [out.find(f"== {s}: done") for s in STAGES]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), dict(zip(STAGES, positions))
    for stage, module in TORCHRUN_STAGES.items():
        launch = re.search(rf"^== {stage}: (.*)$", out, re.M).group(1)
        assert f"-m torch.distributed.run --standalone --nproc_per_node=2 -m {module} --" in launch, launch
    # each training stage saved a 2-rank checkpoint (one optimizer shard per rank) that the next stage loaded
    for family in ("base", "mid", "chatsft", "chatrl"):
        steps = sorted((base_dir / f"{family}_checkpoints").glob("*/step_*/COMPLETE"))
        assert steps, family
        step_dir = steps[-1].parent
        assert sorted(p.name for p in step_dir.glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]
        assert json.loads(next(step_dir.glob("meta*.json")).read_text()).get("world_size") == 2


def test_all_data_came_from_the_mirror_through_the_users_switches(rehearsal):
    _, _, hub, _ = rehearsal
    paths = {p for _, p, status in hub.requests if status in (200, 206)}
    for i in (0, 1, 2, NUM_SHARDS_TOTAL - 1):
        assert f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet" in paths
    for repo in ("HuggingFaceTB/smol-smoltalk", "cais/mmlu", "allenai/ai2_arc", "openai/gsm8k",
                 "openai/openai_humaneval"):
        assert any(p.startswith(f"/datasets/{repo}/resolve/") for p in paths), repo
    assert "/files/eval_bundle.zip" in paths


def single_rank(base_dir, env, module, args):
    """Run an eval stage as one plain process on a copy of the run's artifacts (the report stays untouched)."""
    copy = base_dir.parent / (base_dir.name + "_one_rank")
    if not copy.exists():
        shutil.copytree(base_dir, copy, ignore=shutil.ignore_patterns("report.md"))
    env = dict(env, NANOCHAT_BASE_DIR=str(copy))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def eval_args(out, stage):
    """The flags speedrun.sh gave a stage (after torchrun's `--`)."""
    launch = re.search(rf"^== {stage}: (.*)$", out, re.M).group(1)
    return launch.split(" -- ", 1)[1].split()


def test_core_and_chat_eval_numbers_on_two_ranks_equal_one_rank(rehearsal):
    base_dir, out, _, env = rehearsal
    two = stage_log(base_dir, "base_eval")
    one = single_rank(base_dir, env, "scripts.base_eval", eval_args(out, "base_eval"))
    core_lines = lambda text: [l for l in text.splitlines()
                               if ("accuracy" in l and "centered" in l) or l.startswith("CORE:")]
    strip_time = lambda lines: [re.sub(r"\| [0-9.]+s$", "", l) for l in lines]
    assert re.search(r"^CORE: -?[0-9.]+", two, re.M), two[-2000:]
    assert strip_time(core_lines(one)) == strip_time(core_lines(two))
    two = stage_log(base_dir, "sft_eval")
    one = single_rank(base_dir, env, "scripts.chat_eval", eval_args(out, "sft_eval"))
    scores = lambda text: [re.sub(r", [0-9hms]+\)$", ")", l) for l in text.splitlines()
                           if " accuracy: " in l or l.startswith("ChatCORE:")]
    assert len(scores(two)) == 7, two[-2000:]  # ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee + ChatCORE
    assert scores(one) == scores(two)


def test_the_report_card_has_every_section_and_summary_row(rehearsal):
    base_dir, _, _, _ = rehearsal
    report = (base_dir / "report.md").read_text()
    for section in ("Tokenizer training", "Base model training", "Base model evaluation", "Midtraining",
                    "Chat evaluation mid", "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"):
        assert f"## {section}" in report, section
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert re.fullmatch(r"-?[0-9.]+", rows["CORE"][0]), rows["CORE"]  # BASE column: CORE was computed
    for row in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"):
        assert all(re.fullmatch(r"-?[0-9.]+", c) for c in rows[row][1:3]), (row, rows[row])  # MID and SFT
    assert re.fullmatch(r"-?[0-9.]+", rows["GSM8K"][3]), rows["GSM8K"]  # RL


def test_a_rerun_skips_finished_stages_and_an_interrupted_base_train_resumes_to_the_same_weights(rehearsal):
    base_dir, _, _, env = rehearsal
    proc = run_speedrun(base_dir, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(f"== {s}: already done" in proc.stdout for s in STAGES), proc.stdout[-3000:]
    # base_train "dies" after its first checkpoint: drop the last one and the done marker, then rerun
    steps = sorted((base_dir / "base_checkpoints").glob("*/step_*"))
    assert len(steps) >= 2
    final = {p.name: p.read_bytes() for p in steps[-1].glob("*.safetensors")}
    shutil.rmtree(steps[-1])
    os.remove(base_dir / "speedrun_done" / "base_train")
    proc = run_speedrun(base_dir, env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    launch = re.search(r"^== base_train: (.*)$", proc.stdout, re.M).group(1)
    assert launch.endswith("--resume") and "== base_eval: already done" in proc.stdout
    assert {p.name: p.read_bytes() for p in steps[-1].glob("*.safetensors")} == final
