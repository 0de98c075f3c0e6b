"""
CustomJSON: conversations from a JSONL file, one per line, each either `{"messages": [...]}` or a bare
list of messages. The repo ships tasks/identity_conversations.jsonl (who the model is).
"""

import os

from nanochat.common import NanochatError, iter_jsonl
from tasks.common import Task


def identity_conversations_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_conversations.jsonl")


class CustomJSON(Task):

    def __init__(self, filepath=None, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath or identity_conversations_path()
        if not os.path.exists(self.filepath):
            raise NanochatError(f"conversation file not found: {self.filepath}")
        self.conversations = []
        for lineno, item in iter_jsonl(self.filepath):
            messages = item["messages"] if isinstance(item, dict) else item
            if not isinstance(messages, list) or len(messages) < 2 or \
                    any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in messages):
                raise NanochatError(f"{self.filepath}:{lineno} is not a conversation "
                                    "(want a list of {role, content} messages)")
            self.conversations.append({"messages": messages})

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]

    def evaluate(self, conversation, completion):
        raise NotImplementedError("CustomJSON conversations are for training")
