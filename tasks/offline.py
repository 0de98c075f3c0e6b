"""
The offline task mixtures for the CPU-scale pipeline (no network): synthetic arithmetic with the
calculator tool, the two spelling tasks over tasks/words.txt, and the identity conversations.
`split` is "train" or "val"; the "test" split of each generated task is kept for chat_eval.

The sizes were chosen by held-out accuracy on the CPU profile's d4 (dev/BENCHMARKS.md, "Spelling").
"""

from tasks.arithmetic import Arithmetic
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.spellingbee import SimpleSpelling, SpellingBee


def offline_mid_tasks(split="train"):
    return offline_tasks(split, arithmetic=6000, spelling_bee=4000, simple_spelling=6000, identity_copies=8)


def offline_sft_tasks(split="train"):
    return offline_tasks(split, arithmetic=4000, spelling_bee=3000, simple_spelling=3000, identity_copies=4)


def offline_tasks(split, arithmetic, spelling_bee, simple_spelling, identity_copies):
    """The train split: that many examples of each generated task and `identity_copies` passes over the
    identity conversations; any other split: the same 100 validation examples of each generated task."""
    if split == "train":
        identity = CustomJSON(filepath=identity_conversations_path())
        return [Arithmetic(split="train", size=arithmetic), SpellingBee(size=spelling_bee, split="train"),
                SimpleSpelling(size=simple_spelling, split="train")] + [identity] * identity_copies
    return [Arithmetic(split="val", size=100), SpellingBee(size=100, split="val"),
            SimpleSpelling(size=100, split="val")]
