"""The whole DAG on the embedded model: lint, dry run, the smoke DAG end to end, rerun is a no-op,
and a Hydra run of the same point reproduces the DAG's number."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
from loki_testutils import REPO, SMOKE_DAG_ARGS, run_py

SNAKEMAKE = ["-m", "snakemake"]


def test_snakemake_lint_and_dry_run():
    res = run_py([*SNAKEMAKE, "--lint"], check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for extra in ([], ["--configfile", "conf/sweep/smoke.yaml"]):
        res = run_py([*SNAKEMAKE, "-n", "--quiet", *extra], check=False)
        assert res.returncode == 0, res.stderr[-3000:]
    # `--config key=value` alone sets one key of the default sweep (docs/generation.md's `--config bench=h200`); it
    # used to replace the whole config and fail validation ("'experiment' is a required property")
    res = run_py([*SNAKEMAKE, "-n", "bench_decode", "--config", "bench=h200"], check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "results/default/bench/decode.json" in res.stdout and "gpu=1" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(threads=0), "0 is less than the minimum of 1"),
    (lambda c: c.update(trasnfer_corpora=[]), "'trasnfer_corpora' was unexpected"),  # a misspelt key: a skipped stage
    (lambda c: c["grid"]["loki"].append({"dd": [8], "k": 0.25}), "option(s) ['dd'] are not options of 'loki'"),
    (lambda c: c.update(calib_corpus="lee_nws"), "no corpus 'lee_nws' (conf/corpus/lee_nws.yaml)"),  # was a traceback
])
def test_config_schema_rejects_bad_config(tmp_path, change, needle):
    import yaml

    cfg = yaml.safe_load((REPO / "conf" / "sweep" / "smoke.yaml").read_text())  # a whole config, one thing wrong
    change(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    res = run_py([*SNAKEMAKE, "-n", "--configfile", str(bad)], check=False)
    assert res.returncode != 0 and needle in (res.stdout + res.stderr), (res.stdout + res.stderr)[-2000:]


@pytest.mark.slow
def test_smoke_dag_end_to_end(smoke_dag):
    """conf/sweep/smoke.yaml through workflow/profiles/local with W&B offline (the `smoke_dag` fixture,
    tests/conftest.py: run once, tests/slurm compares its SLURM run with it)."""
    res_dir = smoke_dag / "results" / "smoke"
    df = pd.read_csv(res_dir / "summary.csv")
    ppl = df[df["eval"] == "perplexity"]
    assert set(ppl.method) >= {"dense", "exact_topk", "loki"}
    loki = ppl[ppl.method == "loki"]
    assert len(loki) >= 4 and loki.ppl.notna().all()
    dense = float(ppl[ppl.method == "dense"].ppl.iloc[0])
    assert 1 < dense < 1000
    assert (loki.ppl > dense).all(), "sparse attention should not beat dense here"
    assert (res_dir / "heatmap.png").stat().st_size > 1000
    assert (res_dir / "pca" / "smollm2-135m" / "lee_news" / "rank.csv").exists()

    # one offline W&B run per job, grouped by experiment, named by stage
    from loki.tracking import read_offline_run

    runs = [read_offline_run(d) for d in sorted((res_dir / "wandb").glob("offline-run-*"))]
    stages = sorted(r["run"]["job_type"] for r in runs)
    n_eval = len(list(res_dir.glob("evaluate/*/*/metrics.json")))
    assert stages.count("evaluate") == n_eval and {"extract_keys", "fit_pca", "report"} <= set(stages)
    assert all(r["run"]["group"] == "smoke" for r in runs)
    by_name = {r["run"]["name"]: r for r in runs}
    assert len(by_name) == len(runs), "every job's run has a name of its own"
    assert all(r["run"].get("exit_code") == 0 for r in runs), "every job's run finished"
    assert all("snakemake" in r["run"]["tags"] for r in runs), "DAG runs are tagged (ad-hoc runs are not)"
    m = json.loads((res_dir / "evaluate" / "perplexity" / "loki-d8-k0.25" / "metrics.json").read_text())
    assert by_name["evaluate-perplexity-loki-d8-k0.25"]["summary"]["ppl"] == pytest.approx(m["ppl"], rel=1e-12)
    # each run records the config sections its stage reads: a filter on method.name finds evaluations only
    for r in runs:
        prefixes = {k.split(".")[0] for k in r["config"]}
        stage = r["run"]["job_type"]
        assert ("method" in prefixes) == (stage in ("evaluate", "bench")), (stage, sorted(prefixes))
        assert ("extract" in prefixes) == (stage == "extract_keys"), (stage, sorted(prefixes))

    # rerunning does nothing
    again = run_py(SMOKE_DAG_ARGS, cwd=smoke_dag, env={"WANDB_MODE": "offline"})
    assert "Nothing to be done" in again.stdout + again.stderr

    # the same point by hand through a Hydra multirun gives the same number
    sweep = smoke_dag / "multirun-check"
    run_py(["-m", "loki.evaluate", "-m", "experiment=smoke", "corpus@data=enwiki_sample", "method=loki", "method.d=8",
            "method.k=0.25", "threads=1", f"hydra.sweep.dir={sweep}"], cwd=smoke_dag, env={"WANDB_MODE": "disabled"})
    m2 = json.loads(next(sweep.glob("*/metrics.json")).read_text())
    assert m2["ppl"] == m["ppl"]


# ----------------------------------------------------------------------------------------------------------
# dry runs on a copy of the workflow and its config (no job runs)


def _dag_copy(tmp_path):
    dst = tmp_path / "repo"
    dst.mkdir()
    for name in ("Snakefile", "workflow", "conf", "environment.yml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def _smk(repo, *args):
    res = run_py([*SNAKEMAKE, *args], cwd=repo, check=False)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout + res.stderr


def _job_counts(out):
    """{rule: count} from a dry run's 'Job stats' table ({} when there is nothing to do)."""
    import re

    if "Job stats:" not in out:
        return {}
    table = out.split("Job stats:")[1].split("\n\n")[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


def _sweep(repo, grid, transfer=()):
    import yaml

    cfg = {"experiment": "smoke", "model": "smollm2-135m", "calib_corpus": "lee_news", "eval_corpus": "enwiki_sample",
           "transfer_corpora": list(transfer), "grid": grid}
    path = repo / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["--configfile", str(path)]


def test_config_edit_reruns_the_jobs_that_read_it(tmp_path):
    """The rules pass `experiment=<name>`, not the config, so an edit under conf/ once left `snakemake -n` at "Nothing
    to be done". Each job's params now hash the config its stage reads: an edit reruns those jobs and what depends
    on them, and nothing else."""
    repo = _dag_copy(tmp_path)
    sweep = ["--configfile", "conf/sweep/smoke.yaml"]
    for line in _smk(repo, "--summary", *sweep).splitlines()[1:]:  # every output in place...
        f = repo / line.split("\t")[0]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.mkdir() if f.parent.name == "report" else f.touch()
    _smk(repo, "--touch", "--forceall", "--cores", "1", *sweep)  # ...recorded as made with this config
    assert _job_counts(_smk(repo, "-n", *sweep)) == {}

    exp = repo / "conf" / "experiment" / "smoke.yaml"
    text = exp.read_text()
    exp.write_text(text.replace("num_windows: 2", "num_windows: 3"))  # an eval setting: the evaluations only
    assert _job_counts(_smk(repo, "-n", *sweep)) == {"evaluate": 6, "report": 1, "all": 1, "total": 8}
    # an extraction setting: both corpora's keys and PCA, the transfer matrix, the Loki points (dense and exact_topk
    # read no basis)
    exp.write_text(text.replace("num_tokens: 1024", "num_tokens: 2048"))
    assert _job_counts(_smk(repo, "-n", *sweep)) == {"extract_keys": 2, "fit_pca": 2, "transfer": 1, "evaluate": 4,
                                                     "report": 1, "all": 1, "total": 11}
    exp.write_text(text + "# a comment\n")
    loki = repo / "conf" / "method" / "loki.yaml"
    loki_text = loki.read_text()
    loki.write_text(loki_text.replace("sink_tokens: 0", "sink_tokens: 1"))  # a method's default: its points only
    assert _job_counts(_smk(repo, "-n", *sweep)) == {"evaluate": 4, "report": 1, "all": 1, "total": 6}
    loki.write_text(loki_text)
    main = repo / "conf" / "config.yaml"
    main_text = main.read_text()
    main.write_text(main_text.replace("allow_foreign_basis: false", "allow_foreign_basis: true"))  # evaluate, bench
    assert _job_counts(_smk(repo, "-n", *sweep)) == {"evaluate": 6, "report": 1, "all": 1, "total": 8}
    main.write_text(main_text)
    # what never changes a result: comments (above), speed knobs (parallel PCA layers, extraction batch), W&B, the
    # hydra run dir
    for f, a, b in (("pca/default.yaml", "n_jobs: null", "n_jobs: 1"),
                    ("extract/default.yaml", "batch_size: 1", "batch_size: 2")):
        p = repo / "conf" / f
        p.write_text(p.read_text().replace(a, b))
    assert _job_counts(_smk(repo, "-n", *sweep)) == {}
    main = repo / "conf" / "config.yaml"
    main.write_text(main.read_text().replace("mode: offline", "mode: disabled").replace("outputs/${experiment_name}",
                                                                                       "elsewhere/${experiment_name}"))
    assert _job_counts(_smk(repo, "-n", *sweep)) == {}


def test_grid_values_reach_hydra_as_typed(tmp_path):
    """A grid's null once reached Hydra as `None` (a string); lists, floats and booleans in Hydra's own syntax."""
    from loki.common import compose_config

    repo = _dag_copy(tmp_path)
    # (a null that differs from the method's default: an option at its default is not passed at all)
    conf = repo / "conf" / "method" / "loki.yaml"
    conf.write_text(conf.read_text().replace("d_variance: null", "d_variance: 0.9"))
    grid = {"loki": [{"d": 8, "d_variance": None, "k": 0.125, "sparse_prefill": False, "dense_layers": [[0, 1]]}]}
    out = _smk(repo, "-n", "-p", *_sweep(repo, grid))
    cmd = next(line for line in out.splitlines() if "-m loki.evaluate" in line)
    assert "method.d_variance=null" in cmd and "'method.dense_layers=[0,1]'" in cmd, cmd
    import shlex

    args = shlex.split(cmd.split("-m loki.evaluate", 1)[1].split(">")[0])
    method = compose_config([a for a in args if not a.startswith(("hydra.", "threads="))]).method
    assert (method.d, method.d_variance, method.k, method.sparse_prefill) == (8, None, 0.125, False)
    assert list(method.dense_layers) == [0, 1]
    # the job's folder (hydra.run.dir, the log's name) holds no list brackets: `hydra.run.dir=...[0,1]` is a Hydra
    # parse error, and `> ...[0,1].log` a shell glob that wrote into an existing `...0.log`
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = OverridesParser.create().parse_override(next(a for a in args if a.startswith("hydra.run.dir="))).value()
    assert run_dir.endswith("loki-d8-d_variancenull-dense_layers0_1-k0.125-sparse_prefillfalse"), run_dir
    log = shlex.split(cmd.split(">", 1)[1])[0]
    assert log.endswith("/loki-d8-d_variancenull-dense_layers0_1-k0.125-sparse_prefillfalse.log"), log


def test_stage_sections_agree_with_the_runs_they_log():
    """The config sections each stage reads: one map hashes a job's config (workflow/rules/common.smk) and another
    trims its W&B run's config (loki/tracking.py); they must name the same sections."""
    import ast

    from loki.tracking import STAGE_SECTIONS

    src = (REPO / "workflow" / "rules" / "common.smk").read_text()
    start = src.index("STAGE_SECTIONS = {")
    dag = ast.literal_eval(src[start + len("STAGE_SECTIONS = "): src.index("}", start) + 1])
    ours = {("bench_decode" if k == "bench" else k): v for k, v in STAGE_SECTIONS.items() if k != "prepare"}
    assert dag == ours


def test_grid_points_sharing_a_folder_are_refused(tmp_path):
    """Two points whose values print alike in a folder name ([0,1] and '0_1') would write one result."""
    repo = _dag_copy(tmp_path)
    grid = {"loki": [{"dense_layers": [[0, 1]]}, {"dense_layers": "0_1"}]}
    res = run_py([*SNAKEMAKE, "-n", *_sweep(repo, grid)], cwd=repo, check=False)
    assert res.returncode != 0 and "share the folder name 'loki-dense_layers0_1'" in res.stdout + res.stderr, res


def test_an_option_written_at_its_default_is_the_same_point(tmp_path):
    """`rope: post` or `group_reduce: max` (conf/method defaults) written out is the point without them: one job and
    one folder, as loki.evaluate names it (it ran twice and the report then refused the pair as duplicates); d and
    k always name a point; a block's `evals` may be one name."""
    repo = _dag_copy(tmp_path)
    grid = {"loki": [{"d": 16, "k": 0.25}, {"d": 16, "k": 0.25, "rope": "post", "d_variance": None},
                     {"d": 16, "k": 0.25, "selection": "group", "group_reduce": ["max", "sum"], "evals": "perplexity"}]}
    out = _smk(repo, "-n", *_sweep(repo, grid))
    assert _job_counts(out)["evaluate"] == 3, out[-3000:]
    tags = set(re.findall(r"evaluate/perplexity/([\w.+-]+)/metrics.json", out))
    assert tags == {"loki-d16-k0.25", "loki-d16-k0.25-selectiongroup", "loki-d16-group_reducesum-k0.25-selectiongroup"}


def test_baselines_alone_need_no_keys_nor_pca(tmp_path):
    """Only methods that read the basis (loki, loki_h2o, pca_attn with basis=offline) wait for extract_keys and
    fit_pca; a grid of baselines (and Loki's online basis) schedules neither."""
    repo = _dag_copy(tmp_path)
    grid = {"dense": [{}], "h2o": [{"k": 0.25}], "sparq": [{"k": 0.25}], "quest": [{"k": 0.25}],
            "exact_topk": [{"k": 0.25}], "loki": [{"d": 8, "basis": "online"}]}
    jobs = _job_counts(_smk(repo, "-n", *_sweep(repo, grid)))
    assert jobs["evaluate"] == 6 and "extract_keys" not in jobs and "fit_pca" not in jobs, jobs
    grid["pca_attn"] = [{"d": 8}]
    jobs = _job_counts(_smk(repo, "-n", *_sweep(repo, grid)))
    assert jobs["evaluate"] == 7 and jobs["extract_keys"] == 1 and jobs["fit_pca"] == 1, jobs


def test_extract_keys_job_resumes_under_snakemake(tmp_path, tiny_model_dir, text_file):
    """Snakemake deletes a failed job's outputs: extract_keys once kept its progress in manifest.json, its output,
    so a killed job restarted from scratch. Now the progress is in progress.json and the rerun resumes."""
    from loki.common import compose_config
    from loki.extract_keys import extract

    repo = _dag_copy(tmp_path)
    shutil.copytree(REPO / "loki", repo / "loki", ignore=shutil.ignore_patterns("__pycache__"))  # (reads ./conf)
    conf = repo / "conf"
    (conf / "model" / "tiny.yaml").write_text(f"name: tiny\nid: null\nrevision: null\npath: {tiny_model_dir}\n"
                                              "dtype: float32\ntrust_remote_code: false\nsource: null\n")
    (conf / "corpus" / "text.yaml").write_text(f"name: text\npath: {text_file}\nhf_dataset: null\nsource: null\n")
    exp = conf / "experiment" / "tiny.yaml"
    settings = "extract: {num_tokens: 256, seq_len: 64, shard_tokens: 128}\ndevice: cpu\n"
    exp.write_text("# @package _global_\nexperiment_name: tiny\n" + settings.replace("}", ", stop_after_shards: 1}"))
    import yaml

    (repo / "sweep.yaml").write_text(yaml.safe_dump({"experiment": "tiny", "model": "tiny", "calib_corpus": "text",
                                                     "eval_corpus": "text", "grid": {"dense": [{}]}}))
    keys = repo / "results" / "tiny" / "keys" / "tiny" / "text"
    job = [str(keys.relative_to(repo) / "manifest.json"), "--cores", "1", "--configfile", "sweep.yaml"]
    res = run_py([*SNAKEMAKE, *job], cwd=repo, check=False)  # the job dies after its first shard
    assert res.returncode != 0 and not (keys / "manifest.json").exists(), res.stderr[-3000:]
    assert len(json.loads((keys / "progress.json").read_text())["shards"]) == 1
    first = (keys / "shard_00000.safetensors").stat().st_ino
    exp.write_text("# @package _global_\nexperiment_name: tiny\n" + settings)
    _smk(repo, *job)
    log = (repo / "results" / "tiny" / "logs" / "extract_keys" / "tiny" / "text.log").read_text()
    assert "resuming after 1 complete shard(s)" in log, log[-2000:]
    assert (keys / "shard_00000.safetensors").stat().st_ino == first and not (keys / "progress.json").exists()
    # the same manifest as an uninterrupted extraction
    fresh = tmp_path / "fresh"
    cfg = compose_config(["experiment=smoke", f"model.path={tiny_model_dir}", "model.name=tiny", "model.source=null",
                          f"calib.path={text_file}", "calib.name=text", "calib.source=null", "device=cpu",
                          "extract.num_tokens=256", "extract.seq_len=64", "extract.shard_tokens=128"])
    want = extract(cfg, fresh, progress=False)
    got = json.loads((keys / "manifest.json").read_text())
    assert {**got, "seconds": 0} == {**json.loads(json.dumps(want)), "seconds": 0}
