"""Loki over an H2O-bounded cache: Loki saves compute but keeps every key in memory; here H2O-style eviction
bounds the KV cache to ``cache`` (a fraction of the prefix / window, or tokens, per ``k_mode``), and Loki
selects the ``k`` best keys *among the cached ones* by its d-dim PCA scores.

Per query row (simulated causally, as a decoder runs; see ``loki.methods.h2o``): the new key enters the
cache; while the cache is over its budget, the cached key with the least accumulated attention that is
neither recent (the last ``max(1, floor(recent * cache_budget))`` keys) nor forced (sinks, local window)
is evicted; Loki ranks the cached keys and the row attends exactly to its top ``k`` (forced keys first);
the attention it gives them is added to their accumulated attention.

The cache is one per KV head (a GQA cache is evicted per KV head; the accumulated attention of the group's
query heads is summed); ``selection`` (head | group) is Loki's top-k, as in ``loki``. ``stats()`` reports
``cache_fraction`` (mean cached keys / visible keys), ``cache_saved`` = 1 - that, and the peak cache size.
"""

from __future__ import annotations

from loki.common import fail
from loki.methods.base import exact_scores, forced_mask, group_reduce, masked_attention, token_budget
from loki.methods.exact_topk import is_dense_here
from loki.methods.h2o import EvictingMethod, simulate
from loki.methods.loki import Loki


class LokiH2O(EvictingMethod, Loki):
    name = "loki_h2o"
    options = {
        **{k: v for k, v in Loki.options.items() if k != "slab_dtype"},  # (the kernels' fp8 slab: loki only)
        "cache": 0.5,          # KV cache budget, same unit as k (k_mode): must be >= k
        "recent": 0.5,         # fraction of the cache budget kept as the most recent tokens
    }

    def validate(self):
        Loki.validate(self)
        self.validate_recent()
        from loki.methods.base import validate_budget

        validate_budget(f"{self.name} (cache)", self.cache, self.k_mode)
        if self.cache < self.k:
            raise fail(f"loki_h2o: the cache budget ({self.cache}) is smaller than the selection budget k={self.k}.",
                       "set method.cache >= method.k (both in the unit of k_mode).")

    def bind(self, model):
        Loki.bind(self, model)
        self._state = {}

    def attend(self, module, q, k, v, visible, scaling):
        g = q.shape[1] // k.shape[1]
        cache_budget = token_budget(visible, self.cache, self.k_mode)
        forced = forced_mask(visible, self.sink_tokens, self.local_window)
        if is_dense_here(self, module, q):
            return self._dense(module, q, k, v, visible, scaling, cache_budget, forced, g)
        scores = exact_scores(q, k, scaling)
        approx = self.approx_scores(module, q, k, scaling, visible)
        if self.selection == "group" and g > 1:
            approx = group_reduce(approx, g, self.group_reduce)
        budget = token_budget(visible, self.k, self.k_mode)
        layer = module.layer_idx
        keep, held, self._state[layer] = simulate(scores, visible, cache_budget, float(self.recent), forced, g,
                                                  self._state.get(layer), rank=approx, sel_budget=budget)
        self.last_selection = keep
        self.record(keep, visible, q.shape[1], cache=held, kv_heads=k.shape[1])
        return masked_attention(scores, keep, v)
