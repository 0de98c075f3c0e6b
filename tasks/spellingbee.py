"""
Spelling tasks over an offline word list (tasks/words.txt), generated deterministically.

- SpellingBee: "How many r are in strawberry?" The answer spells the word out, counts with the
  calculator tool (`'strawberry'.count('r')`) and ends with '#### 3'.
- SimpleSpelling: "Spell the word: apple" -> "a-p-p-l-e".

Words are split into train/val/test by a hash of the word (tasks/splits.py): a held-out split never
contains a word seen in training. The train split also gets the ~5,000 words of tasks/words_extra.txt
(never a held-out one): spelling a new word takes knowing the letters of its tokens, which a small
model learns only from seeing many words spelled.
"""

import functools
import os
import random
import re

from tasks.common import Task
from tasks.gsm8k import extract_answer
from tasks.splits import check_split, split_of

WORDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "words.txt")
SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")


@functools.lru_cache(maxsize=None)
def load_words(path=WORDS_PATH):
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))


EXTRA_TRAIN_WORDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "words_extra.txt")


@functools.lru_cache(maxsize=None)
def words_of_split(split, path=WORDS_PATH):
    """The words of one split of words.txt; the train split also gets words_extra.txt's, so that the
    model sees the letters of many more tokens while val/test stay the same held-out words."""
    words = tuple(w for w in load_words(path) if split_of("word:" + w) == split)
    if split == "train" and path == WORDS_PATH:
        held_out = set(words_of_split("val")) | set(words_of_split("test"))
        words += tuple(w for w in load_words(EXTRA_TRAIN_WORDS_PATH) if w not in held_out)
    return words


def clean_completion(text):
    """A sampled completion without special tokens and surrounding whitespace."""
    return SPECIAL_TOKEN.sub("", text).strip()


COUNT_QUESTIONS = [
    "How many {letter} are in {word}?",
    "How many times does the letter {letter} appear in \"{word}\"?",
    "Count the {letter}'s in the word {word}.",
    "how many {letter} in {word}",
    "In the word '{word}', how many letters are {letter}?",
    "What is the number of '{letter}' characters in {word}?",
]
SPELL_QUESTIONS = [
    "Spell the word: {word}",
    "How do you spell {word}?",
    "Spell {word} letter by letter.",
    "spell {word}",
]


class WordTask(Task):
    """`size` examples over the words of one split; example i is a pure function of (split, seed, i), drawn
    from a random stream named after the task (`rng_name`), so that each task asks about its own words."""
    rng_name = None

    def __init__(self, size=1000, split="train", seed=0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.split, self.seed = size, check_split(split), seed
        self.words = words_of_split(self.split)

    def num_examples(self):
        return self.size

    def rng_and_word(self, index):
        """Example `index`'s random stream and the word it asks about (the stream's first draw)."""
        rng = random.Random(f"{self.rng_name}-{self.split}-{self.seed}-{index}")
        return rng, rng.choice(self.words)


class SpellingBee(WordTask):
    """Count a letter in a word, with the calculator as the counting tool."""
    rng_name = "spellingbee"

    def get_example(self, index):
        rng, word = self.rng_and_word(index)
        # mostly a letter of the word, sometimes one that is not in it (answer 0)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice(COUNT_QUESTIONS).format(letter=letter, word=word)
        parts = [
            {"type": "text", "text": f"Spelling it out: {'-'.join(word)}. Counting '{letter}' with the tool: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\nThere {'is' if count == 1 else 'are'} {count} '{letter}' in {word}.\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "word": word, "letter": letter, "answer": str(count)}

    def evaluate(self, conversation, completion):
        return extract_answer(completion) == conversation["answer"]

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))


class SimpleSpelling(WordTask):
    """Spell a word letter by letter."""
    rng_name = "simplespelling"

    def get_example(self, index):
        rng, word = self.rng_and_word(index)
        question = rng.choice(SPELL_QUESTIONS).format(word=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": "-".join(word)}],
                "word": word}

    def evaluate(self, conversation, completion):
        return clean_completion(completion) == "-".join(conversation["word"])
