"""Evaluations, one file each, selected with ``eval=<name>`` (``conf/eval/<name>.yaml``).

An eval is ``fn(cfg, model, method, device) -> dict`` of metrics (JSON-serialisable, the headline scalars at
the top level); ``evaluate`` adds the provenance. Every registered eval also returns what the method kept
(``method_stats``: ``kept_fraction``, ``kept_fraction_decode`` over decode steps, ``kv_rows_fraction`` (``_decode``):
the K/V rows each KV head reads, a row kept by several query heads of its group counted once, and for evicting
methods the cache size they save; these are also copied to the top level). Register new ones in ``EVALS``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

from loki.common import fail
from loki.evals.needle import needle_eval
from loki.evals.passkey import passkey_eval
from loki.evals.perplexity import perplexity_eval
from loki.evals.selection import selection_eval

HEADLINE_STATS = ("kept_fraction", "kept_fraction_decode", "kv_rows_fraction", "kv_rows_fraction_decode",
                  "cache_fraction", "cache_saved")


def json_safe(x):
    """Metrics as plain JSON: floats (NaN/inf -> None), ints, strings, lists, dicts with string keys."""
    import numpy as np
    import torch

    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, torch.Tensor):
        return json_safe(x.tolist())
    if isinstance(x, (np.generic,)):
        return json_safe(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def with_method_stats(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(cfg, model, method, device):
        if hasattr(method, "reset_stats"):
            method.reset_stats()
        res = dict(fn(cfg, model, method, device))
        stats = method.stats() if hasattr(method, "stats") else {}
        if stats:
            res.setdefault("method_stats", stats)
            for k in HEADLINE_STATS:
                if k in stats:
                    res.setdefault(k, stats[k])
        return json_safe(res)

    return run


def _lm_eval(cfg, model, method, device):
    from loki.evals.lm_eval_adapter import lm_eval_eval  # imports lm-eval only when used

    return lm_eval_eval(cfg, model, method, device)


EVALS: dict[str, Callable] = {
    name: with_method_stats(fn)
    for name, fn in {
        "perplexity": perplexity_eval,
        "selection": selection_eval,
        "passkey": passkey_eval,
        "needle": needle_eval,
        "passkey_decode": passkey_eval,  # the same evals, configured with decode_only: true (conf/eval/*_decode.yaml)
        "needle_decode": needle_eval,
        "lm_eval": _lm_eval,
    }.items()
}


def get_eval(name: str) -> Callable:
    if name not in EVALS:
        raise fail(f"unknown eval '{name}'.", f"use one of: {', '.join(sorted(EVALS))} (eval=<name>).")
    return EVALS[name]
