"""W&B for every stage: one run per job, ``group`` = experiment, ``job_type`` = stage.

Offline by default (files under the results folder, no account, no server); ``WANDB_MODE=online`` (or
``wandb.mode=online``) syncs; ``disabled`` turns it off (tests).  Jobs of the Snakemake DAG carry the tag
``snakemake`` (ad-hoc Hydra runs of the same experiment land in the same group without it). Config keys are flattened with dots and
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


# the config sections only some stages read (workflow/rules/common.smk hashes each job's config with the same map;
# tests/test_pipeline.py checks that the two agree); prepare reads the model and corpora (shared keys) only
STAGE_SECTIONS = {
    "prepare": ["calib", "data"],
    "extract_keys": ["calib", "extract"],
    "fit_pca": ["calib", "pca"],
    "transfer": ["transfer"],
    "evaluate": ["data", "method", "eval", "allow_foreign_basis"],
    "report": ["calib", "data", "report"],
    "bench": ["method", "bench", "allow_foreign_basis"],
}
_OWN_SECTIONS = {s for sections in STAGE_SECTIONS.values() for s in sections}


def _mode(cfg) -> str:
    mode = os.environ.get("WANDB_MODE") or cfg.wandb.get("mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        from loki.common import fail

        raise fail(f"unknown W&B mode '{mode}'.", "use wandb.mode=offline|online|disabled (or WANDB_MODE).")
    return mode


@contextlib.contextmanager
def wandb_run(cfg, stage: str, name: str | None = None, extra_config: dict | None = None) -> Iterator[Any]:
    """Start a W&B run for one job and always finish it (so multirun jobs never share a run); a job that raises
    finishes its run with exit code 1 (W&B state "failed") and the error in the run's summary."""
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
    # a stage's run records the sections it reads, not another stage's (an extract_keys run with method.name=dense
    # would match a dashboard filter on the dense points)
    conf = {k: v for k, v in conf.items() if k not in _OWN_SECTIONS or k in STAGE_SECTIONS.get(stage, _OWN_SECTIONS)}
    flat = flatten(conf)
    if extra_config:
        flat.update(extra_config)
    flat["stage"] = stage
    try:
        run = wandb.init(
            project=cfg.wandb.get("project", "loki"),
            entity=cfg.wandb.get("entity") or None,
            group=str(cfg.wandb.get("group") or cfg.experiment_name),
            job_type=stage,
            name=name or stage,
            config=flat,
            dir=str(wdir),
            mode=mode,
            tags=list(cfg.wandb.get("tags") or []) + (["snakemake"] if os.environ.get("LOKI_SNAKEMAKE") else []),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
    except wandb.errors.UsageError as e:  # online without an API key (or with a bad one): say how to log in
        from loki.common import fail

        raise fail(f"W&B could not start an {mode} run: {e}",
                   "run `wandb login` (or set WANDB_API_KEY) for online runs, or use the default offline mode "
                   "(WANDB_MODE=offline, or unset it) and upload later with `wandb sync <results>/wandb/offline-run-*`."
                   ) from e
    try:
        yield run
    except BaseException as e:  # the job failed: the run says so (state "failed", the error in its summary)
        with contextlib.suppress(Exception):
            run.summary["error"] = f"{type(e).__name__}: {e}"[:1000]
        wandb.finish(exit_code=130 if isinstance(e, KeyboardInterrupt) else 1)
        raise
    else:
        wandb.finish()


# ----------------------------------------------------------------------- reading offline runs back

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic 0xBEE1 + version byte; records use LevelDB's log format


def _records(path: Path):
    """Protobuf payloads of a ``run-*.wandb`` file (LevelDB log format, 32 KiB blocks)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        from loki.common import fail

        raise fail(f"{path} is not a W&B run file.", "point at offline-run-*/run-*.wandb.")
    pos, buf = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4: pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            buf = chunk
        elif kind == 3:  # MIDDLE
            buf += chunk
        elif kind == 4:  # LAST
            yield buf + chunk
            buf = b""


def read_offline_run(run_dir: str | Path) -> dict:
    """What an offline run recorded: run info, config, summary and history (values JSON-decoded)."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        from loki.common import fail

        raise fail(f"no run-*.wandb file in {run_dir}.", "point at a wandb/offline-run-* folder.")
    out: dict = {"run": {}, "config": {}, "summary": {}, "history": []}
    for payload in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"id": rec.run.run_id, "group": rec.run.run_group, "job_type": rec.run.job_type,
                          "name": rec.run.display_name, "project": rec.run.project, "tags": list(rec.run.tags)}
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "exit":
            out["run"]["exit_code"] = rec.exit.exit_code
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out
