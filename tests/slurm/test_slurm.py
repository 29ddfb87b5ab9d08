"""The pipeline on a real SLURM cluster (issue 8).

A single-node cluster on this machine (.ci/slurm-up.sh, see conftest.py) runs

1. the smoke DAG (conf/sweep/smoke.yaml on a 2-point grid, see TEST_GRID) through
   Snakemake's SLURM executor (workflow/profiles/slurm), once
   with its final stage forced to fail -- Snakemake must name the failed job's log --
   and once more, which must resume: only the failed job is run again;
2. the smoke DAG locally (workflow/profiles/local): the test session's run of the full smoke grid
   (tests/conftest.py ``smoke_dag``, run once for this file and tests/test_pipeline.py); every output of
   the SLURM run must be among its outputs and equal to it;
3. a two-point Hydra sweep through submitit (conf/hydra/launcher/slurm_local_test.yaml) of
   two points the DAG also computed, whose metrics must equal the DAG's;

and checks with ``sacct`` that the jobs went through SLURM.

The profile/launcher checks at the top need no cluster.

The embedded model is prepared once for the whole test session (tests/conftest.py) and put into both
runs' resources/ (hard links), so ``prepare_model`` -- a pinned download and de-quantization, ~1 min of
CPU each -- does not run twice more; everything downstream of it (``prepare_corpus`` included) runs
in both. LOKI_SLURM_TEST_PREPARE_MODEL=1 prepares it inside the SLURM run instead, and then (as with
another LOKI_SLURM_TEST_REPO or _CONFIGFILE) the local reference is this file's config run here, whose
outputs must then equal the SLURM run's exactly.

Knobs (environment): LOKI_SLURM_TEST_FULL_SMOKE=1 (the full smoke grid; slower),
LOKI_SLURM_TEST_CONFIGFILE (conf/sweep/smoke.yaml),
LOKI_SLURM_TEST_SUMMARY (results/smoke/summary.csv), LOKI_SLURM_TEST_FAIL_RULE (report;
the rule made to fail, running ``python -m loki.<rule>``), LOKI_SLURM_TEST_SWEEP_APP
(loki.evaluate), LOKI_SLURM_TEST_SWEEP_ARGS (DEFAULT_SWEEP below).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loki_testutils import seed_model

SMOKE = os.environ.get("LOKI_SLURM_TEST_CONFIGFILE", "conf/sweep/smoke.yaml")
# The smoke DAG with a smaller grid (written next to it in the test's copy): every stage of the
# smoke DAG, fewer evaluate points, no calibration transfer, so that the SLURM run, the local
# reference and the sweep fit in a few minutes on 2 cores. LOKI_SLURM_TEST_FULL_SMOKE=1: as is.
FULL_SMOKE = os.environ.get("LOKI_SLURM_TEST_FULL_SMOKE") == "1"
TEST_GRID = {"loki": [{"d": [8, 16], "k": [0.25]}]}    # the two points the sweep recomputes
PREPARE_MODEL = os.environ.get("LOKI_SLURM_TEST_PREPARE_MODEL") == "1"
CONFIGFILE = SMOKE if FULL_SMOKE else str(Path(SMOKE).with_name("slurm_test.yaml"))
SUMMARY = os.environ.get("LOKI_SLURM_TEST_SUMMARY", "results/smoke/summary.csv")
FAIL_RULE = os.environ.get("LOKI_SLURM_TEST_FAIL_RULE", "report")
SWEEP_APP = os.environ.get("LOKI_SLURM_TEST_SWEEP_APP", "loki.evaluate")
# two points of the smoke grid (loki-d8-k0.25, loki-d16-k0.25), with the DAG rule's threads=1, so
# the sweep's metrics must equal the DAG's
DEFAULT_SWEEP = "experiment=smoke method=loki method.d=8,16 method.k=0.25 threads=1"
SWEEP_ARGS = shlex.split(os.environ.get("LOKI_SLURM_TEST_SWEEP_ARGS", DEFAULT_SWEEP))
# values that legitimately differ between two runs of the same config (wall time, host...)
VOLATILE = re.compile(os.environ.get("LOKI_SLURM_TEST_VOLATILE",
                                     r"(^|_)(seconds|secs|time|elapsed|duration|timestamp|date|host|hostname|"
                                     r"git_commit|tokens_per_s|throughput|latency\w*|wandb\w*)$"), re.I)
GPU_RULES = ("extract_keys", "evaluate", "bench_decode")
CPU_RULES = ("prepare_model", "prepare_corpus", "fit_pca", "report")
TIMEOUT_DAG = int(os.environ.get("LOKI_SLURM_TEST_TIMEOUT", "900"))

# Resources of the single-node test cluster (2 CPUs, no GPU): the profiles read
# these (workflow/profiles/slurm, conf/hydra/launcher/slurm*.yaml).
CLUSTER_ENV = {
    "LOKI_SLURM_PARTITION": "debug",
    "LOKI_SLURM_ACCOUNT": "loki",
    "LOKI_SLURM_GRES": "",            # no GPUs on the test cluster: GPU stages run on CPU
    "LOKI_SLURM_MEM_MB": "3000",
    "LOKI_SLURM_PREPARE_MEM_MB": "4000",
    "LOKI_SLURM_RUNTIME": "30",
    "LOKI_SLURM_GPU_MEM_MB": "4000",
    "LOKI_SLURM_GPU_RUNTIME": "30",
}



HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]                       # profiles and launcher configs under test
REPO = Path(os.environ.get("LOKI_SLURM_TEST_REPO") or CHECKOUT).resolve()   # pipeline whose DAG runs
# the local reference is the test session's smoke DAG (tests/conftest.py `smoke_dag`) where it runs the same pipeline
# and config file with the same seeded model; otherwise test_slurm_outputs_equal_local_outputs runs its own
SHARED_REFERENCE = REPO == CHECKOUT.resolve() and SMOKE == "conf/sweep/smoke.yaml" and not PREPARE_MODEL
PROFILES = CHECKOUT / "workflow" / "profiles"
_TOP_IGNORE = {".git", ".venv", "venv", "results", "resources", ".snakemake", "outputs", "multirun", "wandb",
               "logs", "build", "dist", ".whl", ".gl", "shared"}


def clean_env(**extra: str) -> dict:
    """Environment for pipeline commands: the venv's python first on PATH, no SLURM_* from an
    enclosing job, the test cluster's resources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(CLUSTER_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def copy_pipeline(src: Path, dst: Path) -> Path:
    """Copy the pipeline's sources into ``dst``: everything but the generated top-level folders
    (outputs, caches, venv) -- what a fresh clone plus the working tree's new files hold."""
    def ignore(d, names):
        top = Path(d).resolve() == src.resolve()
        return [n for n in names if (top and n in _TOP_IGNORE) or n in ("__pycache__", ".pytest_cache")
                or n.endswith(".egg-info")]

    shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True, ignore=ignore)
    return dst


# Makes `python -m loki.<stage>` exit non-zero when LOKI_TEST_FAIL_STAGE=<stage>: the job of
# that stage fails on the cluster while everything else runs normally. Put on PYTHONPATH
# for the first SLURM run only; the sbatch/srun environment carries it into the jobs.
SITECUSTOMIZE = '''\
import os, sys
_stage = os.environ.get("LOKI_TEST_FAIL_STAGE")
if _stage:
    _argv = [str(a).replace(os.sep, "/") for a in getattr(sys, "orig_argv", sys.argv)]
    if f"loki.{_stage}" in _argv or any(a.endswith(f"loki/{_stage}.py") for a in _argv):
        sys.stderr.write(f"LOKI_TEST_FAIL_STAGE: forced failure of loki.{_stage} (tests/slurm)\\n")
        sys.stderr.flush()
        os._exit(17)
'''
FAIL_TEXT = "LOKI_TEST_FAIL_STAGE: forced failure"


# ----------------------------------------------------------------------------- helpers

@dataclass
class Run:
    cmd: list
    returncode: int
    output: str = field(repr=False)
    seconds: float
    log: Path
    workdir: Path | None = None

    def tail(self, n: int = 6000) -> str:
        return f"$ {shlex.join(map(str, self.cmd))}\n(exit {self.returncode}, {self.seconds:.0f}s, log {self.log})\n" \
               + self.output[-n:]

    @property
    def slurm_run_id(self) -> str | None:
        m = re.search(r"SLURM run ID: (\S+)", self.output)
        return m.group(1) if m else None

    @property
    def submitted(self) -> dict:
        """snakemake jobid -> SLURM job id, from 'Job N has been submitted with SLURM jobid M'."""
        return dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", self.output))

    @property
    def job_stats(self) -> dict:
        """The 'Job stats' table Snakemake prints before running: rule -> count."""
        m = re.search(r"Job stats:\n(?:.*\n){2}((?:\S+\s+\d+\n)+)", self.output)
        if not m:
            return {}
        rows = dict(line.split() for line in m.group(1).strip().splitlines())
        rows.pop("total", None)
        return {k: int(v) for k, v in rows.items()}


class Background:
    """A command running in its own process group, output to a log file."""

    def __init__(self, cmd, cwd: Path, env: dict, log: Path):
        self.cmd, self.cwd, self.log = [str(c) for c in cmd], Path(cwd), log
        self.t0 = time.monotonic()
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self):
        """End the command and its children (its own process group), if still running."""
        if self.proc.poll() is None:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):   # SIGINT: snakemake cancels its jobs
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=20)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue

    def wait(self, timeout: int = TIMEOUT_DAG) -> Run:
        left = max(1.0, timeout - (time.monotonic() - self.t0))
        try:
            rc = self.proc.wait(timeout=left)
            note = ""
        except subprocess.TimeoutExpired:
            self.stop()
            rc, note = -9, f"\n[test] TIMEOUT after {timeout}s"
        except BaseException:          # interrupted: leave no snakemake (or its SLURM jobs) behind
            self.stop()
            raise
        out = self.log.read_text(errors="replace") + note
        return Run(self.cmd, rc, out, time.monotonic() - self.t0, self.log, self.cwd)


def run(cmd, cwd: Path, env: dict, log: Path, timeout: int = TIMEOUT_DAG) -> Run:
    return Background(cmd, cwd, env, log).wait(timeout)


def snakemake_cmd(profile: str, *extra) -> list:
    return [sys.executable, "-m", "snakemake", "--workflow-profile", PROFILES / profile, "--configfile", CONFIGFILE,
            *extra]


def snakemake(workdir: Path, profile: str, log: Path, *extra, env=None) -> Run:
    return run(snakemake_cmd(profile, *extra), workdir, env or clean_env(), log)


def sacct(*args: str) -> list[dict]:
    fields = ["JobID", "JobName", "State", "ExitCode", "Comment", "Account", "Partition", "ReqTRES"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-2hours", "-o", ",".join(fields), *args],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def output_files(workdir: Path) -> dict:
    """Every pipeline output (results/, resources/) -> mtime_ns; not wandb's run folders (random
    names, appended to by every stage that logs)."""
    files = {}
    for top in ("results", "resources"):
        for p in (workdir / top).rglob("*"):
            rel = p.relative_to(workdir)
            if p.is_file() and "wandb" not in rel.parts:
                files[str(rel)] = p.stat().st_mtime_ns
    return files


def _num(x):
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


def diff_values(a, b, path="") -> list[str]:
    """Differences between two JSON-like values, ignoring VOLATILE keys; numbers must be equal
    (to 1e-9 relative: the same computation on the same machine)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if VOLATILE.search(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'second' if k not in a else 'first'}")
            else:
                out += diff_values(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_values(x, y, f"{path}[{i}]")]
    x, y = _num(a), _num(b)
    if isinstance(x, float) and isinstance(y, float):
        if math.isnan(x) and math.isnan(y):
            return []
        return [] if math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) else [f"{path}: {a!r} != {b!r}"]
    return [] if x == y else [f"{path}: {a!r} != {b!r}"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def render_profile(name: str, **env) -> dict:
    import yte

    old = dict(os.environ)
    try:
        for k in [k for k in os.environ if k.startswith(("LOKI_SLURM_", "LOKI_LOCAL_"))]:
            del os.environ[k]
        os.environ.update(env)
        with open(PROFILES / name / "config.yaml") as fh:
            return yte.process_yaml(fh, require_use_yte=True)
    finally:
        os.environ.clear()
        os.environ.update(old)


# ------------------------------------------------------------- configuration (no cluster)

def test_slurm_profile_requests_gpus_for_gpu_rules_only():
    prof = render_profile("slurm")
    assert prof["executor"] == "slurm"
    res = prof["set-resources"]
    for rule in GPU_RULES:
        assert res[rule]["gres"] == "gpu:1", rule
        assert res[rule]["gpu"] == 0, rule        # the rules' own gpu=1 must not add --gpus on top
        assert "cpus_per_task" not in res[rule], rule   # default: the rule's threads
        assert res[rule]["mem_mb"] >= 16000 and res[rule]["runtime"] >= 60, rule
    for rule in CPU_RULES:
        assert "gres" not in res.get(rule, {}) and "gpu" not in res.get(rule, {}), rule
    assert {"mem_mb", "runtime"} <= set(prof["default-resources"])
    # nothing cluster-specific unless the user sets it
    assert "slurm_account" not in prof["default-resources"]
    assert "slurm_partition" not in prof["default-resources"]


def test_slurm_profile_takes_cluster_values_from_environment():
    prof = render_profile("slurm", LOKI_SLURM_ACCOUNT="lab", LOKI_SLURM_PARTITION="cpu",
                          LOKI_SLURM_GPU_PARTITION="gpu", LOKI_SLURM_GRES="gpu:a100:2",
                          LOKI_SLURM_GPU_MEM_MB="120000", LOKI_SLURM_GPU_RUNTIME="600")
    assert prof["default-resources"]["slurm_account"] == "lab"
    assert prof["default-resources"]["slurm_partition"] == "cpu"
    ev = prof["set-resources"]["evaluate"]
    assert (ev["gres"], ev["slurm_partition"], ev["mem_mb"], ev["runtime"]) == ("gpu:a100:2", "gpu", 120000, 600)
    # CPU-only cluster (the test cluster): no GPU request at all
    cpu_only = render_profile("slurm", LOKI_SLURM_GRES="")
    assert all("gres" not in cpu_only["set-resources"][r] and cpu_only["set-resources"][r]["gpu"] == 0
               for r in GPU_RULES)


def test_local_profile_limits_gpu_stages_to_the_gpus_present():
    assert "resources" not in render_profile("local", LOKI_LOCAL_GPUS="0")
    two = render_profile("local", LOKI_LOCAL_GPUS="2")
    assert two["resources"] == {"gpu": 2}
    assert all(two["set-resources"][r] == {"gpu": 1} for r in GPU_RULES)


def test_hydra_slurm_launchers_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = REPO / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
        assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
        test = compose(config_name=None, overrides=["hydra/launcher=slurm_local_test"], return_hydra_config=True)
        assert test.hydra.launcher.gres is None
        assert test.hydra.launcher._target_ == launcher["_target_"]


# --------------------------------------------------------------------- on the cluster

@dataclass
class DagRuns:
    workdir: Path
    failed: Run
    resumed: Run
    after_failure: dict = field(default_factory=dict, repr=False)   # output file -> mtime after run 1
    after_resume: dict = field(default_factory=dict, repr=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def prepared_model(request):
    """The embedded model folder to seed the runs with (None: each run prepares it)."""
    return None if PREPARE_MODEL else request.getfixturevalue("embedded_model_dir")


@pytest.fixture(scope="module")
def snapshot(pipeline_repo, work) -> Path:
    """One copy of the pipeline's sources, from which the SLURM run (and a local reference run here, see
    ``local_dag``) are copied (same code)."""
    src = copy_pipeline(pipeline_repo, work / "src")
    if not FULL_SMOKE:
        import yaml

        cfg = yaml.safe_load((src / SMOKE).read_text())
        cfg["grid"] = TEST_GRID
        if "transfer_corpora" in cfg:
            cfg["transfer_corpora"] = []
        (src / CONFIGFILE).write_text("# tests/slurm: the smoke DAG on a smaller grid\n" + yaml.safe_dump(cfg))
    return src


@pytest.fixture(scope="module")
def slurm_dag(slurm_cluster, snapshot, work, prepared_model) -> DagRuns:
    """The smoke DAG through SLURM: first with FAIL_RULE failing, then resumed."""
    wd = copy_pipeline(snapshot, work / "slurm")
    if prepared_model:
        seed_model(prepared_model, wd)
    hook = work / "failhook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pp = os.pathsep.join(p for p in [str(hook), os.environ.get("PYTHONPATH", "")] if p)
    # the local test cluster answers at once: start polling job states after 2 s and poll again after 1 s
    # (the executor plugin still adds 10 s to the wait after each poll that finds nothing finished, so a
    # stage's end is seen 1-20 s late; each stage of the chain waits for that before the next is submitted)
    fast = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "1"]

    failed = snakemake(wd, "slurm", work / "slurm-run1.log", *fast,
                       env=clean_env(PYTHONPATH=pp, LOKI_TEST_FAIL_STAGE=FAIL_RULE))
    after_failure = output_files(wd)
    resumed = snakemake(wd, "slurm", work / "slurm-run2.log", *fast, env=clean_env())
    return DagRuns(wd, failed, resumed, after_failure, output_files(wd))


@pytest.fixture(scope="module")
def local_dag(request, work) -> Path:
    """The folder of the local reference run (workflow/profiles/local): the session's smoke DAG (tests/conftest.py
    ``smoke_dag``, the full smoke grid, which tests/test_pipeline.py checks too) where it is the same pipeline and
    config file; else (LOKI_SLURM_TEST_REPO / _CONFIGFILE / _PREPARE_MODEL set) this test's config run here."""
    if SHARED_REFERENCE:
        return request.getfixturevalue("smoke_dag")
    snap, model = request.getfixturevalue("snapshot"), request.getfixturevalue("prepared_model")
    wd = copy_pipeline(snap, work / "local")
    if model:
        seed_model(model, wd)
    r = run(snakemake_cmd("local"), wd, clean_env(), work / "local.log")
    assert r.returncode == 0, r.tail()
    return wd


@pytest.mark.slurm
def test_cluster_is_up_with_accounting(slurm_cluster):
    info = subprocess.run(["sinfo", "-h", "-o", "%P %a %t %D"], capture_output=True, text=True, check=True).stdout
    assert CLUSTER_ENV["LOKI_SLURM_PARTITION"] in info and "up" in info, info
    jid = subprocess.run(["sbatch", "--parsable", "-n1", "--mem=100", "-t", "2", "-o", "/dev/null",
                          "-J", "loki-slurm-probe", "--wrap", "true"],
                         capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    for _ in range(120):
        rows = sacct("-j", jid)
        if rows and rows[0]["State"] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    assert rows and rows[0]["State"] == "COMPLETED", rows


@pytest.mark.slurm
def test_failed_cluster_job_is_reported_with_its_log(slurm_dag):
    r = slurm_dag.failed
    assert r.returncode != 0, "the forced failure did not happen\n" + r.tail()
    assert r.slurm_run_id, "no 'SLURM run ID' -- did the SLURM executor run?\n" + r.tail()
    assert r.submitted, "no job was submitted to SLURM\n" + r.tail()
    assert re.search(rf"Error in rule {FAIL_RULE}\b", r.output), r.tail()
    # the executor's SLURM log of the failed job, printed by Snakemake
    logs = re.findall(rf"(/\S*\.snakemake/slurm_logs/rule_{FAIL_RULE}/\S*?\d+\.log)", r.output)
    assert logs, f"no SLURM log path of rule {FAIL_RULE} in Snakemake's output\n" + r.tail()
    assert all(Path(p).is_file() for p in logs), logs
    # the reason is in one of the logs Snakemake points at (SLURM log or the rule's log:)
    named = set(logs) | {str(slurm_dag.workdir / m) for m in re.findall(r"\blog: (\S+?),? ", r.output)}
    texts = [Path(p).read_text(errors="replace") for p in named if Path(p).is_file()]
    assert any(FAIL_TEXT in t for t in texts) or FAIL_TEXT in r.output, \
        f"the failure's message is in none of the logs {sorted(named)}\n" + r.tail()
    # everything upstream completed despite the failure (keep-going)
    assert len(r.submitted) >= 2, r.tail()
    assert SUMMARY not in slurm_dag.after_failure, f"{SUMMARY} was written although {FAIL_RULE} failed"


@pytest.mark.slurm
def test_rerun_resumes_from_what_completed(slurm_dag):
    r = slurm_dag.resumed
    assert r.returncode == 0, r.tail()
    assert (slurm_dag.workdir / SUMMARY).is_file()
    ran = {rule for rule in r.job_stats if rule != "all"}
    assert ran == {FAIL_RULE}, f"the rerun ran {r.job_stats}, expected only {FAIL_RULE}\n" + r.tail()
    # (the failed rule's own log files are rewritten, of course)
    own = [f for f in slurm_dag.after_failure if FAIL_RULE in Path(f).parts or Path(f).stem == FAIL_RULE]
    changed = [f for f, t in slurm_dag.after_failure.items()
               if f not in own and slurm_dag.after_resume.get(f) != t]
    assert not changed, f"completed outputs were recomputed: {changed[:20]}"
    rows = sacct("--name", r.slurm_run_id)
    assert rows and all(row["Comment"].startswith(f"rule_{FAIL_RULE}") for row in rows), rows
    assert all(row["State"] == "COMPLETED" for row in rows), rows


@pytest.mark.slurm
def test_dag_jobs_went_through_slurm(slurm_dag):
    first, second = slurm_dag.failed, slurm_dag.resumed
    rows = {row["JobID"]: row for row in sacct("--name", first.slurm_run_id)}
    assert set(first.submitted.values()) == set(rows), (first.submitted, rows)
    rules = {re.sub(r"_wildcards_.*", "", row["Comment"]).removeprefix("rule_") for row in rows.values()}
    scheduled = set(first.job_stats) - {"all"}
    stages = scheduled & set(GPU_RULES + CPU_RULES)        # the pipeline's stages must run as SLURM jobs
    assert stages and stages <= rules <= scheduled, f"rules in sacct {rules}, scheduled {scheduled}"
    for row in rows.values():
        want = "FAILED" if row["Comment"].startswith(f"rule_{FAIL_RULE}") else "COMPLETED"
        assert row["State"] == want, row
        assert row["Account"] == CLUSTER_ENV["LOKI_SLURM_ACCOUNT"], row
        assert row["Partition"] == CLUSTER_ENV["LOKI_SLURM_PARTITION"], row
    assert second.slurm_run_id and second.slurm_run_id != first.slurm_run_id


@pytest.mark.slurm
def test_hydra_sweep_through_submitit(slurm_dag, work):
    """A two-point `-m` sweep, one SLURM job per point; its points equal the DAG's."""
    assert slurm_dag.resumed.returncode == 0, "the smoke DAG (resources for the sweep) did not complete"
    wd = slurm_dag.workdir
    name = f"loki-sweep-{uuid.uuid4().hex[:8]}"
    s_dir = work / "sweep-slurm"
    r = run([sys.executable, "-m", SWEEP_APP, "-m", *SWEEP_ARGS, "hydra/launcher=slurm_local_test",
             f"hydra.sweep.dir={s_dir}", f"hydra.launcher.name={name}"], wd, clean_env(), work / "sweep.log",
            timeout=600)
    assert r.returncode == 0, r.tail()
    assert "Submitit 'slurm' sweep" in r.output, r.tail()
    metrics = sorted(s_dir.rglob("metrics.json"))
    assert len(metrics) == 2, (metrics, r.tail())
    assert len(list(s_dir.glob(".submitit/*"))) >= 1, "no submitit job folders"
    # submitit returns once the results are pickled; SLURM marks the jobs done a moment later
    for _ in range(120):
        rows = sacct("--name", name)
        if len(rows) == 2 and all(row["State"] not in ("PENDING", "RUNNING", "COMPLETING") for row in rows):
            break
        time.sleep(0.5)
    assert len(rows) == 2 and all(row["State"] == "COMPLETED" for row in rows), rows
    assert len({row["JobID"].split("_")[0] for row in rows}) == 1, rows          # one job array
    assert all(row["Account"] == CLUSTER_ENV["LOKI_SLURM_ACCOUNT"] for row in rows), rows
    # the same configuration computed by the DAG (SLURM run): the same numbers
    dag = {}
    for p in (wd / "results").rglob("metrics.json"):
        m = json.loads(p.read_text())
        dag[(m.get("method"), str(m.get("d")), str(m.get("k")))] = (p, m)
    matched = 0
    for p in metrics:
        m = json.loads(p.read_text())
        key = (m.get("method"), str(m.get("d")), str(m.get("k")))
        if key not in dag:
            continue
        matched += 1
        other = dag[key][1]
        drop = ("config", "result")      # the sweep's own paths and overrides
        d = diff_values({k: v for k, v in m.items() if k not in drop}, {k: v for k, v in other.items() if k not in drop},
                        f"{p.relative_to(s_dir)} vs {dag[key][0].relative_to(wd)}")
        assert not d, "the sweep and the DAG disagree on the same configuration:\n" + "\n".join(d[:40])
    if os.environ.get("LOKI_SLURM_TEST_SWEEP_ARGS") is None:
        assert matched == 2, f"sweep points {[json.loads(p.read_text()).get('d') for p in metrics]} not in the DAG"


@pytest.mark.slurm
def test_slurm_outputs_equal_local_outputs(slurm_dag, local_dag):
    """Every output of the SLURM run equals the local run's: its summary rows, its metrics.json files, the set of
    its files. The local reference may be the full smoke grid (``smoke_dag``), a superset of the SLURM run's
    TEST_GRID: then the SLURM run's rows, metrics and files must be among the local run's and equal to them; with
    the same config file (LOKI_SLURM_TEST_FULL_SMOKE=1, or a reference run here), the two sets must be equal.
    Last in this file: the shared reference may still be running on another xdist worker."""
    same = FULL_SMOKE or not SHARED_REFERENCE
    s_sum, l_sum = slurm_dag.workdir / SUMMARY, local_dag / SUMMARY
    assert s_sum.is_file() and l_sum.is_file()
    s_rows, l_rows = read_csv(s_sum), read_csv(l_sum)
    assert s_rows, f"{SUMMARY} is empty"
    if not same:   # the local rows of the SLURM run's points, in its order
        point = lambda r: (r.get("eval"), r.get("tag"))  # noqa: E731
        by_point = {point(r): r for r in l_rows}
        missing = [point(r) for r in s_rows if point(r) not in by_point]
        assert not missing, f"points of the SLURM run missing from the local {SUMMARY}: {missing}"
        l_rows = [by_point[point(r)] for r in s_rows]
    diffs = diff_values(s_rows, l_rows, SUMMARY)
    assert not diffs, "SLURM and local summaries differ:\n" + "\n".join(diffs[:40])
    # every per-job metrics.json too
    s_metrics = {p.relative_to(slurm_dag.workdir): p for p in (slurm_dag.workdir / "results").rglob("metrics.json")}
    l_metrics = {p.relative_to(local_dag): p for p in (local_dag / "results").rglob("metrics.json")}
    assert set(s_metrics) == set(l_metrics) if same else set(s_metrics) <= set(l_metrics), \
        sorted(set(s_metrics) ^ set(l_metrics))
    for rel in sorted(s_metrics):
        d = diff_values(json.loads(s_metrics[rel].read_text()), json.loads(l_metrics[rel].read_text()), str(rel))
        assert not d, "\n".join(d[:40])
    # the same set of outputs (or a subset of the full grid's)
    s_files, l_files = set(slurm_dag.after_resume), set(output_files(local_dag))
    if same:
        assert s_files == l_files, sorted(s_files ^ l_files)[:40]
    else:
        assert s_files <= l_files, sorted(s_files - l_files)[:40]
