"""Attention methods (torch reference implementations), one file each, and their registry."""

from __future__ import annotations

from typing import Any

from loki.common import fail
from loki.methods.base import Method
from loki.methods.dense import Dense
from loki.methods.exact_topk import ExactTopK
from loki.methods.h2o import H2O
from loki.methods.loki import Loki
from loki.methods.loki_h2o import LokiH2O
from loki.methods.pca_attn import PcaAttn
from loki.methods.quest import Quest
from loki.methods.sparq import SparQ

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Dense, ExactTopK, Loki, PcaAttn, H2O, SparQ, Quest, LokiH2O)}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(cfg: Any, **resources) -> Method:
    """A method object from its config (a dict or DictConfig with ``name`` and the method's options)."""
    from omegaconf import DictConfig, OmegaConf

    opts = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = opts.pop("name", None)
    if name not in METHODS:
        raise fail(f"unknown attention method '{name}'.", f"use one of: {', '.join(sorted(METHODS))} (method=<name>).")
    return METHODS[name](opts, **resources)
