"""Exact top-k (oracle): exact scores, keep each query's top k keys, exact attention over those."""

from __future__ import annotations

from loki.methods.base import (Method, dense_attention, exact_scores, forced_mask, kept_attention,
                               select_topk, token_budget, validate_budget)

SELECTION_OPTIONS = {
    "k": 0.25,            # fraction (k_mode prefix/window) or token count (k_mode tokens)
    "k_mode": "prefix",   # prefix | window | tokens
    "sink_tokens": 0,     # first tokens always kept
    "local_window": 0,    # most recent tokens always kept
    "dense_layers": 0,    # the first N layers attend densely
    "sparse_prefill": True,  # False: rows of a multi-token forward attend densely (decode-only sparsity)
}


def is_dense_here(method, module, q) -> bool:
    if getattr(module, "layer_idx", 0) < int(method.dense_layers):
        return True
    return (not method.sparse_prefill) and q.shape[2] > 1


class ExactTopK(Method):
    name = "exact_topk"
    options = dict(SELECTION_OPTIONS)

    def validate(self):
        validate_budget(self.name, self.k, self.k_mode)

    def attend(self, module, q, k, v, visible, scaling):
        if is_dense_here(self, module, q):
            self.record(None, visible, q.shape[1], kv_heads=k.shape[1])
            return dense_attention(q, k, v, visible, scaling)
        scores = exact_scores(q, k, scaling)
        budget = token_budget(visible, self.k, self.k_mode)
        keep = select_topk(scores, visible, budget, forced_mask(visible, self.sink_tokens, self.local_window))
        self.last_selection = keep
        self.record(keep, visible, q.shape[1], kv_heads=k.shape[1])
        return kept_attention(q, k, v, keep, scaling)
