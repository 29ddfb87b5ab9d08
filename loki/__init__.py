"""Loki: low-rank keys for efficient sparse attention -- the experiment pipeline.

Stages are Hydra apps run as ``python -m loki.<stage>``:
``prepare`` -> ``extract_keys`` -> ``fit_pca`` -> ``evaluate`` -> ``report``.
"""

__all__ = ["LokiError"]

from loki.common import LokiError  # noqa: E402
