"""Evaluations, one file each, selected with ``eval=<name>`` (``conf/eval/<name>.yaml``).

An eval is ``fn(cfg, model, method, device) -> dict`` of metrics (JSON-serialisable); ``evaluate``
adds the provenance. Register new ones in ``EVALS``.
"""

from __future__ import annotations

from typing import Callable

from loki.common import fail
from loki.evals.perplexity import perplexity_eval

EVALS: dict[str, Callable] = {"perplexity": perplexity_eval}


def get_eval(name: str) -> Callable:
    if name not in EVALS:
        raise fail(f"unknown eval '{name}'.", f"use one of: {', '.join(sorted(EVALS))} (eval=<name>).")
    return EVALS[name]
