"""The selection eval: per-layer recall / attention mass / output error measured inside the attention calls."""

from __future__ import annotations

import json

import pytest

from eval_helpers import run

WIN = ["eval=selection", "eval.window=48", "eval.num_windows=2", "eval.max_windows=2"]


def test_exact_topk_has_perfect_recall_and_its_own_mass(tiny_model_dir, text_file):
    m = run(tiny_model_dir, text_file, WIN + ["method=exact_topk", "method.k=0.25"])
    json.dumps(m)  # JSON-serialisable
    assert m["recall"] == 1.0
    assert [r["layer"] for r in m["per_layer"]] == [0, 1]
    for r in m["per_layer"]:
        assert set(r) >= {"layer", "recall", "attention_mass", "output_rel_error"}
        assert r["calls"] == 2  # two windows
        assert 0.25 < r["attention_mass"] < 1.0
        assert r["output_rel_error"] > 0.01  # flat random-model attention: a top-k output differs a lot
        assert r["kept_fraction"] == pytest.approx(m["kept_fraction"])
    assert m["attention_mass"] == pytest.approx(sum(r["attention_mass"] for r in m["per_layer"]) / 2)


def test_dense_and_full_budget_are_exact(tiny_model_dir, text_file):
    for method in (["method=dense"], ["method=loki", "method.k=1.0", "method.basis=online", "method.d=2"]):
        m = run(tiny_model_dir, text_file, WIN[:-1] + method)  # max_windows=1 (the default) caps num_windows=2
        assert m["num_windows"] == 1 and all(r["calls"] == 1 for r in m["per_layer"])
        assert m["recall"] == 1.0 and m["attention_mass"] == pytest.approx(1.0)
        assert m["output_rel_error"] < 1e-6


def test_approximate_selection_loses_recall_and_mass(tiny_model_dir, text_file):
    ex = run(tiny_model_dir, text_file, WIN + ["method=exact_topk", "method.k=0.25"])
    lk = run(tiny_model_dir, text_file, WIN + ["method=loki", "method.k=0.25", "method.d=1", "method.basis=online"])
    assert lk["recall"] < 0.95
    assert lk["attention_mass"] < ex["attention_mass"]  # the exact top-k holds the most mass of any k-set
    assert lk["output_rel_error"] > ex["output_rel_error"]
    h2o = run(tiny_model_dir, text_file, WIN + ["method=h2o", "method.k=0.25"])
    assert h2o["cache_saved"] > 0.7 and h2o["recall"] < 1.0
