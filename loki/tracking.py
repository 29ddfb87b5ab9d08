"""W&B for every stage: one run per job, ``group`` = experiment, ``job_type`` = stage.

Offline by default (files under the results folder, no account, no server); ``WANDB_MODE=online`` (or
``wandb.mode=online``) syncs; ``disabled`` turns it off (tests). Config keys are flattened with dots and
are the same across stages, so parallel-coordinates panels over method.d, method.k... work.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _mode(cfg) -> str:
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.get("mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        from loki.common import fail

        raise fail(f"unknown W&B mode '{mode}'.", "use wandb.mode=offline|online|disabled (or WANDB_MODE).")
    return mode


@contextlib.contextmanager
def wandb_run(cfg, stage: str, name: str | None = None, extra_config: dict | None = None) -> Iterator[Any]:
    """Start a W&B run for one job and always finish it (so multirun jobs never share a run)."""
    from omegaconf import OmegaConf

    mode = _mode(cfg)
    if mode == "disabled":
        yield None
        return
    import wandb

    wdir = Path(cfg.wandb.get("dir") or cfg.results_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    conf = OmegaConf.to_container(cfg, resolve=True)
    conf.pop("hydra", None)
    flat = flatten(conf)
    if extra_config:
        flat.update(extra_config)
    flat["stage"] = stage
    run = wandb.init(
        project=cfg.wandb.get("project", "loki"),
        entity=cfg.wandb.get("entity") or None,
        group=str(cfg.experiment_name),
        job_type=stage,
        name=name or stage,
        config=flat,
        dir=str(wdir),
        mode=mode,
        tags=list(cfg.wandb.get("tags") or []),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        yield run
    finally:
        wandb.finish()
