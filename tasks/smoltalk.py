"""
SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations, splits train/test. Each row's
`messages` list is a conversation as is (an optional system message first, then user/assistant turns).
"""

from tasks.common import Task, load_split


class SmolTalk(Task):

    def __init__(self, split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError("SmolTalk split is train|test")
        self.ds = load_split("HuggingFaceTB/smol-smoltalk", None, split, data_dir=data_dir)

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.ds[index]["messages"]]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        raise NotImplementedError("SmolTalk is for training and validation loss, not for accuracy")
