"""Eval registry and configs; bad input is one clear error."""

from __future__ import annotations

import json

import pytest

from eval_helpers import run
from loki.common import CONF_DIR, LokiError


def test_every_eval_registered_with_a_config():
    from loki.evals import EVALS

    assert set(EVALS) >= {"perplexity", "selection", "passkey", "needle", "lm_eval"}
    import yaml

    for name in EVALS:
        assert yaml.safe_load((CONF_DIR / "eval" / f"{name}.yaml").read_text())["name"] == name


def test_unknown_eval_is_an_error():
    from loki.evals import get_eval

    with pytest.raises(LokiError, match="unknown eval 'bleu'"):
        get_eval("bleu")


def test_perplexity_reports_the_methods_budget_and_cache(tiny_model_dir, text_file):
    m = run(tiny_model_dir, text_file, ["eval=perplexity", "eval.window=64", "eval.num_windows=2",
                                        "method=loki_h2o", "method.k=0.25", "method.cache=0.5", "method.basis=online",
                                        "method.d=4"])
    json.dumps(m)
    assert m["ppl"] > 1 and m["kept_fraction"] == pytest.approx(m["method_stats"]["kept_fraction"])
    assert m["cache_fraction"] == pytest.approx(0.5) and m["cache_saved"] == pytest.approx(0.5)
    assert m["method_stats"]["cache_peak_tokens"] == 32 and m["method_stats"]["context_peak_tokens"] == 64



@pytest.mark.parametrize("overrides,msg", [
    (["method=h2o", "+method.d=16"], "do not apply to method 'h2o'"),
    (["method=exact_topk", "method.k=100000", "method.k_mode=tokens", "eval.window=64", "eval.num_windows=1"],
     "larger than the context"),
    (["eval=selection", "eval.window=4096", "method=dense"], "above the model's limit of 512"),
    (["eval=passkey", "eval.depths=[1.5]", "eval.lengths=[200]", "method=dense"], "depths must be in"),
])
def test_bad_input_through_evaluate(tiny_model_dir, text_file, overrides, msg):
    with pytest.raises(LokiError, match=msg):
        run(tiny_model_dir, text_file, overrides)
