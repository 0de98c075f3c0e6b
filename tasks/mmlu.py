"""
MMLU (cais/mmlu): multiple choice over 57 subjects. Config "all" (splits test/validation/dev) for
evaluation, "auxiliary_train" (split train) for midtraining. Four choices, answered A-D.
"""

from tasks.common import LETTERS, Task, evaluate_letter, load_split, render_mc


class MMLU(Task):

    eval_type = "categorical"

    def __init__(self, subset="all", split="test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError("MMLU subset is all|auxiliary_train")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train has only the train split")
        self.ds = load_split("cais/mmlu", subset, split, data_dir=data_dir)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if "train" in row and isinstance(row["train"], dict):  # auxiliary_train nests each row
            row = row["train"]
        choices = list(row["choices"])
        letters = list(LETTERS[:len(choices)])
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                             {"role": "assistant", "content": letters[int(row["answer"])]}],
                "letters": letters, "subject": row.get("subject", "")}

    def evaluate(self, conversation, completion):
        return evaluate_letter(conversation, completion)
