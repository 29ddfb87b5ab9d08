"""``snakemake --report report.html`` on the fixture: the self-contained HTML holds every figure and table of the
report stage in its category, with a caption, and each figure's data (carried in the PNG) matches the table it was
drawn from, read back from the same HTML."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import report_fixture as fx
from loki import figures as F
from loki.report import CATEGORIES


class Tables(HTMLParser):
    """Every <table> of an HTML page as a list of rows (header row first)."""

    def __init__(self):
        super().__init__()
        self.tables, self.row, self.cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.row is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr":
            self.tables[-1].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_table(text: str) -> pd.DataFrame:
    p = Tables()
    p.feed(text)
    assert len(p.tables) == 1, "one table per page"
    head, *rows = p.tables[0]
    df = pd.DataFrame(rows, columns=head).replace("", np.nan)
    for c in df.columns:
        if c not in ("tag", "variant", "git_commit"):
            try:
                df[c] = pd.to_numeric(df[c])
            except (ValueError, TypeError):
                pass
    return df


def embedded(html: str, var: str):
    m = re.search(rf'<script id="{var}">\s*var {var} = (.*?);\s*</script>', html, re.S)
    assert m, f"no {var} in the report"
    return json.loads(m.group(1))


def payload(entry) -> bytes:
    head, b64 = entry["data_uri"].split(";base64,", 1)
    return base64.b64decode(b64)


@pytest.fixture(scope="module")
def report_html(snakemake_run):
    html = (snakemake_run / "report.html").read_text()
    results = embedded(html, "results")
    categories = embedded(html, "categories")
    by_name = {Path(p).name: (p, e) for p, e in results.items()}
    assert len(by_name) == len(results), "result file names are unique"
    table = html_table(payload(by_name["results.html"][1]).decode())
    return {"results": results, "categories": categories, "by_name": by_name, "table": table,
            "work": snakemake_run}


def test_every_figure_and_table_is_in_the_report(report_html):
    work, results, cats = report_html["work"], report_html["results"], report_html["categories"]
    res = work / "results" / fx.EXP
    files = sorted(p for p in (res / "report").rglob("*") if p.suffix in (".png", ".html"))
    assert len([f for f in files if f.suffix == ".png"]) == 12  # (two rank figures: calib and transfer corpus)
    where = {path: cat for cat, subs in cats.items() for paths in subs.values() for path in paths}
    seen_rank = set()
    for f in files + [res / "summary.csv"]:
        rel = str(f.relative_to(work))
        assert rel in results, f"{rel} is not in report.html"
        e = results[rel]
        assert payload(e) == f.read_bytes(), f"{rel}: the embedded file differs from the file"
        want = "Results" if f.name == "summary.csv" else CATEGORIES[f.parent.name]
        assert where[rel] == want, (rel, where[rel])
        assert e["mime_type"] == {".png": "image/png", ".html": "text/html", ".csv": "text/csv"}[f.suffix]
        caption = re.sub(r"<[^>]+>", "", e["caption"])
        assert len(caption) > 150, f"{rel}: caption too short: {caption!r}"
        if f.suffix == ".png" and f.parent.name in ("quality", "frontier", "selection", "rank"):
            assert fx.MODEL in caption, f"{rel}: the caption states the protocol (model, corpora)"
        if f.parent.name == "rank":  # each rank figure names its own calibration corpus
            calib, caption = f.stem.removeprefix(f"rank_{fx.MODEL}_"), " ".join(caption.split())
            other = ({fx.CALIB, fx.CORPUS} - {calib}).pop()
            assert f"corpus {calib} (token count" in caption and f"pca/{fx.MODEL}/{calib}/rank.csv" in caption
            assert other not in caption, (rel, caption)
            seen_rank.add(calib)
    assert seen_rank == {fx.CALIB, fx.CORPUS}
    assert set(cats) == set(CATEGORIES.values())
    status = html_table(payload(report_html["by_name"]["contents.html"][1]).decode())
    assert len(status) == 12 and (status.status == "drawn").all()


def test_results_table_in_the_report_holds_every_result(report_html):
    t = report_html["table"]
    assert len(t) == len(fx.POINTS)
    ppl = t[t["eval"] == "perplexity"]
    for r in ppl.itertuples():
        variant = "" if pd.isna(r.variant) else r.variant
        assert r.ppl == pytest.approx(fx.ppl_of(r.method, None if pd.isna(r.d) else r.d,
                                                None if pd.isna(r.k) else r.k,
                                                "pre" if variant == "rope=pre" else "post"), rel=1e-5)
    assert (t.git_commit == fx.COMMIT[:7]).all()


def lookup(table: pd.DataFrame, ev: str, tag: str, col: str) -> float:
    row = table[(table["eval"] == ev) & (table.tag == tag)]
    assert len(row) == 1, (ev, tag)
    return float(row[col].iloc[0])


def test_each_figure_shows_the_values_of_its_table(report_html):
    by, table = report_html["by_name"], report_html["table"]
    for ev, metric in (("perplexity", "ppl"), ("selection", "recall"), ("passkey", "accuracy")):
        heat = F.png_data(payload(by[f"heatmap_{ev}.png"][1]))
        assert len(heat) == int(((table["eval"] == ev) & table.k.notna()).sum())
        for r in heat.itertuples():
            assert r.value == pytest.approx(lookup(table, ev, r.tag, metric), rel=1e-5)
        front = F.png_data(payload(by[f"frontier_{ev}.png"][1]))
        front_table = html_table(payload(by[f"frontier_{ev}.html"][1]).decode())
        assert len(front) == len(front_table) == int((table["eval"] == ev).sum())
        for r in front.itertuples():
            assert r.value == pytest.approx(lookup(table, ev, r.tag, metric), rel=1e-5)
            if r.speed_source == "ideal":  # with the measured rows where the result has them
                measured = lookup(table, ev, r.tag, "byte_ratio_measured")
                want = lookup(table, ev, r.tag, "byte_ratio") if pd.isna(measured) else measured
                assert r.speedup == pytest.approx(want, rel=1e-5)
        np.testing.assert_allclose(front.speedup, front_table.speedup, rtol=1e-5)
        assert list(front.speed_source) == list(front_table.speed_source)
    sel = F.png_data(payload(by["selection_per_layer.png"][1]))
    for tag, g in sel.groupby("tag"):
        assert g.recall.mean() == pytest.approx(lookup(table, "selection", tag, "recall"), rel=1e-5)
    rank = F.png_data(payload(by["rank_smollm2-135m_lee_news.png"][1]))
    rows = pd.DataFrame(fx.rank_rows(), columns=["side", "layer", "head", "threshold", "rank", "head_dim"])
    want = rows.groupby(["side", "threshold", "layer"])["rank"].mean().rename("want").reset_index()
    got = rank.merge(want, on=["side", "threshold", "layer"])
    assert len(got) == len(rank) == len(want)
    np.testing.assert_allclose(got.rank_mean, got.want)
    tr = F.png_data(payload(by["transfer.png"][1]))
    for r in tr.itertuples():
        assert r.explained_variance == pytest.approx(fx.transfer_ev(r.fit_corpus, r.eval_corpus, r.side, r.d))


def test_snakemake_outputs_equal_the_in_process_report(report_html, built):
    """Determinism across processes and folders: the same fixture gives the same bytes."""
    def digest(res: Path) -> dict:
        return {str(p.relative_to(res)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(res.rglob("*"))
                if p.is_file() and not p.name.startswith(".") and (p.name.startswith("summary") or p.name == "heatmap.png"
                                    or p.relative_to(res).parts[0] == "report")}

    a = digest(report_html["work"] / "results" / fx.EXP)
    b = digest(built.root / built.results)
    assert a == b
