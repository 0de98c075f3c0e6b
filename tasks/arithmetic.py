"""
Synthetic multi-step arithmetic word problems in GSM8K's format, for the offline CPU pipeline.

Each problem is a short story about someone's collection of things: a starting amount, then one to
three changes (get more, give away, buy packs of n, double, share equally), then a question. The
solution is written like GSM8K's: one line per step with a `<<a+b=c>>` calculator annotation, then
'#### N'; it is rendered into tool-call parts by tasks.gsm8k.answer_to_parts, so a model learns to
call the calculator for every step. Numbers stay small (a tiny model should learn this).

Problems are generated deterministically from (seed, index) and assigned to train/val/test by a hash
of the question text (tasks/splits.py), so the held-out splits never appear in training.
"""

import functools
import random

from tasks.common import Task
from tasks.gsm8k import evaluate_final_answer, problem_conversation
from tasks.splits import check_split, split_of

NAMES = ["Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Lily", "Ben", "Emma", "Noah", "Ella", "Omar", "Nina"]
PRONOUNS = {"Tom": "He", "Sam": "He", "Leo": "He", "Max": "He", "Ben": "He", "Noah": "He", "Omar": "He"}
ITEMS = ["apples", "pencils", "marbles", "coins", "books", "cookies", "stickers", "cards", "shells", "stamps",
         "balloons", "eggs"]
STARTS = ["{name} has {a} {item}.", "{name} starts with {a} {item}.", "There are {a} {item} in {name}'s box.",
          "{name} collected {a} {item}."]
QUESTIONS = ["How many {item} does {name} have now?", "How many {item} does {name} have in the end?",
             "How many {item} are left with {name}?", "What is the number of {item} {name} has now?"]
DEFAULT_SIZES = {"train": 10_000, "val": 200, "test": 250}


def _step(rng, total, name, pron, item):
    """One change to the amount: (sentence, solution lines, new total)."""
    kind = rng.choice(["add", "sub", "packs", "mul", "share"])
    if kind == "sub" and total < 2:
        kind = "add"
    if kind == "share":
        divisors = [d for d in (2, 3, 4, 5) if total % d == 0 and total // d >= 1]
        if not divisors:
            kind = "add"
    if kind == "mul" and total > 40:
        kind = "sub"
    if kind == "add":
        b = rng.randint(1, 20)
        sentence = rng.choice(["{p} gets {b} more.", "{p} finds {b} more {item}.", "A friend gives {name} {b} {item}.",
                               "{p} buys {b} more {item}."]).format(p=pron, b=b, item=item, name=name)
        new = total + b
        lines = [f"{name} now has {total} + {b} = <<{total}+{b}={new}>>{new} {item}."]
    elif kind == "sub":
        b = rng.randint(1, min(total - 1, 20))
        sentence = rng.choice(["{p} gives away {b}.", "{p} loses {b} {item}.", "{p} gives {b} {item} to a friend.",
                               "{p} uses {b} of them."]).format(p=pron, b=b, item=item)
        new = total - b
        lines = [f"{name} has {total} - {b} = <<{total}-{b}={new}>>{new} {item} left."]
    elif kind == "packs":
        b, c = rng.randint(2, 6), rng.randint(2, 10)
        sentence = rng.choice(["{p} buys {b} packs with {c} {item} in each.", "{p} gets {b} bags of {c} {item}.",
                               "Then {name} receives {b} boxes holding {c} {item} each."]
                              ).format(p=pron, b=b, c=c, item=item, name=name)
        packs = b * c
        new = total + packs
        lines = [f"The packs hold {b} * {c} = <<{b}*{c}={packs}>>{packs} {item}.",
                 f"So {name} has {total} + {packs} = <<{total}+{packs}={new}>>{new} {item}."]
    elif kind == "mul":
        b = rng.choice([2, 3])
        word = {2: "doubles", 3: "triples"}[b]
        sentence = rng.choice(["Then the number of {item} {word}.", "{p} manages to make the pile {b} times bigger."]
                              ).format(item=item, word=word, p=pron, b=b)
        new = total * b
        lines = [f"{name} has {total} * {b} = <<{total}*{b}={new}>>{new} {item}."]
    else:
        b = rng.choice(divisors)
        sentence = rng.choice(["{p} shares them equally among {b} people, {name} included, and keeps one share.",
                               "{p} splits them into {b} equal groups and keeps one group."]
                              ).format(p=pron, b=b, name=name)
        new = total // b
        lines = [f"One share is {total} / {b} = <<{total}/{b}={new}>>{new} {item}."]
    return sentence, lines, new


def make_problem(rng):
    """(question, GSM8K-style answer) for one random problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pron = PRONOUNS.get(name, "She")
    total = rng.randint(2, 30)
    story = [rng.choice(STARTS).format(name=name, a=total, item=item)]
    solution = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        sentence, lines, total = _step(rng, total, name, pron, item)
        story.append(sentence)
        solution += lines
    story.append(rng.choice(QUESTIONS).format(name=name, item=item))
    return " ".join(story), "\n".join(solution) + f"\n#### {total}"


@functools.lru_cache(maxsize=16)
def generate_split(split, size, seed):
    """`size` distinct problems of one split, the same every time for the same (split, size, seed)."""
    problems, seen, index = [], set(), 0
    while len(problems) < size:
        question, answer = make_problem(random.Random(f"arithmetic-{seed}-{index}"))
        index += 1
        if question in seen or split_of("arithmetic:" + question) != split:
            continue
        seen.add(question)
        problems.append((question, answer))
        if index > 100 * size + 10_000:
            raise RuntimeError("could not generate enough distinct arithmetic problems")
    return tuple(problems)


class Arithmetic(Task):

    def __init__(self, split="train", size=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.split = check_split(split)
        self.problems = generate_split(self.split, size or DEFAULT_SIZES[self.split], seed)

    def num_examples(self):
        return len(self.problems)

    def get_example(self, index):
        return problem_conversation(*self.problems[index])

    def evaluate(self, conversation, completion):
        return evaluate_final_answer(conversation, completion)

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))
