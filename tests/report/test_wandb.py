"""The report stage's offline W&B run (made by the Snakemake run of the fixture, ``WANDB_MODE=offline``), read back
from disk: the run is named and grouped for a dashboard, and holds the tidy table and every figure.

wandb 0.31 has no Python reader for ``run-<id>.wandb`` any more, so the file is read here: a 7-byte header
(``:W&B``, magic, version) then LevelDB-log framing (32 KiB blocks; records of crc32, length, type FULL / FIRST /
MIDDLE / LAST), each record a ``wandb_internal_pb2.Record`` protobuf parsed with wandb's own classes. The media the
records point to are the files under the run's ``files/``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest

import report_fixture as fx
from loki import figures as F

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer too short for a header: padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum in {path}"
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            out.append(buf + chunk)
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def nested(items) -> dict:
    """History / summary items (key or nested_key path, JSON value) as a nested dict."""
    out = {}
    for it in items:
        keys = [it.key] if it.key else list(it.nested_key)
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = json.loads(it.value_json)
    return out


@pytest.fixture(scope="module")
def wandb_run(snakemake_run):
    runs = sorted((snakemake_run / "results" / fx.EXP / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"one offline run of the report stage expected, found {runs}"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    records = wandb_records(logs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history, summary = {}, {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.update(nested(r.history.item))
        elif kind == "summary":
            summary.update(nested(r.summary.update))
    return {"dir": runs[0], "run": run, "history": history, "summary": summary, "work": snakemake_run}


def test_run_is_named_and_grouped_for_a_dashboard(wandb_run):
    run = wandb_run["run"]
    assert (run.run_group, run.job_type, run.display_name, run.project) == (fx.EXP, "report", "report", "loki")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["stage"] == "report" and config["experiment_name"] == fx.EXP
    assert config["model.name"] == fx.MODEL, "flat config keys, the same as the other stages"


def test_run_holds_the_tidy_table(wandb_run):
    entry = wandb_run["history"]["results"]
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
    assert len(pngs) == 11 and wandb_run["summary"]["report/figures"] == 11
    for png in pngs:
        key = f"figures/{png.parent.name}/{png.stem}"
        entry = wandb_run["history"].get(key)
        assert entry and entry["_type"] == "image-file", f"{key} not logged"
        logged = (wandb_run["dir"] / "files" / entry["path"]).read_bytes()
        assert logged == png.read_bytes(), f"{key}: the logged image is not the report's figure"
        pd.testing.assert_frame_equal(F.png_data(logged), pd.read_csv(png.with_suffix(".csv")))
    for ev in ("perplexity", "selection", "passkey"):
        assert wandb_run["history"][f"tables/frontier_{ev}"]["_type"] == "table-file"
