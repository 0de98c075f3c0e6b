"""
GSM8K (openai/gsm8k, config "main" or "socratic"): grade-school math word problems.

The reference solutions carry calculator annotations, `48/2 = <<48/2=24>>24`; they become tool calls:
a text part up to the annotation, a `python` part with the expression `48/2`, a `python_output` part
with its result `24` (forced in by the engine at inference time, never trained on), then the text goes
on. The final line `#### 72` is the answer; `extract_answer` reads it back from a completion.
"""

import re

from tasks.common import Task, load_split

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
ANSWER = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text):
    """The number after '####' with thousands commas removed (e.g. '1,200' -> '1200'), or None."""
    match = ANSWER.search(text or "")
    if match is None:
        return None
    return match.group(1).replace(",", "")


def answer_to_parts(answer):
    """A GSM8K-style solution (with <<expr=result>> annotations) -> assistant content parts."""
    parts, cursor = [], 0
    for match in ANNOTATION.finditer(answer):
        if match.start() > cursor:
            parts.append({"type": "text", "text": answer[cursor:match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        cursor = match.end()
    if cursor < len(answer):
        parts.append({"type": "text", "text": answer[cursor:]})
    return parts


def parts_text(parts):
    """All the text of assistant content (a string or a list of parts) joined together."""
    if isinstance(parts, str):
        return parts
    return "".join(p["text"] for p in parts)


def problem_conversation(question, answer):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer_to_parts(answer)}]}


def evaluate_final_answer(conversation, completion):
    """True when the completion's '#### N' equals the reference's."""
    reference = extract_answer(parts_text(conversation["messages"][-1]["content"]))
    predicted = extract_answer(completion)
    return predicted is not None and predicted == reference


class GSM8K(Task):

    def __init__(self, subset="main", split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError("GSM8K subset is main|socratic and split is train|test")
        self.ds = load_split("openai/gsm8k", subset, split, data_dir=data_dir)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return problem_conversation(row["question"], row["answer"])

    def evaluate(self, conversation, completion):
        return evaluate_final_answer(conversation, completion)

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))
