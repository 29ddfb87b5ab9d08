"""Perplexity over non-overlapping windows; NLL summed over tokens and divided by the token count
(token-weighted, not window-weighted)."""

from __future__ import annotations

import math

import torch

from loki.common import fail


def perplexity(model, seqs: torch.Tensor, device: str, batch_size: int = 1, progress: bool = True) -> dict:
    from tqdm import tqdm

    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in tqdm(range(0, seqs.shape[0], batch_size), desc="perplexity", disable=not progress):
            x = seqs[i: i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            tgt = x[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     reduction="sum").item()
            count += tgt.numel()
    return {"nll": nll / count, "ppl": math.exp(nll / count), "tokens": count}


def _count(ev, key: str, low: int, null_ok: bool, meaning: str) -> None:
    x = ev.get(key)
    if x is None and null_ok:
        return
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise fail(f"{ev.name}: eval.{key} must be an int >= {low}{' or null' if null_ok else ''}, got {x!r}.",
                   f"set eval.{key} ({meaning}).")


def check_windows(ev) -> None:
    """The window options of the evals that cut the corpus into windows (perplexity, selection)."""
    _count(ev, "window", 2, False, "tokens per window; a window of n tokens scores n - 1 next-token predictions")
    _count(ev, "num_windows", 1, True, "how many windows of the corpus; null: every whole window of it")
    if "max_windows" in ev:
        _count(ev, "max_windows", 1, True, "at most this many of the windows; null: all of them")
    if "batch_size" in ev:
        _count(ev, "batch_size", 1, False, "windows per forward pass")


def eval_windows(cfg, model):
    """The evaluation corpus as [num_windows, window] token ids (checked against the model's limit)."""
    from loki.data import load_tokens, windows
    from loki.modeling import load_tokenizer, max_positions

    ev = cfg.eval
    check_windows(ev)
    limit = max_positions(model)
    if limit and int(ev.window) > limit:
        raise fail(f"eval.window={ev.window} is above the model's limit of {limit} positions.", f"use eval.window <= {limit}.")
    tok = load_tokenizer(cfg.model)
    n_tok = int(ev.window) * int(ev.num_windows) if ev.get("num_windows") is not None else None
    return windows(load_tokens(cfg.data, tok, max_tokens=n_tok), int(ev.window), ev.get("num_windows"),
                   f"{ev.name} on corpus '{cfg.data.name}'")


def perplexity_eval(cfg, model, method, device) -> dict:
    seqs = eval_windows(cfg, model)
    res = perplexity(model, seqs, device, int(cfg.eval.get("batch_size", 1)))
    return {**res, "window": int(cfg.eval.window), "num_windows": int(seqs.shape[0])}
