"""passkey / needle: prompts generated locally at exact lengths and depths, exact-match scoring, the decode
path (decode_only), and the model's length limit."""

from __future__ import annotations

import json
import re

import pytest
import torch

from eval_helpers import compose_cfg, run
from loki.common import LokiError


def test_passkey_prompts_have_the_lengths_and_depths(tiny_model_dir, text_file):
    from loki.evals.passkey import passkey_cases
    from loki.modeling import load_model, load_tokenizer

    cfg = compose_cfg(tiny_model_dir, text_file, ["eval=passkey", "eval.lengths=[200,300]", "eval.depths=[0,0.5,1]"])
    tok = load_tokenizer(cfg.model)
    cases = passkey_cases(cfg, load_model(cfg.model), tok)
    assert [(c.length, c.depth) for c in cases] == [(n, d) for n in (200, 300) for d in (0.0, 0.5, 1.0)]
    for c in cases:
        assert len(c.ids) == c.length and c.ids[0] == tok.bos_token_id
        text = tok.decode(c.ids)
        assert text.count(f"The pass key is {c.key}.") == 1
        assert text.rstrip().endswith("What is the pass key? The pass key is")
    # depth 0: the key right after the instructions; depth 1: right before the question
    t0, t1 = tok.decode(cases[3].ids), tok.decode(cases[5].ids)
    assert t0.index("pass key is") < t0.index("The grass is green")
    assert t1.index(f"{cases[5].key} is the pass key.") > t1.rindex("The grass is green")


def test_needle_haystack_is_the_eval_corpus(tiny_model_dir, text_file):
    from loki.evals.needle import needle_cases
    from loki.modeling import load_model, load_tokenizer

    cfg = compose_cfg(tiny_model_dir, text_file, ["eval=needle", "eval.lengths=[250]", "eval.depths=[0.5]"])
    tok = load_tokenizer(cfg.model)
    (c,) = needle_cases(cfg, load_model(cfg.model), tok)
    text = tok.decode(c.ids)
    assert len(c.ids) == 250 and "The committee met on Tuesday" in text
    city = re.search(r"special magic number for (\w+) is " + c.key, text).group(1)
    assert text.rstrip().endswith(f"The special magic number for {city} is")


class Oracle:
    """Stands in for the model's generate: answers with the key found in the prompt (or a wrong one)."""

    def __init__(self, tok, config, right=True):
        self.tok, self.config, self.right = tok, config, right

    def generate(self, input_ids, **kw):
        text = self.tok.decode(input_ids[0])
        key = re.search(r"(?:pass key is|magic number for \w+ is) (\d+)", text).group(1)
        ans = key if self.right else str(int(key) + 1)
        new = self.tok(" " + ans + ".", add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_exact_match_scoring(tiny_model_dir, text_file, kind):
    from loki.evals.retrieval import run_cases
    from loki.methods import build_method
    from loki.modeling import load_tokenizer

    mod = __import__(f"loki.evals.{kind}", fromlist=["x"])
    cfg = compose_cfg(tiny_model_dir, text_file, [f"eval={kind}", "eval.lengths=[260]", "eval.depths=[0,0.5,1]"])
    tok = load_tokenizer(cfg.model)
    from loki.modeling import load_model

    model = load_model(cfg.model)
    cases = getattr(mod, f"{kind}_cases")(cfg, model, tok)
    method = build_method({"name": "dense"})
    good = run_cases(cfg, Oracle(tok, model.config, True), method, "cpu", cases, tok, kind)
    bad = run_cases(cfg, Oracle(tok, model.config, False), method, "cpu", cases, tok, kind)
    assert good["accuracy"] == 1.0 and bad["accuracy"] == 0.0
    assert [c["correct"] for c in good["per_case"]] == [True] * 3


def test_passkey_decode_only_runs_the_decode_path(tiny_model_dir, text_file):
    m = run(tiny_model_dir, text_file, ["eval=passkey", "eval.lengths=[200]", "eval.depths=[0,1]", "eval.max_new_tokens=3",
                                        "eval.decode_only=true", "method=h2o", "method.k=0.25"])
    json.dumps(m)
    # what ran: the decode_only eval prefilled densely, and the options (and the resolved config) say so
    assert m["decode_only"] is True and m["options"]["sparse_prefill"] is False
    assert m["config"]["method"]["sparse_prefill"] is False
    assert len(m["per_case"]) == 2 and {c["depth"] for c in m["per_case"]} == {0.0, 1.0}
    assert all(set(c) >= {"length", "depth", "correct"} for c in m["per_case"])
    assert m["accuracy"] == sum(c["correct"] for c in m["per_case"]) / 2  # the mean of its cases
    assert m["attention_calls"] == 2 * 2 * 3  # 2 cases x 2 layers x (prefill + 2 decode steps)
    assert m["cache_fraction"] < 0.3  # the cache was cut after the dense prompt
    assert 0.25 <= m["kept_fraction_decode"] < 0.27  # each generated token attended to ceil(n / 4) keys
    assert m["kept_fraction"] > 0.9  # ... while the dense prompt attended to all of them


@pytest.mark.parametrize("given,refused", [("method.sparse_prefill=true", True), ("+method.sparse_prefill=true", True),
                                            ("method.k=0.25", False)])
def test_decode_only_with_an_explicit_sparse_prefill_is_refused(tiny_model_dir, text_file, given, refused):
    """eval=passkey_decode prefills densely: an explicit method.sparse_prefill=true on the command line contradicts
    it (refused before the model loads); the config's default true is set to false, as it runs."""
    from hydra.core.hydra_config import HydraConfig

    from loki.common import compose_config
    from loki.evaluate import apply_decode_only

    cfg = compose_cfg(tiny_model_dir, text_file, ["eval=passkey_decode", "method=loki", "method.sparse_prefill=true"])
    hc = compose_config(return_hydra_config=True)
    hc.hydra.overrides.task = [given]
    try:
        HydraConfig.instance().set_config(hc)
        if refused:
            with pytest.raises(LokiError, match="(?s)eval=passkey_decode is decode_only.*method.sparse_prefill=true.*"
                                                "How to fix: drop method.sparse_prefill=true.*eval=passkey"):
                apply_decode_only(cfg)
            assert cfg.method.sparse_prefill is True
        else:
            apply_decode_only(cfg)
            assert cfg.method.sparse_prefill is False
    finally:
        HydraConfig.instance().cfg = None


def test_length_above_the_model_limit_is_an_error(tiny_model_dir, text_file):
    # the tiny model has max_position_embeddings=512
    with pytest.raises(LokiError, match="exceed the model's limit of 512"):
        run(tiny_model_dir, text_file, ["eval=needle", "eval.lengths=[510]", "eval.depths=[0.5]", "method=dense"])
    with pytest.raises(LokiError, match="too short"):
        run(tiny_model_dir, text_file, ["eval=passkey", "eval.lengths=[40]", "eval.depths=[0.5]", "method=dense"])
