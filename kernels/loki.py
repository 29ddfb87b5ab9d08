"""The whole Loki decode step: rotate q, approximate scores, top-k, sparse flash-decoding.

    out = loki_decode(q, P, k_lr, k_rest, v, lengths, k_budget, mode="group", reduce="max", scaling=None)

path="auto" is the bracket path (`choose_path`; kernels.loki.AUTO_PATH overrides it, for benchmarks).
path="bracket": rotate q + sample bracket, scores (many programs per row), classify against the bracket, band
select, then the sparse attention kernel (+ split combine); see bracket.py.  Since session 11 (ATTN_EARLY) the
attention starts while the band select runs, on each row's keys above its bracket (attention.py, "Early start").
path="fused": one kernel rotates q, scores each row and selects its top-k (one program per row).
path="split": rotate_q, loki_scores (many programs per row), topk_select, sparse attention.
path="torch_topk": split path with torch.topk instead of the Triton selection.
sink_tokens / local_window (always-selected positions) are supported on the bracket path.
"""
from __future__ import annotations

import torch

from ._utils import (FLOAT_DTYPES, LokiInputError, check, check_basis, check_cache, check_float, check_lengths,
                     check_lengths_range, check_out)
from . import attention as attn_mod
from .attention import rows_continue, sparse_decode_attention
from . import bracket as bracket_mod
from .kv_cache import check_slab
from .bracket import (bracket_ready, bracket_workspace_size, check_fraction, check_fraction_k_max, fraction_budget,
                      fraction_k_max, loki_select_bracket)
from .scores import loki_scores, rotate_q
from .topk import _budget_args, loki_select, topk_select


PATHS = ("auto", "bracket", "fused", "split", "torch_topk")
FOLD_COMBINE = True  # bracket path: the attention kernel combines its split-K partials itself (session 5)
# session 11, bracket path: the sparse attention starts while the band select runs (programmatic dependent launch on
# sm_90+) and attends first to each row's keys above its bracket, which the classify kernel has already placed
ATTN_EARLY = True
AUTO_PATH: str | None = None  # when set, path="auto" resolves to it (benchmarks compare paths inside a whole model)
# session 12, bracket path: where d <= ATTN_LOWRANK_D, S_max >= ATTN_LOWRANK_MIN_S and there are at least
# ATTN_LOWRANK_MIN_ROWS score rows (B x KV heads in group mode), the sparse attention takes ATTN_LOWRANK_WAVES waves of
# programs instead of SPARSE_CONFIG's one (ATTN_LOWRANK_D = 0: never).  Measured (h200_variants_s12c, s12d, s12f): at
# batch 16 (128 rows) 64K / (D/8, 1/16) 2.7 us faster alone, 8 us with bracket.py's BRACKET_ROTATE_PDL rule, 16K 2 us;
# at batch 1 (8 rows) 3.3-3.4 us slower at 64K / 128K; two waves at d = 32 were 8-55 us slower at 16K and 64K
ATTN_LOWRANK_D = 16
# session 17: where the attention reads whole K rows (a row layout: attention.WIDEN_ROWS and `rows_continue`), the rule
# applies up to d = ATTN_LOWRANK_ROWS_D.  Measured at batch 16 in the rows layout (h200_variants_s17a, s17b: three runs
# each): d = 32 at 16K 1.9-2.3 / 0.3-0.8 us faster (k = 1/4 / 1/8), at 64K 2.5-6.2 / 1.6-2.5; the 16K timeline
# (h200_timeline_s17a_s17_w2) shows the attention 76.4 us in the step against 77.7 with one wave.  Three / four waves
# were 1-45 us slower.  (Not with the ATTN_WIDE_ROWS option below, which asks for its own tiles there)
ATTN_LOWRANK_ROWS_D = 32
ATTN_LOWRANK_MIN_S = 16384
ATTN_LOWRANK_MIN_ROWS = 64
ATTN_LOWRANK_WAVES = 2
# session 13, bracket path: where d >= ATTN_WIDE_MIN_D and there are at least ATTN_WIDE_MIN_ROWS score rows, the sparse
# attention takes 128-token tiles at 2 stages (ATTN_WIDE_CONFIG) instead of SPARSE_CONFIG's 64 at 3 (0: never).
# Measured at batch 16 (h200_variants_s13g): d = 32 at 64K 10.2 / 4.2 us faster at k = 1/4 / 1/8, at 16K 1.8 / 1.2,
# 4K within 0.2; at d = 16 10.6 us slower (64K), 2.2 us (16K).  Not where the attention reads whole K rows (a row
# layout, attention.WIDEN_ROWS): there SPARSE_CONFIG's tiles were 4.5 / 4.5 us faster at 64K (h200_variants_s13n)
ATTN_WIDE_MIN_D = 17
ATTN_WIDE_MIN_ROWS = 64
ATTN_WIDE_CONFIG = dict(block_n=128, num_stages=2)
# session 14: ATTN_WIDE_CONFIG also where the attention reads whole K rows (an option; see kernels/NOTES.md v16)
ATTN_WIDE_ROWS = False


def choose_path(forced: bool = False) -> str:
    """The bracket path: since session 4 (classify kernel, register band select) it is as fast as or faster than
    the fused path at batch 16 too, and faster at batch 1 (kernels/NOTES.md, v6).  Sinks / local window (forced)
    need it.  AUTO_PATH, when set, overrides the choice where nothing is forced."""
    if forced or AUTO_PATH is None:
        return "bracket"
    return AUTO_PATH


def loki_decode(q: torch.Tensor, P: torch.Tensor, k_lr: torch.Tensor, k_rest: torch.Tensor, v: torch.Tensor,
                lengths: torch.Tensor, k_budget, mode: str = "group", reduce: str = "max",
                scaling: float | None = None, strict: bool = True, path: str = "auto", k_max: int | None = None,
                return_indices: bool = False, num_splits: int | None = None,
                sink_tokens: int = 0, local_window: int = 0, out: torch.Tensor | None = None,
                fold_combine: bool | None = None, slab: torch.Tensor | None = None):
    """One Loki decode step for one layer.

    q: (B, H, D) queries (not rotated; q' = q @ P[kvh] is computed inside, in fp32).
    P: (KVH, D, D) orthonormal PCA bases (columns sorted by variance).  Cache: see kv_cache.py.
    k_budget: int or (B,) int tensor: number of tokens kept per sequence (clipped to 1..lengths[b]; with
    strict=True a budget above a length raises, which costs one device->host sync); or a float in (0, 1]: the
    fraction ceil(k_budget * lengths[b]) of each sequence, at least its forced (sink + local) count, computed
    inside the bracket path's kernels (`fraction_budget`: the same in torch, used by the other paths).
    mode / reduce: see `loki_scores`.  scaling: defaults to 1/sqrt(D).
    out: optional (B, H, D) output tensor (contiguous last dim).
    fold_combine (bracket path; default FOLD_COMBINE): the bracket programs zero one counter per score row and the
    last attention program of each row combines the split-K partials (one launch fewer).
    slab: a row layout's contiguous copy of k_lr (`kv_cache.allocate_cache_rows`), read by the scoring pass, while the
    attention reads k_lr / k_rest / v (views of whole rows); None: the scoring pass reads k_lr.
    Returns out (B, H, D) in the cache dtype, or (out, idx) with return_indices=True.
    """
    B, KVH, S, D, d = check_cache(k_lr, k_rest, v)
    k_sc = check_slab(slab, k_lr)  # what the scoring pass reads
    check_float(q, "q")
    check(q.dim() == 3 and q.shape[0] == B and q.shape[2] == D,
          f"q must be (B, H, D) with B={B}, D={D}, got {tuple(q.shape)}")
    check(q.shape[1] % KVH == 0, f"H={q.shape[1]} must be a multiple of KVH={KVH}")
    check_basis(P, KVH, D, k_lr.device)
    check_lengths(lengths, B, k_lr.device)
    check(mode in ("group", "head"), f"mode must be 'group' or 'head', got {mode!r}")
    if out is not None:  # (checked again by the attention launcher; here before the selection's launches)
        check_out(out, "out", tuple(q.shape), FLOAT_DTYPES, k_lr.device)
    check(path in PATHS, f"unknown path {path!r} (one of {', '.join(PATHS)})")
    frac = isinstance(k_budget, float)
    if frac:
        check_fraction(k_budget, "k_budget")
    if strict:
        check_lengths_range(lengths, S)
        if not frac:
            _budget_args(k_budget, lengths, B, True, k_max)
        else:
            check_fraction_k_max(k_budget, lengths, sink_tokens, local_window, k_max)
    if path == "auto":
        path = choose_path(forced=bool(sink_tokens or local_window))
    if frac and path != "bracket":
        if k_max is None:
            k_max = fraction_k_max(k_budget, S, sink_tokens, local_window)
        k_budget = fraction_budget(k_budget, lengths, sink_tokens, local_window)
    if (sink_tokens or local_window) and path != "bracket":  # ("auto" resolved above)
        raise LokiInputError(f"sink_tokens/local_window need path='bracket' (got path={path!r})")
    counters = ready = attn_cfg = None
    if path == "bracket":
        R = q.shape[1] if mode == "head" else KVH
        whole_rows = attn_mod.WIDEN_ROWS and rows_continue(k_lr, k_rest)
        lowrank_d = max(ATTN_LOWRANK_D, ATTN_LOWRANK_ROWS_D) if whole_rows and not ATTN_WIDE_ROWS else ATTN_LOWRANK_D
        if lowrank_d and d <= lowrank_d and S >= ATTN_LOWRANK_MIN_S and B * R >= ATTN_LOWRANK_MIN_ROWS:
            attn_cfg = dict(waves=ATTN_LOWRANK_WAVES)
        elif (ATTN_WIDE_MIN_D and d >= ATTN_WIDE_MIN_D and B * R >= ATTN_WIDE_MIN_ROWS
              and (ATTN_WIDE_ROWS or not whole_rows)):
            attn_cfg = dict(ATTN_WIDE_CONFIG)
        if FOLD_COMBINE if fold_combine is None else fold_combine:
            counters = torch.empty(B * R, dtype=torch.int32, device=q.device)
        ws = None
        if ATTN_EARLY and bracket_mod.BRACKET_CLASSIFY == "split":  # (the band select runs last: split only)
            ws = torch.empty(bracket_workspace_size(B, R, S), dtype=torch.int32, device=q.device)
            ready = bracket_ready(ws, B, R)
        idx, q_rot = loki_select_bracket(q, k_sc, lengths, k_budget, P=P, mode=mode, reduce=reduce, scaling=scaling,
                                         strict=False, k_max=k_max, sink_tokens=sink_tokens,
                                         local_window=local_window, attn_counters=counters, workspace=ws,
                                         pdl=ready is not None)
    elif path == "fused":
        idx, q_rot = loki_select(q, k_sc, lengths, k_budget, P=P, mode=mode, reduce=reduce, scaling=scaling,
                                 strict=False, k_max=k_max)
    else:
        q_rot = rotate_q(q, P)
        scores = loki_scores(q_rot, k_sc, lengths, d=d, mode=mode, reduce=reduce, scaling=scaling, strict=False)
        if path == "split":
            idx = topk_select(scores, lengths, k_budget, strict=False, k_max=k_max)
        else:
            check(isinstance(k_budget, int) and not isinstance(k_budget, bool) and k_budget >= 1,
                  f"path='torch_topk' needs an int budget >= 1, got {k_budget!r}")
            kk = min(k_budget, S)
            vals, idx = torch.topk(scores, kk, dim=-1, sorted=False)
            idx = torch.where(torch.isinf(vals), torch.full_like(idx, -1), idx)
    out = sparse_decode_attention(q_rot, k_lr, k_rest, v, idx, scaling=scaling, num_splits=num_splits, out=out,
                                  counters=counters, ready=ready, pdl=ready is not None, config=attn_cfg,
                                  strict=False)  # (its own selection: in range and distinct)
    return (out, idx) if return_indices else out
