"""H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): a KV cache of ``k`` tokens kept by eviction.

The cache policy is simulated causally, one query row at a time, as a decoder would run it:

1. the row's new key enters the cache;
2. while the cache holds more than the row's budget (``k``, ``k_mode`` as for every method), the key with the
   least *accumulated attention* is evicted, among the keys that are neither recent (the last
   ``max(1, floor(recent * budget))`` visible keys, H2O's recent window; the newest key is always kept) nor
   forced (``sink_tokens``, ``local_window``);
3. the row attends exactly over the cache (so every row attends to at most its budget);
4. each cached key's accumulated attention grows by the probability this row gave it.

An evicted key never comes back. ``selection=head`` keeps one cache per query head (H2O's per-head policy);
``selection=group`` one cache per KV head (the attention of the group's heads summed), which is what a GQA
KV cache can really evict. With ``sparse_prefill=false`` the prompt attends densely and the cache is then
cut to the budget by the prompt's accumulated attention (H2O's prefill), and each generated token continues
the policy: the state (cache membership, accumulated attention) is carried between calls of a generation.
``stats()`` reports the cache size (``cache_fraction``, ``cache_saved``).
"""

from __future__ import annotations

import torch

from loki.common import fail
from loki.methods.base import acc as fdt
from loki.methods.base import (Method, dense_attention, exact_scores, forced_mask, masked_attention, token_budget,
                               validate_budget)
from loki.methods.exact_topk import SELECTION_OPTIONS, is_dense_here


def _recent_mask(vis: torch.Tensor, budget: torch.Tensor, recent: float) -> torch.Tensor:
    """(B, 1, T, S) for each row, its last max(1, floor(recent * budget)) visible keys (budget (B|1, 1, T))."""
    S = vis.shape[-1]
    pos = torch.arange(S, device=vis.device)
    last = torch.where(vis, pos, -1).amax(-1, keepdim=True)  # (B, 1, T, 1)
    r = torch.clamp(torch.floor(budget.to(torch.float64) * recent), min=1).to(torch.long).unsqueeze(-1)
    return (pos > last - r) & (pos <= last) & vis


def _row_topk(s: torch.Tensor, avail: torch.Tensor, budget: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
    """(B, U, S): each unit's ``budget`` (B, 1) highest scores among ``avail``; forced available keys first."""
    s = s.masked_fill(~avail, float("-inf"))
    if forced is not None:
        s = s.masked_fill(forced & avail, float("inf"))
    kmax = int(budget.max().item()) if budget.numel() else 0
    sel = torch.zeros_like(avail)
    if kmax > 0:
        kmax = min(kmax, s.shape[-1])
        idx = s.topk(kmax, dim=-1).indices
        keep = torch.arange(kmax, device=s.device) < budget.unsqueeze(-1)  # (B, 1, kmax)
        sel.scatter_(-1, idx, keep.expand(idx.shape))
    sel &= avail
    if forced is not None:
        sel |= forced & avail
    return sel


def dense_prefill_state(scores: torch.Tensor, visible: torch.Tensor, cache_budget: torch.Tensor, recent: float,
                        forced: torch.Tensor | None, groups: int) -> dict:
    """H2O after a dense prompt: accumulated attention of every prompt row, then the cache cut to the last row's
    budget (recent + forced keys kept, the rest by accumulated attention)."""
    B, H, T, S = scores.shape
    Hc = H // groups
    vis = visible.expand(B, 1, T, S)
    p = torch.softmax(fdt(scores).masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    acc = p.sum(2).view(B, Hc, groups, S).sum(2)  # (B, Hc, S)
    v_last = vis[:, :, -1, :]
    b = cache_budget.expand(B, 1, T)[:, :, -1]  # (B, 1)
    protected = _recent_mask(vis[:, :, -1:, :], b[..., None], recent)[:, :, 0]
    if forced is not None:
        protected = protected | forced.expand(B, 1, T, S)[:, :, -1, :]
    cache = _row_topk(acc, v_last.expand(B, Hc, S), b, protected.expand(B, Hc, S))
    return {"cache": cache, "acc": acc, "S": S, "B": B}


def simulate(scores: torch.Tensor, visible: torch.Tensor, cache_budget: torch.Tensor, recent: float,
             forced: torch.Tensor | None, groups: int, state: dict | None = None,
             rank: torch.Tensor | None = None, sel_budget: torch.Tensor | None = None):
    """Run the eviction policy over the rows of one call.

    scores (B, H, T, S) exact scores; visible (B|1, 1, T, S); cache_budget (B|1, 1, T); forced (B|1, 1, T, S) or
    None; ``groups`` query heads per cache (1: a cache per query head); ``state`` from the previous call of the
    same sequence (keys before this call). ``rank`` (B, H or H/groups, T, S): if given, each row attends only to
    the ``sel_budget`` best-ranked cached keys (loki_h2o), else to the whole cache.

    Returns keep (B, H, T, S) (keys attended), cache (B, H/groups, T, S) (keys held), and the new state.
    """
    B, H, T, S = scores.shape
    Hc = H // groups
    S0 = S - T
    dev = scores.device
    dt = fdt(scores).dtype
    vis = visible.expand(B, 1, T, S)
    cache = torch.zeros(B, Hc, S, dtype=torch.bool, device=dev)
    acc = torch.zeros(B, Hc, S, dtype=dt, device=dev)
    if S0 > 0:
        if state is None or state["S"] != S0 or state["B"] != B:
            raise fail(f"an evicting method got {T} new queries over {S} keys but holds no cache state for the "
                       f"{S0} earlier keys.",
                       "run each sequence from its first token (a prefill, then one token at a time with a KV cache).")
        cache[..., :S0] = state["cache"]
        acc[..., :S0] = state["acc"].to(dt)
    # everything that does not depend on the evictions, for all rows at once
    enter = vis & (vis.cumsum(2) == 1)  # the row at which each key first becomes visible (it enters the cache)
    if S0 > 0:
        enter[..., :S0] = False  # earlier keys are in the state (or were evicted for good)
    cb = cache_budget.expand(B, 1, T)
    protected = _recent_mask(vis, cb, recent)
    if forced is not None:
        protected |= forced.expand(B, 1, T, S)
    sb = sel_budget.expand(B, 1, T) if sel_budget is not None else None
    fr = forced.expand(B, 1, T, S) if forced is not None else None
    pos = torch.arange(S, device=dev)
    ncols = (torch.where(vis, pos, -1).amax(-1).amax(0).view(-1) + 1).tolist()  # columns any row i can see
    keep = torch.zeros(B, H, T, S, dtype=torch.bool, device=dev)
    held = torch.zeros(B, Hc, T, S, dtype=torch.bool, device=dev)
    neg, inf = float("-inf"), float("inf")
    unit_is_head = rank is not None and rank.shape[1] == H
    for i in range(T):
        c = max(int(ncols[i]), 1)
        cv, av = cache[..., :c], acc[..., :c]  # views
        v_row = vis[:, :, i, :c]
        cv |= enter[:, :, i, :c]
        cv &= v_row
        excess = cv.sum(-1) - cb[:, :, i]  # (B, Hc)
        if int(excess.max()) > 0:
            prot = protected[:, :, i, :c]
            while True:
                cand = cv & ~prot
                ok = (excess > 0) & cand.any(-1)
                if not bool(ok.any()):
                    break
                j = av.masked_fill(~cand, inf).argmin(-1, keepdim=True)  # the first least-attended key
                cv.scatter_(-1, j, cv.gather(-1, j) & ~ok.unsqueeze(-1))
                excess = excess - ok.long()
                if int(excess.max()) <= 0:
                    break
        held[:, :, i, :c] = cv
        if rank is None:
            att = cv.repeat_interleave(groups, dim=1) if groups > 1 else cv
        else:
            avail = cv.repeat_interleave(groups, dim=1) if (unit_is_head and groups > 1) else cv
            att = _row_topk(fdt(rank[:, :, i, :c]), avail, sb[:, :, i], fr[:, :, i, :c] if fr is not None else None)
            if att.shape[1] != H:
                att = att.repeat_interleave(groups, dim=1)
        keep[:, :, i, :c] = att
        p = torch.softmax(fdt(scores[:, :, i, :c]).masked_fill(~att, neg), dim=-1)
        p = p.view(B, Hc, groups, c).sum(2) if groups > 1 else p
        av += p.nan_to_num_(0.0)
    return keep, held, {"cache": cache, "acc": acc, "S": S, "B": B}


class EvictingMethod(Method):
    """Shared by h2o and loki_h2o: per-layer cache state across the calls of one generation."""

    def bind(self, model):
        super().bind(model)
        self._state = {}

    def validate_recent(self):
        r = self.recent
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise fail(f"{self.name}: recent must be a fraction of the cache budget in [0, 1], got {r!r}.",
                       "e.g. method.recent=0.5 (H2O's even split of heavy hitters and recent tokens).")

    def _dense(self, module, q, k, v, visible, scaling, cache_budget, forced, groups):
        layer = getattr(module, "layer_idx", 0)
        B = q.shape[0]
        held = visible.expand(B, q.shape[1] // groups, *visible.shape[2:])  # a dense call holds every visible key
        peak = int(visible[..., -1, :].sum(-1).max())
        if layer >= int(self.dense_layers):
            if q.shape[2] == k.shape[2]:  # a dense prompt (sparse_prefill=false): start the cache policy from it
                self._state[layer] = dense_prefill_state(exact_scores(q, k, scaling), visible, cache_budget,
                                                         float(self.recent), forced, groups)
                held = held.clone()
                held[:, :, -1, :] = self._state[layer]["cache"]  # ... and is cut to the budget after it
            else:  # a dense chunk after earlier keys: no policy state to continue from
                self._state.pop(layer, None)
        self.record(None, visible, q.shape[1], cache=held, cache_peak=peak, kv_heads=k.shape[1])
        return dense_attention(q, k, v, visible, scaling)


class H2O(EvictingMethod):
    name = "h2o"
    options = {
        **SELECTION_OPTIONS,   # k = the cache budget (fraction of the prefix / window, or tokens)
        "recent": 0.5,         # fraction of the budget kept as the most recent tokens (H2O: half heavy, half recent)
        "selection": "head",   # head: one cache per query head | group: one per KV head (attention summed)
    }

    def validate(self):
        validate_budget(self.name, self.k, self.k_mode)
        self.validate_recent()
        if self.selection not in ("head", "group"):
            raise fail(f"h2o: selection must be head or group, got {self.selection!r}.", "set method.selection.")

    def attend(self, module, q, k, v, visible, scaling):
        groups = q.shape[1] // k.shape[1] if self.selection == "group" else 1
        budget = token_budget(visible, self.k, self.k_mode)
        forced = forced_mask(visible, self.sink_tokens, self.local_window)
        if is_dense_here(self, module, q):
            return self._dense(module, q, k, v, visible, scaling, budget, forced, groups)
        scores = exact_scores(q, k, scaling)
        layer = module.layer_idx
        keep, held, self._state[layer] = simulate(scores, visible, budget, float(self.recent), forced, groups,
                                                  self._state.get(layer))
        self.last_selection = keep
        self.record(keep, visible, q.shape[1], cache=held, kv_heads=k.shape[1])
        return masked_attention(scores, keep, v)

