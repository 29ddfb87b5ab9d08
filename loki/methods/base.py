"""What every method shares: option validation, the token budget, top-k selection, exact attention.

Shapes: q (B, H, T, D); k, v (B, KVH, S, D); ``visible`` bool (B|1, 1, T, S). Scores are fp32.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from loki.common import fail

K_MODES = ("prefix", "window", "tokens")


def acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float64 stays float64 (tests against references), anything else -> float32."""
    return x if x.dtype == torch.float64 else x.float()


class Method:
    """Base class. Subclasses set ``name`` and ``options`` (option -> default) and implement ``attend``."""

    name: ClassVar[str] = "base"
    options: ClassVar[dict[str, Any]] = {}
    # dense_layers >= the model's layers: an error (the method would never run under its name), unless a subclass
    # has a use for it (CachedLoki: the dense flash-decoding baseline of the decode benchmark)
    all_layers_dense_ok: ClassVar[bool] = False

    def __init__(self, opts: dict | None = None, **resources):
        opts = dict(opts or {})
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise fail(f"option(s) {unknown} do not apply to method '{self.name}'.",
                       f"'{self.name}' takes: {', '.join(sorted(self.options)) or 'no options'}.")
        self.opts = {**self.options, **opts}
        self.calls = 0
        self.resources = resources
        self.reset_stats()
        self._validate_shared()
        self.validate()

    def _validate_shared(self) -> None:
        """The options several methods share (sinks, local window, dense layers, sparse prefill)."""
        for opt in ("sink_tokens", "local_window", "dense_layers"):
            if opt in self.opts:
                x = self.opts[opt]
                if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                    raise fail(f"{self.name}: {opt} must be an int >= 0, got {x!r}.", f"set method.{opt}=0 or more.")
        if "sparse_prefill" in self.opts and not isinstance(self.opts["sparse_prefill"], bool):
            raise fail(f"{self.name}: sparse_prefill must be true or false, got {self.opts['sparse_prefill']!r}.",
                       "set method.sparse_prefill=true (the prompt goes through the method) or false (decode only).")

    def __getattr__(self, item):  # options read as attributes
        opts = self.__dict__.get("opts", {})
        if item in opts:
            return opts[item]
        raise AttributeError(item)

    def validate(self) -> None:
        pass

    def bind(self, model) -> None:
        """Called once the method is attached to a model (shape checks, loading bases)."""
        from loki.modeling import fingerprint

        self.model_info = fingerprint(model)
        n = self.model_info["num_layers"]
        if self.opts.get("dense_layers", 0) >= n and not self.all_layers_dense_ok:
            raise fail(f"{self.name}: dense_layers={self.dense_layers} makes all {n} layers of this model dense (the "
                       f"method would never run).", f"set method.dense_layers below {n}, or use method=dense.")

    def attend(self, module, q, k, v, visible, scaling) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, **self.opts}

    # -------------------------------------------------------------- what the method kept (for honest reporting)

    def reset_stats(self) -> None:
        self._stats = {"kept": 0.0, "visible": 0.0, "kept_decode": 0.0, "visible_decode": 0.0, "cache": 0.0,
                       "cache_visible": 0.0, "cache_last": 0.0, "cache_last_visible": 0.0, "cache_peak": 0,
                       "context_peak": 0, "rows": 0.0, "rows_visible": 0.0, "rows_decode": 0.0,
                       "rows_visible_decode": 0.0}

    def record(self, keep: torch.Tensor | None, visible: torch.Tensor, heads: int,
               cache: torch.Tensor | None = None, cache_peak: int | None = None, kv_heads: int | None = None) -> None:
        """Count attended keys (``keep`` (B, H, T, S) bool; None = every visible key) against the visible ones,
        and, for methods that evict, the keys held in the cache (``cache`` (B, Hc, T, S) bool, one per cache).

        With ``kv_heads`` (the KV heads of the layer, H a multiple of it) also the K/V rows each KV head must read:
        the union of its G = H / kv_heads query heads' sets (G x a head's set at most, one set with group
        selection)."""
        st = self._stats
        B = keep.shape[0] if keep is not None else visible.shape[0]
        rep = B // visible.shape[0]
        n_vis = float(visible.count_nonzero()) * rep
        n_kept = float(keep.count_nonzero()) if keep is not None else n_vis * heads
        st["visible"] += n_vis * heads
        st["kept"] += n_kept
        decode = visible.shape[-2] == 1  # one query per sequence: a decode step
        if decode:
            st["visible_decode"] += n_vis * heads
            st["kept_decode"] += n_kept
        if kv_heads:
            if keep is None:
                n_rows = n_vis * kv_heads
            else:
                b, h, t, s = keep.shape
                n_rows = float(keep.reshape(b, kv_heads, h // kv_heads, t, s).any(2).count_nonzero())
            st["rows"] += n_rows
            st["rows_visible"] += n_vis * kv_heads
            if decode:
                st["rows_decode"] += n_rows
                st["rows_visible_decode"] += n_vis * kv_heads
        last_vis = visible[..., -1, :].sum(-1)  # (B|1, 1): keys visible to the last row
        st["context_peak"] = max(st["context_peak"], int(last_vis.max()))
        if cache is not None:
            hc = cache.shape[1]
            st["cache"] += float(cache.count_nonzero())
            st["cache_visible"] += n_vis * hc
            held_last = cache[..., -1, :].sum(-1)  # (B, Hc): the cache after the call's last row
            st["cache_last"] += float(held_last.sum())
            st["cache_last_visible"] += float(last_vis.sum()) * rep * hc
            st["cache_peak"] = max(st["cache_peak"], int(cache.sum(-1).max()), cache_peak or 0)

    def stats(self) -> dict:
        """JSON-ready summary of what the method attended to (and cached) since the last ``reset_stats``.

        ``kept_fraction``: attended keys / visible keys over every call, row and head (forced tokens beyond
        the budget, page rounding and dense layers all show up here); ``kept_fraction_decode``: the same over
        single-query calls (decode steps) only. Evicting methods add
        ``cache_fraction_mean`` (cached / visible keys, averaged over rows), ``cache_fraction`` (the cache
        after the last row of each call / the keys seen by then: the memory a decoder holds at the end, over
        layers and KV heads), ``cache_saved`` = 1 - ``cache_fraction``, and the peak cache / context sizes.
        ``kv_rows_fraction`` (``_decode``): K/V rows a KV head reads / visible keys, where a row selected by
        several query heads of the group counts once (the union of their sets; = ``kept_fraction`` with group
        selection or without GQA, at most G x it with per-head selection)."""
        st = self._stats
        out = {}
        if st["visible"]:
            out["kept_fraction"] = st["kept"] / st["visible"]
        if st["visible_decode"]:
            out["kept_fraction_decode"] = st["kept_decode"] / st["visible_decode"]
        if st["rows_visible"]:
            out["kv_rows_fraction"] = st["rows"] / st["rows_visible"]
        if st["rows_visible_decode"]:
            out["kv_rows_fraction_decode"] = st["rows_decode"] / st["rows_visible_decode"]
        if st["cache_visible"]:
            out["cache_fraction_mean"] = st["cache"] / st["cache_visible"]
            out["cache_fraction"] = st["cache_last"] / st["cache_last_visible"]
            out["cache_saved"] = 1.0 - out["cache_fraction"]
            out["cache_peak_tokens"] = st["cache_peak"]
            out["context_peak_tokens"] = st["context_peak"]
        return out


# ------------------------------------------------------------------------------ shared helpers


def validate_budget(name: str, k: Any, k_mode: str) -> None:
    if k_mode not in K_MODES:
        raise fail(f"{name}: unknown k_mode '{k_mode}'.", f"use one of {K_MODES}.")
    if k is None or isinstance(k, bool) or not isinstance(k, (int, float)):
        raise fail(f"{name}: k must be a number, got {k!r}.", "set method.k to a fraction in (0, 1] or a token count.")
    if k <= 0:
        raise fail(f"{name}: k must be > 0, got {k}.", "set method.k to a fraction in (0, 1] or, with k_mode=tokens, a count >= 1.")
    if k_mode in ("prefix", "window") and k > 1:
        raise fail(f"{name}: with k_mode={k_mode}, k is a fraction and must be <= 1, got {k}.",
                   "use k in (0, 1], or k_mode=tokens for an absolute budget.")
    if k_mode == "tokens" and int(k) != k:
        raise fail(f"{name}: with k_mode=tokens, k must be a whole number of tokens, got {k}.", "use an integer k.")


def token_budget(visible: torch.Tensor, k: float, k_mode: str) -> torch.Tensor:
    """Tokens to keep per query row, (B|1, 1, T) int64, each within [1, visible count] (0 if none visible).

    prefix: ceil(k * n_i) of the row's own visible prefix (what a decoder sees);
    window: ceil(k * S) of the whole window (its S non-padding keys), as in the paper's evaluation code (early rows
    keep all);
    tokens: an absolute count.
    """
    from kernels._utils import ceil_fraction  # noqa: PLC0415  (exact: 0.56 of 25 keys is 14, not float64's 15)

    n = visible.sum(-1)
    S = visible.shape[-1]
    if k_mode == "prefix":
        want = ceil_fraction(n, k)
    elif k_mode == "window":
        # the window's own keys: padding columns (seen by no row of the sequence) are not part of it
        S_seq = visible.any(-2).sum(-1, keepdim=True)  # (B|1, 1, 1)
        want = ceil_fraction(S_seq, k).expand_as(n)
    else:
        if k > S:
            raise fail(f"token budget k={int(k)} is larger than the context ({S} tokens).",
                       "lower method.k or use a fractional budget (k_mode=prefix).")
        want = torch.full_like(n, int(k))
    return torch.minimum(want.clamp(min=1), n)


def forced_mask(visible: torch.Tensor, sink_tokens: int, local_window: int) -> torch.Tensor | None:
    """Keys always kept: the first ``sink_tokens`` and the last ``local_window`` visible keys of each row."""
    if not sink_tokens and not local_window:
        return None
    S = visible.shape[-1]
    pos = torch.arange(S, device=visible.device)
    forced = torch.zeros_like(visible)
    if sink_tokens:
        # counted over the row's visible keys, so that a left-padded sequence's sinks are its own first tokens (as
        # LokiCache's, which drops the padding), not padding positions masked away
        forced |= visible.cumsum(-1) <= sink_tokens
    if local_window:
        last = torch.where(visible, pos, -1).amax(-1, keepdim=True)  # last visible key per row
        forced |= (pos > last - local_window) & (pos <= last)
    return forced & visible


def select_topk(scores: torch.Tensor, visible: torch.Tensor, budget: torch.Tensor,
                forced: torch.Tensor | None = None, row_chunk: int = 128) -> torch.Tensor:
    """Boolean selection (same shape as scores) of each row's ``budget`` highest visible scores.

    Forced keys are taken first and always kept. Ties are broken by ``torch.topk``. Rows are processed
    in chunks, each over the columns any of its rows can see and with the chunk's largest budget, which
    halves the work for causal masks.
    """
    s = acc(scores).masked_fill(~visible, float("-inf"))
    if forced is not None:
        s = s.masked_fill(forced, float("inf"))
    T, S = s.shape[-2], s.shape[-1]
    sel = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    cols = torch.arange(S, device=s.device)
    vis_rows = visible.any(1) if visible.dim() == 4 else visible  # (B|1, T, S)
    last_col = torch.where(vis_rows, cols, -1).amax(-1)  # (B|1, T)
    for r0 in range(0, T, row_chunk):
        r1 = min(T, r0 + row_chunk)
        b = budget[..., r0:r1]  # (B, 1, rows)
        kmax = int(b.max().item()) if b.numel() else 0
        if kmax == 0:
            continue
        c1 = max(int(last_col[:, r0:r1].max().item()) + 1, kmax)
        part = s[..., r0:r1, :c1]
        idx = part.topk(kmax, dim=-1, sorted=True).indices
        keep = torch.arange(kmax, device=s.device) < b.unsqueeze(-1)
        sel[..., r0:r1, :c1].scatter_(-1, idx, keep.expand(idx.shape))
    sel &= visible
    if forced is not None:
        sel |= forced
    return sel


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KVH, S, D) -> (B, KVH*groups, S, D): query head h uses KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def group_reduce(x: torch.Tensor, groups: int, how: str) -> torch.Tensor:
    """(B, H, T, S) per query head -> (B, KVH, T, S) per KV group."""
    B, H, T, S = x.shape
    x = x.view(B, H // groups, groups, T, S)
    if how == "max":
        return x.amax(2)
    if how == "sum":
        return x.sum(2)
    if how == "mean":
        return x.mean(2)
    raise fail(f"unknown group_reduce '{how}'.", "use max, sum or mean.")


def exact_scores(q, k, scaling) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    return torch.matmul(acc(q), acc(expand_kv(k, groups)).transpose(-1, -2)) * scaling


def masked_attention(scores: torch.Tensor, keep: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax over the kept scores, times V. Rows that keep nothing give zeros. Returns v's dtype."""
    groups = scores.shape[1] // v.shape[1]
    s = acc(scores).masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.matmul(p, acc(expand_kv(v, groups)).to(p.dtype)).to(v.dtype)


def kept_attention(q, k, v, keep: torch.Tensor, scaling) -> torch.Tensor:
    """Exact attention of each query over its kept keys only (boolean ``keep`` (B, H, T, S)): the same numbers as
    ``masked_attention(exact_scores(q, k, scaling), keep, v)`` (to float rounding), through torch's fused sdpa,
    without materialising the masked score matrix (about 2x faster on the CPU). Rows that keep nothing give
    zeros. Returns v's dtype."""
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(acc(q), acc(expand_kv(k, groups)), acc(expand_kv(v, groups)),
                                         attn_mask=keep, scale=scaling)
    return out.nan_to_num_(0.0).to(v.dtype)


def dense_attention(q, k, v, visible, scaling) -> torch.Tensor:
    """Exact attention over every visible key (torch's sdpa, in the accumulation dtype); rows that see nothing
    give zeros. What the methods run in their dense layers and dense prefill (no score matrix kept)."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(acc(q), acc(k), acc(v), attn_mask=visible, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.nan_to_num_(0.0).to(v.dtype)


def sparse_attention(q, k, v, keep, scaling) -> torch.Tensor:
    """Exact attention restricted to the kept keys (reference: computes all scores, masks the rest)."""
    return masked_attention(exact_scores(q, k, scaling), keep, v)
