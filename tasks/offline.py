"""
The offline task mixtures for the CPU-scale pipeline (no network): synthetic arithmetic with the
calculator tool, the two spelling tasks over tasks/words.txt, and the identity conversations.
`split` is "train" or "val"; the "test" split of each generated task is kept for chat_eval.
"""

from tasks.arithmetic import Arithmetic
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.spellingbee import SimpleSpelling, SpellingBee


def offline_mid_tasks(split="train"):
    if split == "train":
        identity = CustomJSON(filepath=identity_conversations_path())
        return [Arithmetic(split="train", size=4000), SpellingBee(size=2000, split="train"),
                SimpleSpelling(size=2000, split="train")] + [identity] * 8
    return [Arithmetic(split="val", size=100), SpellingBee(size=100, split="val"),
            SimpleSpelling(size=100, split="val")]


def offline_sft_tasks(split="train"):
    if split == "train":
        identity = CustomJSON(filepath=identity_conversations_path())
        return [Arithmetic(split="train", size=3000), SpellingBee(size=1500, split="train"),
                SimpleSpelling(size=1000, split="train")] + [identity] * 4
    return [Arithmetic(split="val", size=100), SpellingBee(size=100, split="val"),
            SimpleSpelling(size=100, split="val")]
