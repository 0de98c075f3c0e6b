"""
ARC (allenai/ai2_arc): grade-school science multiple choice, subsets ARC-Easy and ARC-Challenge,
splits train/validation/test. Rendered as a multiple-choice prompt answered with one letter.
"""

from tasks.common import Task, evaluate_letter, load_split, render_mc


class ARC(Task):

    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise ValueError("ARC subset is ARC-Easy|ARC-Challenge and split is train|validation|test")
        self.ds = load_split("allenai/ai2_arc", subset, split, data_dir=data_dir)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = list(row["choices"]["label"])
        choices = list(row["choices"]["text"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {index}: answer {answer!r} is not one of {letters}")
        # a few rows number their choices 1-4: show them as letters like the rest
        if all(label.isdigit() for label in letters):
            answer = "ABCDEFGHIJ"[letters.index(answer)]
            letters = list("ABCDEFGHIJ"[:len(letters)])
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                             {"role": "assistant", "content": answer}],
                "letters": letters}

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)
