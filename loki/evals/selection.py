"""Selection quality per layer, measured inside every attention call against the exact scores of the same
q and k (so errors of earlier layers do not hide or inflate a layer's own selection error):

- ``recall``: |selected & exact top-k| / |exact top-k|, the exact top-k set having the method's own budget
  (``k``, ``k_mode``; no forced tokens); methods without a budget (dense, pca_attn) compare against every key;
- ``attention_mass``: the dense attention probability that falls on the selected keys (mean over rows);
- ``output_rel_error``: ||out_method - out_dense|| / ||out_dense|| over the call (Frobenius);
- ``kept_fraction``: selected keys / visible keys.

The forward passes run over the first ``eval.max_windows`` (default: all ``eval.num_windows``) windows of
``eval.window`` tokens of the eval corpus (the same windows as perplexity). Metrics: the means over layers
at the top level, and ``per_layer``.

Note: the inputs of layer l come from the method's own outputs at the layers below (the model runs with the
method); each layer's numbers compare the method with dense attention *on those same inputs*.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from loki.methods.base import exact_scores, masked_attention, select_topk, token_budget


class SelectionProbe:
    """Wraps ``method.attend`` to measure each call against dense attention of the same q, k, v."""

    def __init__(self, method):
        self.method = method
        self.acc = defaultdict(lambda: defaultdict(float))

    def __enter__(self):
        inner = self.method.attend  # bound method of the class

        def attend(module, q, k, v, visible, scaling):
            self.method.last_selection = None
            out = inner(module, q, k, v, visible, scaling)
            with torch.no_grad():
                self.measure(module, q, k, v, visible, scaling, out)
            return out

        self.method.attend = attend  # instance attribute shadows the class's method
        return self

    def __exit__(self, *exc):
        self.method.__dict__.pop("attend", None)
        return False

    def measure(self, module, q, k, v, visible, scaling, out):
        m = self.method
        B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        vis = visible.expand(B, 1, T, S)
        scores = exact_scores(q, k, scaling)
        sel = getattr(m, "last_selection", None)
        if sel is None:  # the call attended to every visible key
            sel = vis.expand(B, H, T, S)
        if "k" in m.opts and "k_mode" in m.opts:
            budget = token_budget(vis, m.k, m.k_mode)
        else:
            budget = vis.sum(-1)
        ref = select_topk(scores, vis, budget)
        p = torch.softmax(scores.float().masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
        dense = masked_attention(scores, vis.expand(B, H, T, S), v).float()
        rows = vis.any(-1).expand(B, H, T)
        a = self.acc[int(getattr(module, "layer_idx", 0))]
        a["hit"] += float((sel & ref).sum())
        a["ref"] += float(ref.sum())
        a["mass"] += float((p * sel).sum(-1)[rows].sum())
        a["rows"] += float(rows.sum())
        a["kept"] += float(sel.sum())
        a["visible"] += float(vis.sum()) * H
        a["err_num"] += float((out.float() - dense).pow(2).sum())
        a["err_den"] += float(dense.pow(2).sum())
        a["calls"] += 1

    def per_layer(self) -> list[dict]:
        rows = []
        for layer in sorted(self.acc):
            a = self.acc[layer]
            rows.append({
                "layer": layer,
                "recall": a["hit"] / a["ref"] if a["ref"] else None,
                "attention_mass": a["mass"] / a["rows"] if a["rows"] else None,
                "output_rel_error": (a["err_num"] / a["err_den"]) ** 0.5 if a["err_den"] else None,
                "kept_fraction": a["kept"] / a["visible"] if a["visible"] else None,
                "calls": int(a["calls"]),
            })
        return rows


def _mean(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def selection_eval(cfg, model, method, device) -> dict:
    from tqdm import tqdm

    from loki.evals.perplexity import eval_windows

    seqs = eval_windows(cfg, model)
    cap = cfg.eval.get("max_windows")
    if cap is not None:  # the experiment's num_windows is for perplexity; selection measures on fewer (it costs more per window)
        seqs = seqs[: int(cap)]
    bs = int(cfg.eval.get("batch_size", 1))
    with SelectionProbe(method) as probe, torch.inference_mode():
        for i in tqdm(range(0, seqs.shape[0], bs), desc="selection"):
            model(input_ids=seqs[i: i + bs].to(device), use_cache=False)
    per_layer = probe.per_layer()
    return {
        "recall": _mean(per_layer, "recall"),
        "attention_mass": _mean(per_layer, "attention_mass"),
        "output_rel_error": _mean(per_layer, "output_rel_error"),
        "per_layer": per_layer,
        "window": int(cfg.eval.window),
        "num_windows": int(seqs.shape[0]),
    }
