"""The report stage's offline W&B run (made by the Snakemake run of the fixture, ``WANDB_MODE=offline``), read back
from disk with ``loki.tracking.read_offline_run`` (wandb's protobuf records of ``run-<id>.wandb``) and the media
files under the run's ``files/``: the run is named and grouped for a dashboard, and holds the tidy table and every
figure."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import report_fixture as fx
from loki import figures as F


def logged(history: dict, key: str) -> dict:
    """A logged media value ({_type, path, ...}) from the flat history (nested keys joined with '/')."""
    return {k[len(key) + 1:]: v for k, v in history.items() if k.startswith(key + "/")}


@pytest.fixture(scope="module")
def wandb_run(snakemake_run):
    from loki.tracking import read_offline_run

    runs = sorted((snakemake_run / "results" / fx.EXP / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"one offline run of the report stage expected, found {runs}"
    rec = read_offline_run(runs[0])
    history = {}
    for step in rec["history"]:
        history.update(step)
    return {"dir": runs[0], "run": rec["run"], "config": rec["config"], "history": history,
            "summary": rec["summary"], "work": snakemake_run}


def test_run_is_named_and_grouped_for_a_dashboard(wandb_run):
    run = wandb_run["run"]
    assert (run["group"], run["job_type"], run["name"], run["project"]) == (fx.EXP, "report", "report", "loki")
    config = wandb_run["config"]
    assert config["stage"] == "report" and config["experiment_name"] == fx.EXP
    assert config["model.name"] == fx.MODEL, "flat config keys, the same as the other stages"


def test_run_holds_the_tidy_table(wandb_run):
    entry = logged(wandb_run["history"], "results")
    assert entry["_type"] == "table-file"
    table = json.loads((wandb_run["dir"] / "files" / entry["path"]).read_text())
    df = pd.DataFrame(table["data"], columns=table["columns"])
    summary = pd.read_csv(wandb_run["work"] / "results" / fx.EXP / "summary.csv")
    assert len(df) == len(summary) == len(fx.POINTS)
    assert set(df.columns) == set(summary.columns) - {"config"}
    merged = df.merge(summary, on=["eval", "tag"], suffixes=("", "_csv"))
    assert len(merged) == len(df)
    for c in ("ppl", "recall", "accuracy", "byte_ratio"):
        pd.testing.assert_series_equal(merged[c].astype(float), merged[f"{c}_csv"].astype(float), check_names=False)
    assert (df.git_commit == fx.COMMIT).all()
    assert wandb_run["summary"]["report/rows"] == len(fx.POINTS)


def test_run_holds_every_figure(wandb_run):
    res = wandb_run["work"] / "results" / fx.EXP / "report"
    pngs = sorted(res.glob("*/*.png"))
    assert len(pngs) == 12 and wandb_run["summary"]["report/figures"] == 12
    for png in pngs:
        key = f"figures/{png.parent.name}/{png.stem}"
        entry = logged(wandb_run["history"], key)
        assert entry and entry["_type"] == "image-file", f"{key} not logged"
        image = (wandb_run["dir"] / "files" / entry["path"]).read_bytes()
        assert image == png.read_bytes(), f"{key}: the logged image is not the report's figure"
        pd.testing.assert_frame_equal(F.png_data(image), pd.read_csv(png.with_suffix(".csv")))
    for ev in ("perplexity", "selection", "passkey"):
        assert logged(wandb_run["history"], f"tables/frontier_{ev}")["_type"] == "table-file"
