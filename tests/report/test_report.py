"""The report stage on the synthetic fixture: the tidy table, every figure's data against the table it was drawn
from (and against the fixture's closed formulas), missing and malformed inputs, determinism."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import report_fixture as fx
from loki import figures as F
from loki.common import LokiError
from loki.report import collect, make_report

KERNELS = Path("kernels/measured")


def expected_ppl(method, d, k, variant):
    return fx.ppl_of(method, None if pd.isna(d) else d, None if pd.isna(k) else k,
                     "pre" if variant == "rope=pre" else "post")


def hashes(res: Path) -> dict:
    return {str(p.relative_to(res)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(res.rglob("*")) if p.is_file() and (p.name.startswith("summary") or p.name == "heatmap.png"
                                                                 or p.relative_to(res).parts[0] == "report")}


# ----------------------------------------------------------------------------------------------------------
# tidy table

def test_tidy_table_one_row_per_result_with_provenance(results):
    t = collect(results)
    assert len(t) == len(fx.POINTS)
    assert not t.duplicated(["model", "corpus", "eval", "method", "options"]).any()
    assert list(t.columns[:11]) == ["experiment", "model", "calib", "corpus", "eval", "method", "variant", "d", "k",
                                    "k_mode", "tag"]
    keys = list(zip(t["eval"], t.method, t.variant, t.d.fillna(-1), t.k.fillna(-1), t.tag))
    assert keys == sorted(keys), "rows are sorted by eval, method, variant, d, k"
    for ev, tag, method, opts in fx.POINTS:
        row = t[(t["eval"] == ev) & (t.tag == tag)]
        assert len(row) == 1, (ev, tag)
        r = row.iloc[0]
        m = fx.metrics_for(ev, method, opts)
        assert r.git_commit == fx.COMMIT and r.calib == fx.CALIB and r.corpus == fx.CORPUS
        assert json.loads(r.config) == m["config"], "the resolved config of each row"
        assert json.loads(r.options) == m["options"]
        assert r.result == f"evaluate/{ev}/{tag}/metrics.json"
        assert r.variant == ",".join(f"{o}={opts[o]}" for o in ("rope", "selection") if o in opts)
        if ev == "perplexity":
            assert r.ppl == pytest.approx(expected_ppl(method, r.d, r.k, r.variant), rel=1e-12)
            assert r.nll == pytest.approx(math.log(r.ppl)) and r.tokens == 254
            assert np.isnan(r.recall) and np.isnan(r.accuracy)
        elif ev == "selection":
            assert r.recall == pytest.approx(np.mean([fx.recall_of(method, r.d, r.k, i) for i in range(fx.LAYERS)]))
            assert [e["layer"] for e in json.loads(r.per_layer)] == list(range(fx.LAYERS))
        else:
            assert r.accuracy == fx.accuracy_of(method, r.d, r.k) and np.isnan(r.ppl)
        assert r.head_dim == fx.HEAD_DIM


def test_decode_only_evals_forced_dense_prefill_is_no_variant(results):
    """A decode_only eval prefills densely whatever the method's sparse_prefill, and its metrics record
    sparse_prefill=false (loki.evaluate.apply_decode_only): that is the eval's protocol, not a variant of the method,
    so those rows keep variant '' (and land in the plain method's figures)."""
    f = results / "evaluate" / "passkey" / "loki-d16-k0.25" / "metrics.json"
    m = json.loads(f.read_text())
    m["options"]["sparse_prefill"] = m["config"]["method"]["sparse_prefill"] = False
    m["config"]["eval"]["decode_only"] = True
    f.write_text(json.dumps(m))
    t = collect(results)
    assert t[(t["eval"] == "passkey") & (t.method == "loki")].variant.tolist() == [""]
    m["config"]["eval"]["decode_only"] = False  # the same options in an eval that honours them: a variant
    f.write_text(json.dumps(m))
    t = collect(results)
    assert t[(t["eval"] == "passkey") & (t.method == "loki")].variant.tolist() == ["sparse_prefill=false"]


def test_load_tidy_reads_the_reports_table_else_every_result(results):
    """Notebooks read summary.parquet (exactly the DAG's results) where the report wrote it, else every metrics.json;
    both give the same table. Results written after the parquet are listed, not mixed in; a job in flight does not
    break the parquet path."""
    import os

    from loki.report import load_tidy

    fresh = load_tidy(results)
    assert "no summary.parquet" in fresh.attrs["source"] and fresh.attrs["stale"] == []
    make_report(results, kernels_dir=KERNELS)
    t = load_tidy(results)
    assert t.attrs["source"].endswith("summary.parquet") and t.attrs["stale"] == []
    same = lambda df: df.reset_index(drop=True).astype(object).where(df.reset_index(drop=True).notna(), None)
    pd.testing.assert_frame_equal(same(t), same(fresh))  # (a missing value: None or NaN, as the dtype has it)
    new = results / "evaluate/perplexity/loki-d32-k0.25/metrics.json"  # a later job, and one in flight
    new.parent.mkdir()
    new.write_text((results / "evaluate/perplexity/loki-d8-k0.25/metrics.json").read_text())
    later = (results / "summary.parquet").stat().st_mtime + 5
    os.utime(new, (later, later))
    (results / "evaluate/perplexity/loki-d64-k0.25").mkdir()
    t = load_tidy(results)
    assert len(t) == len(fresh) and t.attrs["stale"] == ["evaluate/perplexity/loki-d32-k0.25/metrics.json"]
    (results / "summary.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(LokiError, match="summary.parquet is malformed"):
        load_tidy(results)


def test_heatmap_keeps_tokens_k_apart_and_shows_both_results_of_one_cell(results):
    """A k_mode=tokens variant gets its own panel with its own k columns (tokens, not fractions, on its axis); two
    results that land in one cell (d=0.25 and d=16 of a 64-dim head both score 16 dims) are both shown and named."""
    src = json.loads((results / "evaluate/perplexity/loki-d16-k0.25/metrics.json").read_text())

    def add(tag, ppl, **opts):
        m = json.loads(json.dumps(src))
        m["options"].update(opts)
        m["config"]["method"].update(opts)
        m["ppl"], m["k"] = ppl, opts.get("k", m["k"])
        p = results / "evaluate/perplexity" / tag / "metrics.json"
        p.parent.mkdir()
        p.write_text(json.dumps(m))

    add("loki-d0.25-k0.25", 31.0, d=0.25)  # metrics.json d: the 16 dims it scored
    add("loki-d16-k64-tokens", 33.0, k=64, k_mode="tokens")
    tidy = collect(results)
    fig, data = F.draw_heatmaps(tidy, "perplexity", "ppl", "lower", "perplexity", "t")
    cell = data[(data.method == "loki") & (data.variant == "") & (data.d == 16) & (data.k == 0.25)]
    assert sorted(cell.tag) == ["loki-d0.25-k0.25", "loki-d16-k0.25"]
    tok = data[data.variant == "k_mode=tokens"]
    assert list(tok.k) == [64] and set(tok.k_mode) == {"tokens"}
    axes = {a.get_title(): a for a in fig.axes if a.get_title()}
    assert axes["loki\n[k_mode=tokens]"].get_xlabel() == "k (kept tokens)"
    assert [t.get_text() for t in axes["loki\n[k_mode=tokens]"].get_xticklabels()] == ["64"], "its own k columns"
    assert axes["loki"].get_xlabel() == "k (kept fraction of each query's prefix)"
    assert "64" not in [t.get_text() for t in axes["loki"].get_xticklabels()]
    texts = [t.get_text() for a in fig.axes for t in a.texts]
    want = f"31\n{fx.ppl_of('loki', 16, 0.25):.4g}"  # (in tag order)
    assert want in texts, "both values in the shared cell"
    assert any("more than one result" in t and "loki-d0.25-k0.25, loki-d16-k0.25" in t for t in texts)


def test_a_folder_without_results_names_both_layouts(tmp_path):
    (tmp_path / "0").mkdir()  # neither evaluate/<eval>/<tag>/ nor a Hydra job folder (.hydra/)
    with pytest.raises(LokiError, match=r"(?s)no evaluation results under .*evaluate/<eval>/<tag>/metrics.json.*"
                                        r"Hydra multirun.*results_dir=multirun/<exp>/<time>"):
        collect(tmp_path)


def test_a_missing_results_folder_is_one_clear_error(tmp_path):
    """A mistyped results_dir (multirun/default/typo): one message, and nothing created there."""
    from loki.report import make_report

    with pytest.raises(LokiError, match=r"(?s)results_dir=.*typo is not a folder.*point results_dir at"):
        make_report(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_protocol_line_says_what_each_eval_ran(built):
    """The figures' protocol line takes windows / cases from metrics.json, per eval (not from the config: the
    selection eval ran 1 window where the config says 2, and a retrieval eval has no windows)."""
    from loki.report import protocol

    t = built.tidy
    ppl, sel, pk = protocol(t, "perplexity"), protocol(t, "selection"), protocol(t, "passkey")
    assert "window 128 x 2" in ppl and "254 tokens" in ppl
    assert "window 128 x 1" in sel and "x 2" not in sel
    assert "window" not in pk and "1 cases up to 512 tokens" in pk and "sparse prefill" in pk
    assert f"PCA on {fx.CALIB}" in ppl and "git 0123456" in ppl


def test_byte_ratio_is_2D_over_d_plus_2kD():
    D = 128
    # by hand: dense reads 2D per cached token; Loki d + 2kD
    assert F.byte_ratio("loki", 32, 0.25, D) == pytest.approx(256 / (32 + 64))
    assert F.byte_ratio("loki", 0.25, 0.25, D) == pytest.approx(256 / (32 + 64)), "d as a fraction of D"
    assert F.byte_ratio("exact_topk", None, 0.25, D) == pytest.approx(2 / 1.5)
    assert F.byte_ratio("dense", None, None, D) == 1.0
    assert F.byte_ratio("sparq", None, 0.25, D, {"r": 32}) == pytest.approx(256 / 96)
    assert F.byte_ratio("quest", None, 0.25, D, {"page_size": 16}) == pytest.approx(256 / (16 + 64))
    assert math.isnan(F.byte_ratio("loki", 32, 0.25, float("nan")))
    assert math.isnan(F.byte_ratio("some_new_method", 32, 0.25, D))
    # the same number as kernels/bench.py's ideal_ratio = dense_bytes / loki_bytes at any batch and context
    for B, S, d, kfrac in ((16, 16384, 32, 4), (1, 4096, 16, 16)):
        KVH, k_tokens = 8, S // kfrac
        dense_bytes = B * KVH * S * 2 * D * 2
        loki_bytes = B * KVH * (S * d + k_tokens * 2 * D) * 2
        assert F.byte_ratio("loki", d, k_tokens / S, D, {"selection": "group"}, 4) == \
            pytest.approx(dense_bytes / loki_bytes), "the kernels' group selection"


def test_byte_ratio_counts_per_query_head_selection_under_gqa():
    """G query heads per KV head: a per-head top-k reads each head's k rows (G*k per KV head); group selection k."""
    D, G = 128, 4
    assert F.byte_ratio("loki", 32, 0.25, D, {"selection": "head"}, G) == pytest.approx(256 / (32 + 2 * G * 0.25 * D))
    assert F.byte_ratio("loki", 32, 0.25, D, {}, G) == F.byte_ratio("loki", 32, 0.25, D, {"selection": "head"}, G), \
        "loki's default selection is head"
    assert F.byte_ratio("loki", 32, 0.25, D, {"selection": "group"}, G) == pytest.approx(256 / (32 + 64))
    assert F.byte_ratio("exact_topk", None, 0.25, D, {}, G) == pytest.approx(256 / (D + 2 * G * 0.25 * D))
    assert F.byte_ratio("sparq", None, 0.125, D, {"r": 16}, G) == pytest.approx(256 / (G * 16 + 2 * G * 0.125 * D))
    assert F.byte_ratio("sparq", None, 0.125, D, {"r": 64}, G) == pytest.approx(256 / (D + 2 * G * 0.125 * D)), \
        "the heads' components cover at most the whole key"
    assert F.byte_ratio("h2o", None, 0.25, D, {"selection": "group"}, G) == pytest.approx(256 / 64)
    assert F.byte_ratio("h2o", None, 0.25, D, {"selection": "head"}, G) == pytest.approx(256 / (G * 64))
    assert F.byte_ratio("loki_h2o", 32, 0.25, D, {"selection": "group", "cache": 0.5}, G) == pytest.approx(256 / 80)
    assert F.byte_ratio("pca_attn", 32, None, D, {}, G) == pytest.approx(256 / 160), "no selection"
    for method, opts in (("loki", {"selection": "head"}), ("exact_topk", {}), ("quest", {"page_size": 16})):
        assert F.byte_ratio(method, 32, 0.25, D, opts, 1) == F.byte_ratio(method, 32, 0.25, D, opts), "MHA: G = 1"
        assert F.byte_ratio(method, 32, 0.25, D, opts, float("nan")) == F.byte_ratio(method, 32, 0.25, D, opts)
    # measured rows (a group's union) in place of k or G*k; the scoring read unchanged
    assert F.byte_ratio("loki", 32, 0.25, D, {"selection": "head"}, G, rows=0.4) == pytest.approx(256 / (32 + 0.8 * D))
    assert F.byte_ratio("exact_topk", None, 0.25, D, {}, G, rows=0.5) == pytest.approx(256 / (D + D))
    assert F.byte_ratio("loki", 32, 0.25, D, {"selection": "head"}, G, rows=float("nan")) == \
        F.byte_ratio("loki", 32, 0.25, D, {"selection": "head"}, G)
    assert F.byte_formula("loki", {"selection": "head"}, 3) == "2D/(d+2*3*kD)"
    assert F.byte_formula("loki", {"selection": "group"}, 3) == "2D/(d+2kD)"
    assert F.byte_formula("loki", {}, 1) == "2D/(d+2kD)"


def test_tidy_table_files_csv_and_parquet_agree(built):
    report, results = built, built.root / built.results
    csv = pd.read_csv(results / "summary.csv", keep_default_na=True)
    pq = pd.read_parquet(results / "summary.parquet")
    assert list(csv.columns) == list(pq.columns) == list(report.tidy.columns)
    for c in ("ppl", "recall", "accuracy", "byte_ratio", "d", "k"):
        np.testing.assert_allclose(csv[c].to_numpy(float), report.tidy[c].to_numpy(float), equal_nan=True)
        np.testing.assert_allclose(pq[c].to_numpy(float), report.tidy[c].to_numpy(float), equal_nan=True)
    assert (pq.config == report.tidy.config).all() and (csv.git_commit == fx.COMMIT).all()


# ----------------------------------------------------------------------------------------------------------
# figures against their tables

def test_every_figure_drawn_and_listed(built):
    report, results = built, built.root / built.results
    names = {f"{f.category}/{f.name}" for f in report.figures}
    assert names == {"rank/rank_smollm2-135m_lee_news", "rank/rank_smollm2-135m_enwiki_sample", "quality/heatmap_perplexity", "quality/heatmap_selection",
                     "quality/heatmap_passkey", "frontier/frontier_perplexity", "frontier/frontier_selection",
                     "frontier/frontier_passkey", "selection/selection_per_layer", "transfer/transfer",
                     "speed/kernel_speedup", "speed/decode_speedup"}
    assert (report.contents.status == "drawn").all()
    assert any("smoke.json" in n and "not used" in n for n in report.notes), "the CPU smoke benchmark is skipped"
    for f in report.figures:
        png = results / "report" / f.category / f"{f.name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        embedded = F.png_data(png)  # the data carried in the PNG is the frame the plot function returned
        pd.testing.assert_frame_equal(embedded, pd.read_csv(png.with_suffix(".csv")))
        assert len(embedded) == len(f.data) and list(embedded.columns) == list(f.data.columns)
    assert (results / "heatmap.png").read_bytes() == (results / "report/quality/heatmap_perplexity.png").read_bytes()


def fig(report, name):
    return next(f for f in report.figures if f.name == name).data


def test_heatmap_cells_are_the_table_values(built):
    report = built
    tidy = report.tidy
    for ev, metric in (("perplexity", "ppl"), ("selection", "recall"), ("passkey", "accuracy")):
        data = fig(report, f"heatmap_{ev}")
        sparse = tidy[(tidy["eval"] == ev) & tidy.k.notna()]
        assert len(data) == len(sparse) and set(data.tag) == set(sparse.tag)
        merged = data.merge(sparse, on=["method", "variant", "tag"], suffixes=("", "_t"))
        assert len(merged) == len(data) > 0, "every heatmap cell matched to its table row"
        np.testing.assert_allclose(merged.value, merged[metric])
        np.testing.assert_allclose(merged.d, merged.d_t, equal_nan=True)
    ppl = fig(report, "heatmap_perplexity")
    for r in ppl.itertuples():
        assert r.value == pytest.approx(expected_ppl(r.method, r.d, r.k, r.variant))


def test_frontier_speed_sources_and_pareto(built):
    report = built
    data = fig(report, "frontier_perplexity")
    by = {(r.method, r.variant, None if pd.isna(r.d) else r.d, None if pd.isna(r.k) else r.k): r
          for r in data.itertuples()}
    assert by[("dense", "", None, None)].speed_source == "decode" and by[("dense", "", None, None)].speedup == 1.0
    r = by[("loki", "", 8, 0.5)]  # decode benchmark: the largest context (4096), then the largest batch (4)
    assert (r.speed_source, r.speedup) == ("decode", fx.decode_speedup(4, 4096))
    # kernel benchmark (group selection, as kernels/ runs it), matched by d/D = 16/64 = 32/128 and k = 1/4; the
    # largest batch (16) wins over batch 1's larger context
    r = by[("loki", "selection=group", 16, 0.25)]
    assert (r.speed_source, r.speedup) == ("kernel", fx.kernel_speedup(16384, 4, 4))
    assert "group selection" in r.speed_detail
    G, D = fx.HEADS / fx.KV_HEADS, 64.0
    for key in (("loki", "", 16, 0.25), ("loki", "rope=pre", 16, 0.25), ("loki", "", 8, 0.25), ("loki", "", 16, 0.5),
                ("exact_topk", "", None, 0.25)):
        # per-query-head selection: no GPU figure of that mode (the kernel's is group), so the ideal byte ratio with
        # the rows the method measured (the fixture's union of the group's sets: 1.8 k), not the counted G*k rows
        r = by[key]
        d = key[2] if key[2] is not None else D
        assert r.speed_source == "ideal" and r.speedup == pytest.approx(2 * D / (d + 2 * 1.8 * key[3] * D))
        assert r.speedup == pytest.approx(r.byte_ratio_measured) and r.speedup > r.byte_ratio
        assert r.byte_ratio == pytest.approx(2 * D / (d + 2 * G * key[3] * D))
        assert r.speed_detail == ("2D/(D+2*rows*D) (measured rows; counted: 2D/(D+2*3*kD))" if key[0] == "exact_topk"
                                  else "2D/(d+2*rows*D) (measured rows; counted: 2D/(d+2*3*kD))")
    for r in data.itertuples():
        assert r.value == pytest.approx(expected_ppl(r.method, r.d, r.k, r.variant))
    x, y = data.speedup.to_numpy(), data.value.to_numpy()
    for i in range(len(data)):  # Pareto: not dominated by a faster-and-better point
        dominated = any(x[j] >= x[i] and y[j] <= y[i] and (x[j] > x[i] or y[j] < y[i]) for j in range(len(data)))
        assert data.pareto.iloc[i] == (not dominated)
    note = report.contents.set_index("figure").loc["frontier_perplexity.png", "note"]
    assert note.startswith(f"{(data.speed_source == 'ideal').sum()} of {len(data)} points use the ideal byte ratio")


def test_rank_selection_transfer_speed_data(built):
    report = built
    rank = fig(report, "rank_smollm2-135m_lee_news")
    rows = pd.DataFrame(fx.rank_rows(), columns=["side", "layer", "head", "threshold", "rank", "head_dim"])
    want = rows.groupby(["side", "threshold", "layer"])["rank"].agg(["mean", "min", "max"]).reset_index()
    got = rank.merge(want, on=["side", "threshold", "layer"])
    assert len(got) == len(want) == 2 * 3 * fx.LAYERS
    np.testing.assert_allclose(got.rank_mean, got["mean"])
    np.testing.assert_allclose(got.rank_min, got["min"])
    np.testing.assert_allclose(got.rank_max, got["max"])

    sel = fig(report, "selection_per_layer")
    assert len(sel) == 5 * fx.LAYERS
    for r in sel.itertuples():
        assert r.recall == pytest.approx(fx.recall_of(r.method, r.d, r.k, r.layer))
        assert r.attention_mass == pytest.approx(0.9 - 0.01 * r.layer)

    tr = fig(report, "transfer")
    assert len(tr) == 2 * 2 * 2 * 2
    for r in tr.itertuples():
        assert r.explained_variance == pytest.approx(fx.transfer_ev(r.fit_corpus, r.eval_corpus, r.side, r.d))

    kern = fig(report, "kernel_speedup")
    assert set(kern.source) == {"h200.json"} and len(kern) == 9 and set(kern.batch) == {1, 16}
    dec = fig(report, "decode_speedup")
    assert len(dec) == 9 and set(dec.method) == {"dense", "dense_flash", "loki"} and dec.speedup.notna().all()
    assert set(dec[dec.method == "loki"].variant) == {"head selection", "group selection"}, "one line per selection"
    note = report.contents.set_index("figure").loc["decode_speedup.png", "note"]
    assert note == "1 rows without a dense reference (speedup null) not shown"


# ----------------------------------------------------------------------------------------------------------
# missing and malformed inputs

def test_missing_optional_data_is_reported_not_drawn(built, tmp_path, monkeypatch):
    shutil.copytree(built.root, tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    res = built.results
    for p in ("transfer/transfer.csv", "bench/decode.json", "../../kernels/measured/h200.json"):
        (res / p).unlink()
    shutil.rmtree(res / "evaluate" / "selection")
    rep = make_report(res, kernels_dir=KERNELS)
    status = rep.contents.set_index("figure").status
    for missing in ("selection_per_layer.png", "transfer.png", "kernel_speedup.png", "decode_speedup.png"):
        assert status[missing] == "missing"
    # the figures of the earlier report whose data went away are removed, not left stale
    for gone in ("transfer/transfer.png", "speed/kernel_speedup.png", "speed/decode_speedup.png",
                 "selection/selection_per_layer.png", "quality/heatmap_selection.png"):
        assert f"-report/{gone}" in rep.changed and not (res / "report" / gone).exists()
    front = fig(rep, "frontier_perplexity")
    assert (front[front.method != "dense"].speed_source == "ideal").all()
    html = (res / "report" / "tables" / "contents.html").read_text()
    assert "no transfer/transfer.csv" in html and "smoke.json: CPU-interpreter smoke run" in html


def test_missing_result_file_is_named(results):
    job = results / "evaluate" / "perplexity" / "loki-d32-k0.25"
    job.mkdir()
    with pytest.raises(LokiError, match=r"loki-d32-k0\.25/metrics\.json is missing"):
        collect(results)
    expect = [results / "evaluate/perplexity/dense/metrics.json", job / "metrics.json"]
    with pytest.raises(LokiError, match=r"expected result file\(s\) missing: .*loki-d32-k0\.25/metrics\.json"):
        collect(results, expect=expect)
    t = collect(results, expect=expect[:1])  # with an expectation: exactly those, the rest listed as ignored
    assert len(t) == 1 and "evaluate/perplexity/loki-d32-k0.25" in t.attrs["ignored"]


BAD = {
    "invalid JSON": ("evaluate/perplexity/dense/metrics.json", lambda s: s[:-20], "not readable JSON"),
    "no ppl": ("evaluate/perplexity/dense/metrics.json",
               lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "ppl"}), "has no 'ppl'"),
    "ppl not a number": ("evaluate/perplexity/dense/metrics.json",
                         lambda s: json.dumps({**json.loads(s), "ppl": "high"}), "'ppl' = 'high' is not a number"),
    "no config": ("evaluate/passkey/dense/metrics.json",
                  lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "config"}), "'config' is missing"),
    "bad per_layer": ("evaluate/selection/loki-d8-k0.25/metrics.json",
                      lambda s: json.dumps({**json.loads(s), "per_layer": [{"layer": 0}]}), "'per_layer' must be"),
    "rank.csv column": ("pca/smollm2-135m/lee_news/rank.csv", lambda s: s.replace("threshold", "thr"), "columns ['threshold']"),
    "transfer.csv column": ("transfer/transfer.csv", lambda s: s.replace("explained_variance", "ev"),
                            "columns ['explained_variance']"),
    "decode.json": ("bench/decode.json", lambda s: json.dumps({"rows": []}), "expected a non-empty list"),
    "kernel json": ("../../kernels/measured/h200.json", lambda s: json.dumps({"loki": []}), "expected an object with 'info'"),
}


def test_every_eval_has_a_required_metric_and_a_headline():
    """A new eval must say what its metrics.json holds (else a corrupt value silently reads as NaN) and which metric
    the frontier plots."""
    from loki.evals import EVALS
    from loki.report import EVAL_REQUIRED

    assert set(EVALS) <= set(EVAL_REQUIRED) and set(EVALS) <= set(F.MAIN_METRIC)


@pytest.mark.parametrize("ev", ["passkey_decode", "needle_decode"])
def test_corrupt_decode_only_accuracy_is_named(results, ev):
    src = results / "evaluate/passkey/dense/metrics.json"
    dst = results / "evaluate" / ev / "dense" / "metrics.json"
    dst.parent.mkdir(parents=True)
    dst.write_text(json.dumps({**json.loads(src.read_text()), "eval": ev, "accuracy": "n/a"}))
    with pytest.raises(LokiError, match=r"(?s)metrics.json is malformed.*'accuracy' = 'n/a' is not a number"):
        collect(results)


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_file_is_named(results, case):
    rel, change, problem = BAD[case]
    p = (results / rel).resolve()
    p.write_text(change(p.read_text()))
    with pytest.raises(LokiError) as e:
        make_report(results, kernels_dir=KERNELS)
    msg = str(e.value)
    assert p.name in msg and "is malformed" in msg and problem in msg and "How to fix" in msg
    assert not (results / "summary.csv").exists(), "nothing is written when an input is bad"


def test_duplicate_point_is_an_error(results):
    src = results / "evaluate/perplexity/loki-d8-k0.25"
    dst = results / "evaluate/perplexity/loki-d8-k0.25-again"
    dst.mkdir()
    (dst / "metrics.json").write_text((src / "metrics.json").read_text())
    with pytest.raises(LokiError, match="two result files for the same point"):
        collect(results)


@pytest.mark.parametrize("change", ["calib", "window", "seed"])
def test_points_of_another_calibration_eval_setting_or_seed_are_distinct(results, change):
    """A Hydra sweep over corpus@calib, eval.window or seed: the same method and options, yet distinct points (they
    were refused as duplicates), each row with its own tag and its own calib / config."""
    src = results / "evaluate/perplexity/loki-d8-k0.25"
    dst = results / f"evaluate/perplexity/loki-d8-k0.25-{change}"
    dst.mkdir()
    m = json.loads((src / "metrics.json").read_text())
    cfg = m["config"]
    if change == "calib":
        cfg["calib"] = {**cfg.get("calib", {}), "name": "enwiki_sample"}
    elif change == "window":
        cfg["eval"] = {**cfg["eval"], "window": int(cfg["eval"].get("window") or 64) * 2}
    else:
        cfg["seed"] = int(cfg.get("seed") or 0) + 1
    (dst / "metrics.json").write_text(json.dumps(m))
    df = collect(results)
    rows = df[(df.method == "loki") & (df.d == 8) & (df.k == 0.25) & (df["eval"] == "perplexity")]
    assert sorted(rows.tag) == ["loki-d8-k0.25", f"loki-d8-k0.25-{change}"]
    if change == "calib":
        assert sorted(rows.calib) == sorted([json.loads(rows.config.iloc[0])["calib"]["name"], "enwiki_sample"])


def test_stage_exits_with_one_clear_message(results, tmp_path):
    p = results / "evaluate/perplexity/dense/metrics.json"
    p.write_text("{")
    r = subprocess.run([sys.executable, "-m", "loki.report", "experiment=smoke", f"results_dir={results}",
                        "wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'hydra'}"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"result file {p} is malformed" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------
# determinism

def test_rerun_changes_nothing(built):
    res = built.root / built.results
    first = hashes(res)
    assert len(first) > 25 and built.changed
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(built.root)
        again = make_report(built.results, kernels_dir=KERNELS)
    assert again.changed == [] and hashes(res) == first
    # the Snakemake run of the same fixture in another folder gives the same bytes: test_snakemake_report.py


def test_frontier_ideal_speed_falls_back_to_the_counted_rows():
    """A result written before the rows were counted (no byte_ratio_measured) keeps the counted ratio 2D/(d+2GkD) on
    the frontier; one with them gets 2D/(d+2*rows*D); a measured speed wins over both."""
    D, G = 64.0, 3
    tidy = pd.DataFrame([
        {"eval": "perplexity", "method": "dense", "variant": "", "d": np.nan, "k": np.nan, "tag": "dense", "ppl": 10.0,
         "kv_groups": G, "options": "{}", "byte_ratio": 1.0, "byte_ratio_measured": 1.0},
        {"eval": "perplexity", "method": "loki", "variant": "", "d": 16, "k": 0.25, "tag": "old", "ppl": 11.0,
         "kv_groups": G, "options": "{}", "byte_ratio": F.byte_ratio("loki", 16, 0.25, D, {}, G),
         "byte_ratio_measured": np.nan},
        {"eval": "perplexity", "method": "loki", "variant": "", "d": 8, "k": 0.25, "tag": "new", "ppl": 12.0,
         "kv_groups": G, "options": "{}", "byte_ratio": F.byte_ratio("loki", 8, 0.25, D, {}, G),
         "byte_ratio_measured": F.byte_ratio("loki", 8, 0.25, D, {}, G, rows=0.4)},
        {"eval": "perplexity", "method": "pca_attn", "variant": "", "d": 16, "k": np.nan, "tag": "pca", "ppl": 13.0,
         "kv_groups": G, "options": "{}", "byte_ratio": F.byte_ratio("pca_attn", 16, None, D),
         "byte_ratio_measured": F.byte_ratio("pca_attn", 16, None, D, rows=1.0)},
    ])
    data = F.frontier_data(tidy, pd.DataFrame(), "perplexity", "ppl", "lower").set_index("tag")
    assert data.loc["old", "speedup"] == pytest.approx(2 * D / (16 + 2 * G * 0.25 * D))
    assert data.loc["old", "speed_detail"] == "2D/(d+2*3*kD)"
    assert data.loc["new", "speedup"] == pytest.approx(2 * D / (8 + 2 * 0.4 * D))
    assert data.loc["new", "speed_detail"] == "2D/(d+2*rows*D) (measured rows; counted: 2D/(d+2*3*kD))"
    # PCA-Attn reads every value row whatever it measured: one formula, no "measured rows"
    assert (data.loc["pca", "speedup"], data.loc["pca", "speed_detail"]) == (pytest.approx(2 * D / (16 + D)), "2D/(d+D)")
    assert (data.loc["dense", "speed_source"], data.loc["dense", "speedup"]) == ("reference", 1.0)
    speed = pd.DataFrame([{"method": "loki", "d": 8, "k": 0.25, "selection": "head", "speedup": 1.5,
                           "speed_source": "decode", "speed_detail": "decode"}])
    data = F.frontier_data(tidy, speed, "perplexity", "ppl", "lower").set_index("tag")
    assert (data.loc["new", "speed_source"], data.loc["new", "speedup"]) == ("decode", 1.5)


def test_measured_speed_only_for_the_options_it_ran():
    """A GPU figure of plain Loki is not the speed of a point with dense layers, forced tokens, an online basis...
    (figures.speed_key): such a point keeps its ideal byte ratio; a decode row that records the same options
    matches it."""
    from loki.report import speed_table

    D, G = 64.0, 3
    plain = {"d": 16, "k": 0.25, "selection": "group", "dense_layers": 0, "sink_tokens": 0, "basis": "offline"}
    rows = [("plain", plain), ("dense4", {**plain, "dense_layers": 4}), ("sink4", {**plain, "sink_tokens": 4}),
            ("online", {**plain, "basis": "online"})]
    tidy = pd.DataFrame([{"eval": "perplexity", "method": "loki", "variant": "", "d": 16, "k": 0.25, "tag": tag,
                          "ppl": 11.0 + i, "head_dim": D, "kv_groups": G, "options": json.dumps(o),
                          "byte_ratio": F.byte_ratio("loki", 16, 0.25, D, o, G), "byte_ratio_measured": np.nan}
                         for i, (tag, o) in enumerate(rows)])
    assert [F.speed_key(o) for _, o in rows] == ["", "dense_layers=4", "sink_tokens=4", "basis=online"]
    kernels = pd.DataFrame([{"source": "h200.json", "device": "H200", "head_dim": 128.0, "batch": 16, "context": 16384,
                             "d_rel": 0.25, "k_rel": 0.25, "speedup": 1.9}])
    decode = pd.DataFrame([{"method": "loki", "d": 16.0, "k": 0.25, "selection": "group", "speed_key": "sink_tokens=4",
                            "speedup": 1.3, "batch": 1, "context": 4096, "head_dim": D}])
    speed = speed_table(tidy, decode, kernels)
    data = F.frontier_data(tidy, speed, "perplexity", "ppl", "lower").set_index("tag")
    assert (data.loc["plain", "speed_source"], data.loc["plain", "speedup"]) == ("kernel", 1.9)
    assert (data.loc["sink4", "speed_source"], data.loc["sink4", "speedup"]) == ("decode", 1.3)
    for tag in ("dense4", "online"):
        assert data.loc[tag, "speed_source"] == "ideal", tag
        assert data.loc[tag, "speedup"] == pytest.approx(2 * D / (16 + 2 * 0.25 * D))


def test_byte_ratio_measured_uses_the_rows_each_kv_head_read(built):
    """byte_ratio_measured: the byte ratio with the measured K/V rows per KV head (kv_rows_fraction) in place of k or
    G*k; NaN where the result holds no count (here: the selection eval), 1 for dense."""
    t = built.tidy
    assert "kv_rows_fraction" in t.columns and "byte_ratio_measured" in t.columns
    ppl = t[t["eval"] == "perplexity"]
    assert len(ppl) >= 4 and ppl.kv_rows_fraction.notna().all()
    for _, r in ppl.iterrows():
        want = F.byte_ratio(r.method, r.d, r.k, r.head_dim, json.loads(r.options), r.kv_groups, rows=r.kv_rows_fraction)
        assert r.byte_ratio_measured == pytest.approx(want), r.tag
    dense = ppl[ppl.method == "dense"]
    assert (dense.byte_ratio_measured == 1.0).all()
    head = ppl[(ppl.method == "loki") & ~ppl.options.str.contains('"selection": "group"')]
    # the fixture's union (1.8 k) is below G*k = 3k: a group-aware gather reads less than the G*k bound
    assert (head.byte_ratio_measured > head.byte_ratio).all()
    assert t[t["eval"] == "selection"].byte_ratio_measured.isna().all()
