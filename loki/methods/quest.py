"""Quest (Tang et al., ICML 2024): query-aware page selection.

Keys are split into pages of ``page_size`` (16) consecutive positions; each page keeps the per-channel
min m and max M of its keys. A query's upper bound on any key score of a page is
``sum_c max(q_c * M_c, q_c * m_c)`` (times the layer's scaling). Each row keeps its pages with the highest
bounds and attends exactly over all their visible keys.

Budget, shared with the other methods: the row's ``k`` tokens (``k_mode``); forced tokens (sinks, local
window) are taken first, and the rest of the budget is rounded up to whole pages:
``ceil(max(budget - forced, 0) / page_size)`` pages (so a row may attend up to page_size - 1 keys more than
its budget; ``stats()['kept_fraction']`` shows the realised fraction). Bounds are computed over the keys the
row can see: for a causal row the page holding its own position is partial, and its min/max cover only
the keys up to that position, as a decoder's page metadata would. Pages start at each sequence's first key
(left padding is not part of the grid), so a padded sequence in a batch selects what it selects alone.
"""

from __future__ import annotations

import torch

from loki.common import fail
from loki.methods.base import (Method, acc, dense_attention, exact_scores, forced_mask, masked_attention,
                               token_budget, validate_budget)
from loki.methods.exact_topk import SELECTION_OPTIONS, is_dense_here


def page_bounds(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, page_size: int, scaling: float) -> torch.Tensor:
    """(B, H, T, P) upper bound of each page's scores for each query row (-inf for pages the row cannot see).

    Exact for masks that are causal within the pages (each row sees a prefix of its own page), with any
    padding; full pages use metadata over their visible keys, the row's partial page a running min/max."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    g = H // KVH
    P = -(-S // page_size)
    pad = P * page_size - S
    vis = visible.expand(B, 1, T, S)
    col_ok = vis.any(2)  # (B, 1, S): keys some row sees (not padding)
    kf = acc(k)
    big = torch.finfo(kf.dtype).max
    kmax = kf.masked_fill(~col_ok.unsqueeze(-1), -big)
    kmin = kf.masked_fill(~col_ok.unsqueeze(-1), big)
    if pad:
        kmax = torch.nn.functional.pad(kmax, (0, 0, 0, pad), value=-big)
        kmin = torch.nn.functional.pad(kmin, (0, 0, 0, pad), value=big)
    kmax = kmax.view(B, KVH, P, page_size, D)
    kmin = kmin.view(B, KVH, P, page_size, D)
    M, m = kmax.amax(3), kmin.amin(3)  # (B, KVH, P, D) full-page metadata
    Mc = kmax.cummax(3).values.view(B, KVH, P * page_size, D)[:, :, :S]  # running max within the page
    mc = kmin.cummin(3).values.view(B, KVH, P * page_size, D)[:, :, :S]
    qf = acc(q).view(B, KVH, g, T, D)
    qp, qn = qf.clamp(min=0), qf.clamp(max=0)
    ub = (qp @ M.unsqueeze(2).transpose(-1, -2) + qn @ m.unsqueeze(2).transpose(-1, -2))  # (B, KVH, g, T, P)
    # the row's own (partial) page: bounds over its keys up to the row's last visible key
    pos = torch.arange(S, device=q.device)
    last = torch.where(vis[:, 0], pos, -1).amax(-1)  # (B, T)
    lastc = last.clamp(min=0)
    idx = lastc[:, None, :, None].expand(B, KVH, T, D)
    Mr, mr = Mc.gather(2, idx), mc.gather(2, idx)  # (B, KVH, T, D)
    ub_part = (qp * Mr.unsqueeze(2)).sum(-1) + (qn * mr.unsqueeze(2)).sum(-1)  # (B, KVH, g, T)
    own = (lastc // page_size)  # (B, T)
    ub = ub.view(B, H, T, P)
    ub.scatter_(-1, own[:, None, :, None].expand(B, H, T, 1), ub_part.reshape(B, H, T, 1))
    # pages the row sees no key of
    vis_p = vis[:, 0]
    if pad:
        vis_p = torch.nn.functional.pad(vis_p, (0, pad), value=False)
    page_seen = vis_p.view(B, T, P, page_size).any(-1)  # (B, T, P)
    ub = ub.masked_fill(~page_seen[:, None], float("-inf"))
    return ub * scaling


def roll_out_left_padding(k: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor | None):
    """Each batch row's keys rotated left by its leading padding (the keys no row sees before the first one a row
    sees), so that position 0 is the sequence's first key.  Returns (k, visible, forced) rotated and ``unroll``,
    which rotates a (B, H, T, S) selection back.  Without left padding, the inputs themselves and the identity."""
    B, S = k.shape[0], k.shape[2]
    seen = visible.expand(B, *visible.shape[1:]).any(-2)[:, 0]  # (B, S): keys some row of the sequence sees
    off = torch.where(seen.any(-1), seen.to(torch.int8).argmax(-1), 0)  # (B,) leading padding
    if not bool(off.any()):
        return k, visible, forced, lambda keep: keep
    cols = torch.arange(S, device=k.device)
    src = (cols[None] + off[:, None]) % S  # (B, S): rotated column j reads column src[j]
    back = (cols[None] - off[:, None]) % S  # its inverse

    def take(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.expand(B, *x.shape[1:])
        shape = [B] + [1] * (x.dim() - 1)
        shape[dim] = S
        view = idx.view(shape).expand(*x.shape[:dim], S, *x.shape[dim + 1:])
        return x.gather(dim, view)

    k_r = take(k, src, 2)
    vis_r = take(visible, src, 3)
    forced_r = take(forced, src, 3) if forced is not None else None
    return k_r, vis_r, forced_r, lambda keep: take(keep, back, 3)


def select_pages(ub: torch.Tensor, visible: torch.Tensor, budget: torch.Tensor, forced: torch.Tensor | None,
                 page_size: int) -> torch.Tensor:
    """(B, H, T, S) keys of each row's best pages: ceil((budget - forced) / page_size) pages, plus forced keys."""
    B, H, T, P = ub.shape
    S = visible.shape[-1]
    vis = visible.expand(B, 1, T, S)
    n_forced = forced.expand(B, 1, T, S).sum(-1) if forced is not None else torch.zeros_like(budget)
    rest = (budget.expand(B, 1, T) - n_forced).clamp(min=0)
    n_pages = torch.div(rest + page_size - 1, page_size, rounding_mode="floor")  # (B, 1, T)
    n_pages = torch.minimum(n_pages, torch.isfinite(ub).sum(-1).amin(1, keepdim=True))
    kmax = int(n_pages.max().item()) if n_pages.numel() else 0
    sel_p = torch.zeros(B, H, T, P, dtype=torch.bool, device=ub.device)
    if kmax > 0:
        idx = ub.topk(kmax, dim=-1).indices
        keep = torch.arange(kmax, device=ub.device) < n_pages.unsqueeze(-1)
        sel_p.scatter_(-1, idx, keep.expand(idx.shape))
    keep = sel_p.repeat_interleave(page_size, dim=-1)[..., :S] & vis
    if forced is not None:
        keep |= forced.expand(B, 1, T, S)
    return keep


class Quest(Method):
    name = "quest"
    options = {
        **SELECTION_OPTIONS,
        "page_size": 16,       # tokens per page (Quest: 16)
    }

    def validate(self):
        validate_budget(self.name, self.k, self.k_mode)
        ps = self.page_size
        if isinstance(ps, bool) or not isinstance(ps, int) or ps < 1:
            raise fail(f"quest: page_size must be a positive whole number of tokens, got {ps!r}.", "e.g. method.page_size=16.")

    def attend(self, module, q, k, v, visible, scaling):
        if is_dense_here(self, module, q):
            self.record(None, visible, q.shape[1], kv_heads=k.shape[1])
            return dense_attention(q, k, v, visible, scaling)
        scores = exact_scores(q, k, scaling)
        budget = token_budget(visible, self.k, self.k_mode)
        forced = forced_mask(visible, self.sink_tokens, self.local_window)
        # pages start at each sequence's first key: left padding is rolled to the end for the page grid (a
        # decoder's cache holds no padding), so a padded sequence selects what it selects alone
        k_r, vis_r, forced_r, unroll = roll_out_left_padding(k, visible, forced)
        ub = page_bounds(q, k_r, vis_r, int(self.page_size), scaling)
        keep = unroll(select_pages(ub, vis_r, budget, forced_r, int(self.page_size)))
        self.last_selection = keep
        self.record(keep, visible, q.shape[1], kv_heads=k.shape[1])
        return masked_attention(scores, keep, v)
