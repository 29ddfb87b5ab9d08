"""Data of the local lm-eval task ``loki_demo``: 24 sequence-continuation questions with 4 choices each,
generated deterministically (no download)."""

from __future__ import annotations

import random

SEQUENCES = [
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
    ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
     "November", "December"],
    [str(i) for i in range(1, 30)],
    list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    [str(i) for i in range(2, 60, 2)],
]


def items(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seq = SEQUENCES[i % len(SEQUENCES)]
        start = rng.randrange(0, len(seq) - 5)
        shown = seq[start: start + 4]
        answer = seq[start + 4]
        wrong = rng.sample([w for w in seq if w != answer], 3)
        choices = [answer] + wrong
        rng.shuffle(choices)
        out.append({"context": ", ".join(shown) + ",", "choices": [" " + c for c in choices],
                    "label": choices.index(answer)})
    return out


def build(**kwargs):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items())})
