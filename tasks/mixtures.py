"""
The task mixtures midtraining and SFT train and validate on: online, the full-size datasets; offline
(no network, the CPU profile), the generated mixtures of tasks/offline.py. `split` is "train" or "val";
online, "val" reads the datasets' held-out test splits.
"""

from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.offline import offline_mid_tasks, offline_sft_tasks
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


def mid_mixture(split, offline):
    """Midtraining: conversations, multiple choice, math with the calculator, who the model is, spelling."""
    if offline:
        return TaskMixture(offline_mid_tasks(split))
    if split != "train":
        return TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                            GSM8K(subset="main", split="test", stop=420)])
    return TaskMixture([
        SmolTalk(split="train"), MMLU(subset="auxiliary_train", split="train"), GSM8K(subset="main", split="train"),
        CustomJSON(filepath=identity_conversations_path()), CustomJSON(filepath=identity_conversations_path()),
        SimpleSpelling(size=200_000, split="train"), SpellingBee(size=80_000, split="train"),
    ])


def sft_mixture(split, offline):
    """SFT: mostly the answers themselves (ARC, GSM8K), a little conversation, who the model is, spelling;
    online, the validation conversations are SmolTalk's test split alone."""
    if offline:
        return TaskMixture(offline_sft_tasks(split))
    if split != "train":
        return SmolTalk(split="test")
    return TaskMixture([
        ARC(subset="ARC-Easy", split="train"), ARC(subset="ARC-Challenge", split="train"),
        GSM8K(subset="main", split="train"), SmolTalk(split="train", stop=10_000),
        CustomJSON(filepath=identity_conversations_path()),
        SimpleSpelling(size=300, split="train"), SpellingBee(size=300, split="train"),
    ])
