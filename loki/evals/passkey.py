"""Passkey retrieval (Mohtashami & Jaggi, 2023), generated locally: a 5-digit key hidden at a given depth in
repetitive filler ("The grass is green. The sky is blue. ..."), then "What is the pass key?"; exact match of
the generated number. Lengths (prompt tokens) and depths come from ``conf/eval/passkey.yaml``; see
``loki.evals.retrieval`` for the protocol and ``decode_only``.
"""

from __future__ import annotations

import random

from loki.evals.retrieval import Case, assemble, check_options, random_key, run_cases

HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = [" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again."]
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def passkey_cases(cfg, model, tok) -> list[Case]:
    ev = cfg.eval
    lengths = check_options(cfg, model, "passkey")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sentences = [enc(s) for s in FILLER]
    filler, cuts = [], [0]
    while len(filler) < max(lengths):
        for s in sentences:
            filler += s
            cuts.append(len(filler))
    head, tail = enc(HEAD), enc(QUESTION)
    rng = random.Random(int(ev.get("seed", 0)))
    cases = []
    for n in lengths:
        for depth in ev.depths:
            for _ in range(int(ev.get("repeats", 1))):
                key = random_key(rng, int(ev.get("digits", 5)))
                ids = assemble(tok, n, float(depth), head, enc(NEEDLE.format(key=key)), tail, filler, cuts, "passkey")
                cases.append(Case(n, float(depth), key, ids))
    return cases


def passkey_eval(cfg, model, method, device) -> dict:
    from loki.modeling import load_tokenizer

    tok = load_tokenizer(cfg.model)
    return run_cases(cfg, model, method, device, passkey_cases(cfg, model, tok), tok, "passkey")
