"""The shape every stage shares: a Hydra app over ``conf/config.yaml`` that turns LokiError into one
clear message (exit code 2) instead of a traceback, and knows its output folder.

In a multirun (``-m``) a point that fails with a LokiError (say ``method.d=128`` on a model with head dim 64)
does not stop the sweep: its message is printed and written to ``error.txt`` in that job's folder, the other
points run, and the sweep ends with a list of the failed points and exit code 2 (with Hydra's basic launcher; under
a cluster launcher the point's job exits 2 and the launcher reports it). Any other exception stops
the sweep as before (it is a bug, not a bad point)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

from loki.common import CONF_DIR, LokiError, atomic_path


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _stage_name(fn: Callable) -> str:
    """``loki.evaluate``, also when it runs as ``python -m loki.evaluate`` (module ``__main__``)."""
    if fn.__module__ != "__main__":
        return fn.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _multirun_job() -> tuple[int, str, Path, bool] | None:
    """(job number, its overrides, its output folder, whether it runs in this process) when this job is one point of
    a ``-m`` sweep.  Only the basic launcher runs the points here; under another (submitit / SLURM) a failed point
    must still exit non-zero, or the launcher would report it as done."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    in_process = hc.launcher.get("_target_") == _BASIC_LAUNCHER
    return int(hc.job.num), " ".join(hc.overrides.task), Path(hc.runtime.output_dir), in_process


def start(cfg) -> None:
    """What every stage does first, so that bad shared keys fail before any work: check ``device``, set
    ``threads``, seed python's, numpy's and torch's global generators from ``seed``.  The stages' own draws use
    explicit seeds (eval.seed, bench.seed); this covers whatever else draws from the global ones (weights missing
    from a checkpoint, which transformers initialises at random; a method or eval that samples)."""
    from loki.common import resolve_device, seed_everything, set_threads

    resolve_device(cfg.get("device", "auto"))
    set_threads(cfg.get("threads"))
    seed_everything(cfg.get("seed", 0))


def stage(fn: Callable) -> Callable[[], None]:
    """Decorate ``fn(cfg)``; returns a ``main()`` for ``if __name__ == "__main__"``."""
    import hydra

    failed: list[tuple[int, str, str]] = []  # the sweep's failed points: (job number, overrides, message)

    @functools.wraps(fn)
    def job(cfg):
        try:
            start(cfg)
            return fn(cfg)
        except LokiError as e:
            print(f"\nerror ({_stage_name(fn)}): {e}", file=sys.stderr, flush=True)
            if os.environ.get("LOKI_TRACEBACK"):
                raise
            point = _multirun_job()
            if point is None:
                sys.exit(2)
            num, overrides, folder, in_process = point
            with atomic_path(folder / "error.txt") as tmp:
                tmp.write_text(f"error ({_stage_name(fn)}): {e}\n")
            if not in_process:
                sys.exit(2)
            failed.append((num, overrides, str(e).splitlines()[0]))
            print(f"(sweep point #{num} failed; the sweep goes on: {folder / 'error.txt'})", file=sys.stderr, flush=True)
            return None

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(job)

    @functools.wraps(app)
    def main(*args, **kwargs):
        failed.clear()
        out = app(*args, **kwargs)
        if failed:
            lines = [f"\nerror ({_stage_name(fn)}): {len(failed)} point(s) of the sweep failed:"]
            lines += [f"  #{num} {overrides}: {msg}" for num, overrides, msg in sorted(failed)]
            lines.append("  Each message is in error.txt in that point's folder; fix the overrides and rerun those points.")
            print("\n".join(lines), file=sys.stderr, flush=True)
            sys.exit(2)
        return out

    return main
