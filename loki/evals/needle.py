"""Needle in a haystack, generated locally: the haystack is real text from the eval corpus (``corpus@data``),
the needle "The special magic number for <city> is <number>." is inserted at a sentence boundary at the given
depth, and the question asks for the number; exact match of the generated number. Lengths and depths come
from ``conf/eval/needle.yaml``; see ``loki.evals.retrieval`` for the protocol and ``decode_only``.
"""

from __future__ import annotations

import random
import re

from loki.evals.retrieval import Case, assemble, check_options, random_key, run_cases

HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n")
NEEDLE = " The special magic number for {city} is {key}."
QUESTION = "\nWhat is the special magic number for {city} mentioned in the provided text? The special magic number for {city} is"
CITIES = ["Chicago", "Lisbon", "Nairobi", "Osaka", "Vancouver", "Krakow", "Lima", "Oslo", "Dublin", "Hanoi",
          "Seville", "Montreal", "Tallinn", "Auckland", "Bergen", "Porto"]


def haystack(cfg, tok, n_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of the eval corpus, sentence by sentence, with the sentence boundaries."""
    from loki.data import load_text

    text = load_text(cfg.data)[: max(n_tokens * 12, 20_000)]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    ids, cuts = [], [0]
    batch = 256
    for i in range(0, len(sentences), batch):
        for s in tok([" " + s for s in sentences[i: i + batch]], add_special_tokens=False)["input_ids"]:
            ids += s
            cuts.append(len(ids))
        if len(ids) >= n_tokens:
            break
    return ids, cuts


def needle_cases(cfg, model, tok) -> list[Case]:
    ev = cfg.eval
    lengths = check_options(cfg, model, "needle")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler, cuts = haystack(cfg, tok, max(lengths))
    head = enc(HEAD)
    rng = random.Random(int(ev.get("seed", 0)))
    cases = []
    for n in lengths:
        for depth in ev.depths:
            for _ in range(int(ev.get("repeats", 1))):
                key, city = random_key(rng, int(ev.get("digits", 5))), rng.choice(CITIES)
                ids = assemble(tok, n, float(depth), head, enc(NEEDLE.format(city=city, key=key)),
                               enc(QUESTION.format(city=city)), filler, cuts, f"needle on corpus '{cfg.data.name}'")
                cases.append(Case(n, float(depth), key, ids))
    return cases


def needle_eval(cfg, model, method, device) -> dict:
    from loki.modeling import load_tokenizer

    tok = load_tokenizer(cfg.model)
    return run_cases(cfg, model, method, device, needle_cases(cfg, model, tok), tok, "needle")
