"""The shape every stage shares: a Hydra app over ``conf/config.yaml`` that turns LokiError into one
clear message (exit code 2) instead of a traceback, and knows its output folder."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

from loki.common import CONF_DIR, LokiError


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _stage_name(fn: Callable) -> str:
    """``loki.evaluate``, also when it runs as ``python -m loki.evaluate`` (module ``__main__``)."""
    if fn.__module__ != "__main__":
        return fn.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def stage(fn: Callable) -> Callable[[], None]:
    """Decorate ``fn(cfg)``; returns a ``main()`` for ``if __name__ == "__main__"``."""
    import hydra

    @functools.wraps(fn)
    def job(cfg):
        from loki.common import set_threads

        set_threads(cfg.get("threads"))
        try:
            return fn(cfg)
        except LokiError as e:
            print(f"\nerror ({_stage_name(fn)}): {e}", file=sys.stderr, flush=True)
            if os.environ.get("LOKI_TRACEBACK"):
                raise
            sys.exit(2)

    return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(job)
