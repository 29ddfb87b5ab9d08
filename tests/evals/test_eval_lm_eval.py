"""The lm-eval adapter: a local multiple-choice task, run through lm-eval's HFLM with our method attached."""

from __future__ import annotations

import json

import pytest
import torch

from eval_helpers import compose_cfg, run

pytest.importorskip("lm_eval")


def direct_accuracy(model_dir, text_file, limit):
    """The task's accuracy computed by hand: argmax over choices of the summed log-likelihood."""
    from loki.evals.lm_eval_tasks.loki_demo import items
    from loki.modeling import load_model, load_tokenizer

    cfg = compose_cfg(model_dir, text_file, [])
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    right = 0
    for it in items()[:limit]:
        ctx = tok(it["context"], add_special_tokens=False)["input_ids"]
        lls = []
        for ch in it["choices"]:
            cont = tok(it["context"] + ch, add_special_tokens=False)["input_ids"][len(ctx):]
            x = torch.tensor([ctx + cont])
            with torch.inference_mode():
                lp = model(x).logits.log_softmax(-1)[0, len(ctx) - 1: -1]
            lls.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        right += int(max(range(len(lls)), key=lls.__getitem__) == it["label"])
    return right / limit


def test_lm_eval_local_task_with_a_method(tiny_model_dir, text_file):
    m = run(tiny_model_dir, text_file, ["eval=lm_eval", "eval.tasks=[loki_demo]", "eval.limit=8",
                                        "method=exact_topk", "method.k=1.0"])
    json.dumps(m)
    assert m["attention_calls"] > 0, "the method must run inside lm-eval's forward passes"
    assert m["accuracy"] == m["loki_demo/acc"] == m["results"]["loki_demo"]["acc"]
    assert m["accuracy"] == pytest.approx(direct_accuracy(tiny_model_dir, text_file, 8))

