"""Fixtures of the report tests: a synthetic results folder (tests/report/report_fixture.py), and one Snakemake run of
the ``report`` rule on it followed by ``snakemake --report`` (shared by the HTML and W&B tests)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import report_fixture as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A fresh fixture results folder (tests may change it); cwd is its root, as for the stage."""
    monkeypatch.chdir(tmp_path)
    return fx.make_results(tmp_path)


@contextlib.contextmanager
def cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The report built once on the fixture (read-only for the tests that use it), from its root folder as the
    stage runs (kernel results under ./kernels/measured)."""
    from loki.report import make_report

    root = tmp_path_factory.mktemp("built")
    res = fx.make_results(root)
    with cwd(root):
        rep = make_report(res.relative_to(root), kernels_dir="kernels/measured")
    rep.root, rep.results = root, res.relative_to(root)  # results relative to root
    return rep


@pytest.fixture(scope="session")
def results_ro(tmp_path_factory):
    """A fixture results folder for read-only use (notebooks), as a DAG leaves it: the report stage has written
    summary.parquet, and a rerun has a job in flight (a folder without metrics.json, which ``collect`` refuses)."""
    from loki.report import make_report

    root = tmp_path_factory.mktemp("fixture_ro")
    res = fx.make_results(root)
    with cwd(root):
        make_report(res.relative_to(root), kernels_dir="kernels/measured")
    (res / "evaluate" / "perplexity" / "loki-d32-k0.25").mkdir()
    return res


@pytest.fixture(scope="session")
def snakemake_run(tmp_path_factory):
    """The workflow copied next to the fixture; ``snakemake`` (only ``report`` may run) with W&B offline, then
    ``snakemake --report report.html``. Returns the work dir."""
    work = tmp_path_factory.mktemp("snakemake_report")
    sweep = fx.make_workdir(work, REPO)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "WANDB_CACHE_DIR": str(work / ".wandb_cache"), "WANDB_DATA_DIR": str(work / ".wandb_data"),
           "WANDB_CONFIG_DIR": str(work / ".wandb_config")}
    base = [sys.executable, "-m", "snakemake", "--configfile", str(sweep), *fx.ALLOWED_RULES]
    for args in (["--cores", "1"], ["--report", "report.html"]):
        r = subprocess.run(base + args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        log = work / "results" / fx.EXP / "logs" / "report.log"
        assert r.returncode == 0, (f"snakemake {' '.join(args)} failed:\n{r.stderr[-4000:]}\n"
                                   + (log.read_text()[-4000:] if log.exists() else ""))
    return work
