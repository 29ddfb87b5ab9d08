"""The stages as a user runs them (subprocesses): Hydra multirun, W&B offline runs, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from loki_testutils import run_py, save_tiny_model


def tiny_overrides(model_dir, text_file, **extra):
    ov = [f"model.path={model_dir}", "model.name=tiny", "model.source=null", f"data.path={text_file}", "data.name=text",
          "data.source=null", "eval.window=64", "eval.num_windows=2", "device=cpu", "threads=1"]
    return ov + [f"{k}={v}" for k, v in extra.items()]


def test_hydra_multirun_two_d_values_writes_two_results(tmp_path, tiny_model_dir, text_file):
    sweep = tmp_path / "sweep"
    run_py(["-m", "loki.evaluate", "-m", *tiny_overrides(tiny_model_dir, text_file), "method=loki", "method.basis=online",
            "method.d=2,8", "method.k=0.25", f"hydra.sweep.dir={sweep}"])
    results = sorted(sweep.glob("*/metrics.json"))
    assert len(results) == 2
    ms = [json.loads(p.read_text()) for p in results]
    assert sorted(m["d"] for m in ms) == [2, 8]
    assert all(m["method"] == "loki" and m["tokens"] == 2 * 63 and m["attention_calls"] > 0 for m in ms)
    assert ms[0]["ppl"] != ms[1]["ppl"]


def test_hydra_multirun_goes_on_past_a_bad_point_and_fails_at_the_end(tmp_path, tiny_model_dir, text_file):
    """A bad point (d above the tiny model's head dim 16) in the middle of a sweep: the points after it still run,
    the bad one leaves error.txt and no metrics, and the sweep exits 2 naming it."""
    sweep = tmp_path / "sweep"
    res = run_py(["-m", "loki.evaluate", "-m", *tiny_overrides(tiny_model_dir, text_file), "method=loki",
                  "method.basis=online", "method.d=2,17,8", "method.k=0.25", f"hydra.sweep.dir={sweep}"], check=False)
    assert res.returncode == 2
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "2"]
    assert not (sweep / "1" / "metrics.json").exists()
    assert "d=17 is larger than the head dim" in (sweep / "1" / "error.txt").read_text()
    assert not list(sweep.glob("*/*.tmp"))
    assert "1 point(s) of the sweep failed" in res.stderr and "#1 " in res.stderr and "method.d=17" in res.stderr
    assert "#0 " not in res.stderr.split("point(s) of the sweep failed")[1]
    # the report reads the sweep folder as it is: its job folders are the results, the failed point is listed
    from loki.report import make_report

    rep = make_report(sweep, kernels_dir=None)
    t = rep.tidy
    assert sorted(t.tag) == ["0", "2"] and sorted(t.d) == [2, 8] and (t.method == "loki").all()
    assert t.attrs["ignored"] == [f"1 (failed point: {sweep / '1' / 'error.txt'})"]
    assert (sweep / "summary.csv").is_file() and (sweep / "report" / "quality" / "heatmap_perplexity.png").is_file()


def test_multirun_points_that_differ_in_another_option_get_their_own_wandb_names(tmp_path):
    """Outside Snakemake a run is named after the eval and the point: the method, d, k and every option that
    differs from conf/method/<method>.yaml (two points of one (d, k) with rope=post / pre were one name)."""
    from loki.common import compose_config
    from loki.evaluate import apply_decode_only, run_tag, wandb_name

    def name(*ov):
        cfg = compose_config(list(ov))
        apply_decode_only(cfg)
        return wandb_name(cfg, tmp_path / "multirun" / "3", run_tag(cfg))

    assert name("method=loki") == "evaluate-perplexity-loki-d16-k0.25"
    assert name("method=loki", "method.rope=pre") == "evaluate-perplexity-loki-d16-k0.25-rope_pre"
    assert name("method=loki", "method.selection=group", "method.dense_layers=2") == \
        "evaluate-perplexity-loki-d16-k0.25-dense_layers_2-selection_group"
    assert name("method=sparq", "method.r=32") == "evaluate-perplexity-sparq-k0.25-r_32"
    assert name("method=dense") == "evaluate-perplexity-dense"
    assert name("method=loki", "eval=passkey_decode") == "evaluate-passkey_decode-loki-d16-k0.25", \
        "the eval's own sparse_prefill=false is not a variant"
    assert name("method=loki", "method.local_window=[0,1]").endswith("-local_window__0__1_"), "a safe name"
    cfg = compose_config(["method=loki", "method.rope=pre"])  # under Snakemake: the rule's folder names the point
    assert wandb_name(cfg, tmp_path / "evaluate" / "perplexity" / "loki-d16-k0.25-ropepre", run_tag(cfg)) == \
        "evaluate-perplexity-loki-d16-k0.25-ropepre"


def test_wandb_offline_run_read_back(tmp_path, tiny_model_dir, text_file):
    from loki.tracking import read_offline_run

    out = tmp_path / "run"
    run_py(["-m", "loki.evaluate", *tiny_overrides(tiny_model_dir, text_file), "method=exact_topk", "method.k=0.5",
            f"hydra.run.dir={out}", f"wandb.dir={tmp_path}", "experiment_name=wbtest"], env={"WANDB_MODE": "offline"})
    metrics = json.loads((out / "metrics.json").read_text())
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline run per job"
    rec = read_offline_run(runs[0])
    assert rec["run"]["group"] == "wbtest" and rec["run"]["job_type"] == "evaluate"
    assert rec["run"]["name"] == "evaluate-perplexity-exact_topk-k0.5" and "snakemake" not in rec["run"]["tags"]
    assert rec["summary"]["ppl"] == pytest.approx(metrics["ppl"], rel=1e-12)
    assert rec["config"]["method.name"] == "exact_topk" and rec["config"]["method.k"] == 0.5


def test_wandb_run_of_a_failed_job_is_marked_failed(tmp_path, tiny_model_dir, text_file):
    """A job that fails (here: d above the head dim) leaves no metrics, and its offline run says it failed (exit
    code 1, the error in the summary), so a `wandb sync` never shows it as a finished result."""
    from loki.tracking import read_offline_run

    out = tmp_path / "run"
    res = run_py(["-m", "loki.evaluate", *tiny_overrides(tiny_model_dir, text_file), "method=loki",
                  "method.basis=online", "method.d=17", f"hydra.run.dir={out}", f"wandb.dir={tmp_path}",
                  "wandb.group=resources"], env={"WANDB_MODE": "offline"}, check=False)
    assert res.returncode == 2 and not (out / "metrics.json").exists()
    assert "error (loki.evaluate): loki: d=17 is larger than the head dim" in res.stderr  # the stage, not __main__
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rec = read_offline_run(runs[0])
    assert rec["run"]["exit_code"] == 1
    assert rec["run"]["group"] == "resources", "wandb.group overrides the experiment (the DAG's prepare jobs)"
    assert "larger than the head dim" in rec["summary"]["error"]
    assert "ppl" not in rec["summary"]


def test_wandb_online_without_a_login_is_one_clear_error(tmp_path, tiny_model_dir, text_file):
    """WANDB_MODE=online with no API key (no `wandb login`): exit code 2 and one message that says how to log in or
    go back to offline mode, before any work."""
    out = tmp_path / "run"
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR":
           str(tmp_path / "wbconf"), "NETRC": str(tmp_path / "netrc")}
    res = run_py(["-m", "loki.evaluate", *tiny_overrides(tiny_model_dir, text_file), "method=exact_topk",
                  "method.k=0.5", f"hydra.run.dir={out}", f"wandb.dir={tmp_path}"], env=env, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "W&B could not start an online run" in res.stderr and "wandb login" in res.stderr
    assert "WANDB_MODE=offline" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "metrics.json").exists()


def _fails(args, tmp_path, *needles):
    out = tmp_path / "err"
    res = run_py(["-m", "loki.evaluate", *args, f"hydra.run.dir={out}"], check=False)
    assert res.returncode != 0
    msg = res.stderr + res.stdout
    for n in needles:
        assert n in msg, f"{n!r} not in:\n{msg[-2000:]}"
    assert "Traceback" not in res.stderr, "a clear message, not a traceback"
    assert not (out / "metrics.json").exists(), "nothing half-written"
    return msg


def test_errors_are_clear_cli(tmp_path, tiny_model_dir, text_file):
    base = tiny_overrides(tiny_model_dir, text_file)
    _fails([*base, "method=nope"], tmp_path, "method/nope", "Available options in 'method'", "exact_topk")  # the list
    _fails([*base, "method=loki", "method.basis=online", "method.d=17"], tmp_path, "larger than the head dim 16",
           "How to fix")
    _fails([*base, "model.path=/nonexistent/model"], tmp_path, "/nonexistent/model", "How to fix")


@pytest.mark.parametrize("extra,needle", [
    (["method=loki", "method.basis=online", "method.k=0"], "k must be > 0"),
    (["method=exact_topk", "method.k=-1"], "k must be > 0"),
    (["data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["eval.window=4096"], "above the model's limit"),
    (["eval.num_windows=1000"], "lower the number of windows"),
    (["eval.window=0"], "eval.window must be an int >= 2, got 0"),
    (["eval.num_windows=-1"], "eval.num_windows must be an int >= 1 or null, got -1"),
    (["eval.num_windows=0"], "eval.num_windows must be an int >= 1 or null, got 0"),  # null is the whole corpus
    (["eval=selection", "eval.window=64", "eval.max_windows=0"], "eval.max_windows must be an int >= 1 or null"),
    (["method=loki", "method.basis=online", "method.d_variance=abc"], "d_variance must be a number in .0, 1., got 'abc'"),
    (["method=loki", "method.basis=online", "method.d=1.0"], "d must be an int >= 1 .dims. or a float in .0, 1."),
    (["method=loki", "method.basis=online", "method.d=16.0"], "d must be an int >= 1 .dims. or a float in .0, 1."),
    (["method=loki", "method.basis=online", "method.d=0.001"], "d=0.001 of the head dim 16 rounds to 0 dims"),
    (["method=loki", "method.basis=online", "method.slab_dtype=None"], "slab_dtype='None' is a string, not null"),
    (["method=loki", "allow_foreign_basis=maybe"], "allow_foreign_basis must be true or false"),
])
def test_errors_are_clear_in_process(extra, needle, tiny_model_dir, text_file):
    from test_extract_pca import compose

    from loki.common import LokiError
    from loki.evaluate import run_eval

    cfg = compose([*tiny_overrides(tiny_model_dir, text_file), *extra])
    with pytest.raises(LokiError, match=needle) as e:
        run_eval(cfg)
    assert "How to fix" in str(e.value)


def test_num_windows_null_is_the_whole_corpus(tiny_model_dir, text_file):
    from test_extract_pca import compose

    from loki.evaluate import run_eval

    m = run_eval(compose([*tiny_overrides(tiny_model_dir, text_file), "eval.num_windows=null"]))
    assert m["num_windows"] > 2 and m["tokens"] == m["num_windows"] * 63


def test_basis_of_another_model_same_shapes_needs_the_opt_in(tmp_path, tiny_model_dir, text_file):
    """A basis fitted for another model of the same shapes (here: the tiny model's own keys, fingerprinted as
    'tiny-base') is refused with both names and the fix; allow_foreign_basis=true runs it, and metrics.json
    records which model the basis was fitted for."""
    from test_extract_pca import compose

    from loki.common import LokiError
    from loki.evaluate import run_eval
    from loki.generation import fit_basis
    from loki.modeling import load_model
    from loki.pca import save_basis

    model = load_model(compose(tiny_overrides(tiny_model_dir, text_file)).model)
    basis = fit_basis(model, torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(0)))
    foreign, own = tmp_path / "base" / "pca.safetensors", tmp_path / "own" / "pca.safetensors"
    save_basis(foreign, basis.t, {"fingerprint": {**basis.fingerprint, "name": "tiny-base"}})
    save_basis(own, basis.t, {"fingerprint": basis.fingerprint})
    base = [*tiny_overrides(tiny_model_dir, text_file), "method=loki", "method.d=4", "eval.num_windows=1"]
    with pytest.raises(LokiError, match="(?s)made for model 'tiny-base', this model is 'tiny'.*allow_foreign_basis=true"):
        run_eval(compose([*base, f"pca_path={foreign}"]))
    m = run_eval(compose([*base, f"pca_path={foreign}", "allow_foreign_basis=true"]))
    assert (m["model"], m["basis_model"]) == ("tiny", "tiny-base") and m["config"]["allow_foreign_basis"] is True
    fp = basis.fingerprint  # the shape the report's byte ratio reads (head dim, GQA groups)
    assert m["model_shape"] == {"head_dim": fp["head_dim"], "num_heads": fp["num_heads"], "num_kv_heads": fp["num_kv_heads"]}
    m_own = run_eval(compose([*base, f"pca_path={own}"]))
    assert m_own["basis_model"] == "tiny" and m_own["ppl"] == m["ppl"]  # the same tensors
    assert run_eval(compose([*base, "method.basis=online"]))["basis_model"] is None


def test_pca_from_another_model_is_rejected(tmp_path, tiny_model_dir, text_file):
    other = save_tiny_model(tmp_path / "other", "llama", num_hidden_layers=3)
    keys, pca = tmp_path / "keys", tmp_path / "pca" / "pca.safetensors"
    common = [f"calib.path={text_file}", "calib.name=text", "calib.source=null", f"keys_dir={keys}", f"pca_path={pca}",
              "extract.num_tokens=256", "extract.seq_len=64", "extract.shard_tokens=128", "device=cpu",
              f"hydra.run.dir={tmp_path / 'h'}"]
    run_py(["-m", "loki.extract_keys", f"model.path={other}", "model.name=other", "model.source=null", *common])
    run_py(["-m", "loki.fit_pca", f"model.path={other}", "model.name=other", "model.source=null", *common])
    assert pca.exists() and (pca.parent / "rank.csv").exists() and (pca.parent / "rank.png").exists()
    _fails([*tiny_overrides(tiny_model_dir, text_file), "method=loki", f"pca_path={pca}"], tmp_path,
           "was made for model 'other'", "num_layers", "How to fix")


@pytest.mark.parametrize("in_process", [True, False])
def test_sweep_point_failure_by_launcher(monkeypatch, tmp_path, capsys, in_process):
    """Hydra's basic launcher runs the points in this process: a failed point returns, the sweep goes on and exits 2
    at the end. Under a cluster launcher (submitit) the point's own job must exit 2, or it would be reported done."""
    import sys

    import loki.app as app
    from loki.common import LokiError

    monkeypatch.setattr(app, "_multirun_job", lambda: (3, "method.d=99", tmp_path / "3", in_process))
    calls = []

    def bad(cfg):
        calls.append(1)
        raise LokiError("d=99 is too large")

    main = app.stage(bad)
    monkeypatch.setattr(sys, "argv", ["loki.bad", f"hydra.run.dir={tmp_path / 'run'}", "hydra.output_subdir=null"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and calls == [1]
    assert "d=99 is too large" in (tmp_path / "3" / "error.txt").read_text()
    err = capsys.readouterr().err
    assert ("1 point(s) of the sweep failed" in err and "#3 method.d=99: d=99 is too large" in err) == in_process


@pytest.mark.parametrize("launcher,in_process", [(None, True), ("slurm", False), ("slurm_local_test", False)])
def test_multirun_job_knows_whether_its_launcher_runs_points_in_process(tmp_path, launcher, in_process):
    """The detection behind the test above, on real composed launcher configs: only Hydra's basic launcher runs the
    points in this process (so a failed point may return); submitit's must exit non-zero."""
    if launcher is not None:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    from hydra.core.hydra_config import HydraConfig

    import loki.app as app
    from loki.common import compose_config

    def hydra_config(mode):
        ov = [f"hydra.mode={mode}", "hydra.job.num=4", f"hydra.runtime.output_dir={tmp_path}", "seed=3"]
        cfg = compose_config(ov + ([f"hydra/launcher={launcher}"] if launcher else []), return_hydra_config=True)
        cfg.hydra.overrides.task = ["seed=3"]
        return cfg

    try:
        HydraConfig.instance().set_config(hydra_config("MULTIRUN"))
        assert app._multirun_job() == (4, "seed=3", tmp_path, in_process)
        HydraConfig.instance().set_config(hydra_config("RUN"))
        assert app._multirun_job() is None
    finally:
        HydraConfig.instance().cfg = None
