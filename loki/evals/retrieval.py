"""Long-context retrieval, generated locally (no download), scored by exact match; shared by ``passkey`` and
``needle``.

Each case is a prompt of exactly ``length`` tokens (BOS included) with a key hidden at ``depth`` (0 = start of
the filler, 1 = its end), followed by a question; the model generates greedily (``model.generate`` with a
``DynamicCache``, so every generated token goes through the method's decode path: one query over the cache),
and the case is correct when the first number in the generated text equals the key.

``decode_only: true`` prefills the prompt densely (the method's ``sparse_prefill`` is set to false: by
``loki.evaluate`` in the config, so metrics.json records what ran, and refused when given explicitly as true) so
only the generated tokens attend sparsely, the generation-time sparsity of a deployed decoder; ``false`` runs the
prompt through the method too.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from loki.common import fail


@dataclass
class Case:
    length: int
    depth: float
    key: str
    ids: list[int]


def check_options(cfg, model, kind: str) -> list[int]:
    from loki.modeling import max_positions

    ev = cfg.eval
    lengths = [int(x) for x in ev.lengths]
    depths = [float(x) for x in ev.depths]
    if not lengths or not depths:
        raise fail(f"{kind}: eval.lengths and eval.depths must be non-empty lists.", "e.g. eval.lengths=[512,1024] eval.depths=[0,0.5,1].")
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad:
        raise fail(f"{kind}: depths must be in [0, 1], got {bad}.", "0 = start of the context, 1 = its end.")
    limit = max_positions(model)
    new = int(ev.max_new_tokens)
    too_long = [n for n in lengths if limit and n + new > limit]
    if too_long:
        raise fail(f"{kind}: length(s) {too_long} plus {new} generated tokens exceed the model's limit of {limit} positions.",
                   f"use eval.lengths of at most {limit - new}.")
    return lengths


def assemble(tok, length: int, depth: float, head: list[int], needle: list[int], tail: list[int],
             filler: list[int], cut_points: list[int] | None, what: str) -> list[int]:
    """head + filler[:n] with the needle inserted at ``depth`` + tail, exactly ``length`` tokens."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    n_fill = length - len(bos) - len(head) - len(needle) - len(tail)
    if n_fill < 0:
        raise fail(f"{what}: length {length} is too short for the prompt (it needs at least "
                   f"{length - n_fill} tokens).", "use longer eval.lengths.")
    if n_fill > len(filler):
        raise fail(f"{what}: the filler text has {len(filler)} tokens, fewer than the {n_fill} needed for length {length}.",
                   "use shorter eval.lengths or a longer corpus.")
    fill = filler[:n_fill]
    at = int(round(depth * n_fill))
    if cut_points:  # snap to a sentence boundary at or before the target
        ok = [c for c in cut_points if c <= at]
        at = ok[-1] if ok else 0
    ids = bos + head + fill[:at] + needle + fill[at:] + tail
    assert len(ids) == length, (len(ids), length)
    return ids


def run_cases(cfg, model, method, device, cases: list[Case], tok, kind: str) -> dict:
    from tqdm import tqdm
    from transformers import DynamicCache

    ev = cfg.eval
    decode_only = bool(ev.get("decode_only", False))
    if decode_only and "sparse_prefill" in method.opts:
        method.opts["sparse_prefill"] = False
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_case = []
    with torch.inference_mode():
        for c in tqdm(cases, desc=kind):
            x = torch.tensor([c.ids], device=device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=int(ev.max_new_tokens),
                                 do_sample=False, num_beams=1, cache=DynamicCache(config=model.config),
                                 pad_token_id=pad)
            text = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
            m = re.search(r"\d+", text)
            got = m.group(0) if m else ""
            per_case.append({"length": c.length, "depth": c.depth, "correct": got == c.key, "expected": c.key,
                             "generated": text})
    by_len = {}
    for n in sorted({c["length"] for c in per_case}):
        rows = [c for c in per_case if c["length"] == n]
        by_len[str(n)] = sum(r["correct"] for r in rows) / len(rows)
    return {
        "accuracy": sum(c["correct"] for c in per_case) / len(per_case),
        "accuracy_by_length": by_len,
        "per_case": per_case,
        "cases": len(per_case),
        "decode_only": decode_only,
        "max_length": max(c["length"] for c in per_case),
    }


def random_key(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
