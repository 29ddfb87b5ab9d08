"""Fixtures for the SLURM tests: a real single-node cluster on this machine.

The cluster is started by ``.ci/slurm-up.sh`` (apt-installs slurm-wlm, munge,
slurmdbd and mariadb if missing, then starts the daemons as root). Where that
cannot be done (not root, no apt, daemons do not come up) the SLURM tests are
skipped with the reason, unless ``LOKI_REQUIRE_SLURM=1`` (set by CI on the
machine that must run them), which turns the skip into a failure.

Environment knobs (all optional):
  LOKI_REQUIRE_SLURM=1      fail instead of skip when the cluster cannot be had
  LOKI_SLURM_TEST_SKIP=1    skip the cluster tests outright
  LOKI_SLURM_TEST_REPO      pipeline checkout to test (default: this repo)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = Path(os.environ.get("LOKI_SLURM_TEST_REPO") or HERE.parents[1]).resolve()
SCRIPTS = HERE.parents[1] / ".ci"   # scripts and profiles always come from this checkout
MARKER = "# managed-by: loki .ci/slurm-up.sh"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: runs jobs on a real local SLURM cluster (.ci/slurm-up.sh; root, apt)")


def _required() -> bool:
    return os.environ.get("LOKI_REQUIRE_SLURM") == "1"


def _unavailable(reason: str):
    """Skip, or fail where the cluster is required (CI)."""
    if _required():
        pytest.fail(f"SLURM cluster required (LOKI_REQUIRE_SLURM=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def _ours() -> bool:
    conf = Path("/etc/slurm/slurm.conf")
    return conf.is_file() and MARKER in conf.read_text(errors="replace")


def _cluster_ready() -> bool:
    try:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (state.returncode == 0 and state.stdout.split()[:1] in (["idle"], ["mix"], ["alloc"])
            and acct.returncode == 0)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local SLURM cluster with accounting (sacct); started if needed."""
    if os.environ.get("LOKI_SLURM_TEST_SKIP") == "1":
        pytest.skip("LOKI_SLURM_TEST_SKIP=1")
    for mod, pkg in (("snakemake_executor_plugin_slurm", "snakemake-executor-plugin-slurm"),
                     ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
                     ("submitit", "submitit")):
        try:
            __import__(mod)
        except ImportError:
            _unavailable(f"python package {pkg} missing (pip install -r workflow/envs/cluster.txt)")
    if not (_ours() and _cluster_ready()):
        if os.geteuid() != 0:
            _unavailable("starting the local cluster needs root (apt-get, daemons); run .ci/slurm-up.sh as root")
        if Path("/etc/slurm/slurm.conf").is_file() and not _ours():
            _unavailable("/etc/slurm/slurm.conf belongs to another SLURM setup; not touching it")
        try:
            up = subprocess.run(["bash", str(SCRIPTS / "slurm-up.sh")], capture_output=True, text=True,
                                timeout=900)
        except subprocess.TimeoutExpired:
            _unavailable(".ci/slurm-up.sh timed out after 900 s")
        if up.returncode != 0:
            why = {2: "not root", 3: "packages missing and apt-get failed"}.get(up.returncode, "daemon start failed")
            _unavailable(f".ci/slurm-up.sh exited {up.returncode} ({why}):\n{(up.stdout + up.stderr)[-3000:]}")
        if not _cluster_ready():
            _unavailable("cluster started but sinfo/sacct do not answer")
    return True


@pytest.fixture(scope="session")
def pipeline_repo():
    """The checkout whose smoke DAG is run (skip when its pipeline is not there yet)."""
    has_snakefile = (REPO / "Snakefile").is_file() or (REPO / "workflow" / "Snakefile").is_file()
    if not has_snakefile or not (REPO / "conf" / "sweep" / "smoke.yaml").is_file():
        pytest.skip(f"no smoke DAG in {REPO} (Snakefile + conf/sweep/smoke.yaml)")
    return REPO
