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

from ._utils import LokiInputError, check, check_cache, check_float, check_lengths
from . import attention as attn_mod
from .attention import rows_continue, sparse_decode_attention
from . import bracket as bracket_mod
from .kv_cache import check_slab
from .bracket import (bracket_ready, bracket_workspace_size, fraction_budget, fraction_k_max,
                      loki_select_bracket)
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
# session 15, bracket path (an option, 0 = off): the batch cut into this many chunks of sequences, q rotated once,
# then the bandwidth-bound passes on the caller's stream (every chunk's scoring pass, then every chunk's attention)
# and the latency-bound selection (classify + band select) of each chunk on a stream of priority STREAM_PRIORITY
# (-1: high), each chunk's selection after its scoring pass and before its attention.  The block scheduler then
# dispatches the selection's programs first as SM slots free up, beside the next chunk's bandwidth-bound pass.  No
# PDL across the streams (no rotation PDL, no scoring flow, no early attention start).  On CPU tensors the same
# launches run in order on one stream (for the interpreter tests)
STREAM_CHUNKS = 0
STREAM_PRIORITY = -1
_SIDE_STREAMS: dict = {}


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
    check_lengths(lengths, B, k_lr.device)
    check(mode in ("group", "head"), f"mode must be 'group' or 'head', got {mode!r}")
    check(path in PATHS, f"unknown path {path!r} (one of {', '.join(PATHS)})")
    frac = isinstance(k_budget, float)
    if frac:
        check(0.0 < k_budget <= 1.0, f"k_budget as a float is a fraction of each sequence, in (0, 1]; got {k_budget}")
    if strict:
        check(bool((lengths <= S).all()), f"lengths exceed S_max={S}")
        if not frac:
            _budget_args(k_budget, lengths, B, True, k_max)
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
        if ATTN_LOWRANK_D and d <= ATTN_LOWRANK_D and S >= ATTN_LOWRANK_MIN_S and B * R >= ATTN_LOWRANK_MIN_ROWS:
            attn_cfg = dict(waves=ATTN_LOWRANK_WAVES)
        elif (ATTN_WIDE_MIN_D and d >= ATTN_WIDE_MIN_D and B * R >= ATTN_WIDE_MIN_ROWS
              and (ATTN_WIDE_ROWS or not (attn_mod.WIDEN_ROWS and rows_continue(k_lr, k_rest)))):
            attn_cfg = dict(ATTN_WIDE_CONFIG)
        if FOLD_COMBINE if fold_combine is None else fold_combine:
            counters = torch.empty(B * R, dtype=torch.int32, device=q.device)
        if STREAM_CHUNKS > 1 and B > 1:
            return _bracket_chunked(q, P, k_sc, k_lr, k_rest, v, lengths, k_budget, mode, reduce, scaling, k_max,
                                    num_splits, sink_tokens, local_window, out, counters is not None, attn_cfg,
                                    return_indices)
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
        scores = loki_scores(q_rot, k_sc, lengths, d=d, mode=mode, reduce=reduce, scaling=scaling)
        if path == "split":
            idx = topk_select(scores, lengths, k_budget, strict=False, k_max=k_max)
        else:
            check(isinstance(k_budget, int), "path='torch_topk' needs an int budget")
            kk = min(k_budget, S)
            vals, idx = torch.topk(scores, kk, dim=-1, sorted=False)
            idx = torch.where(torch.isinf(vals), torch.full_like(idx, -1), idx)
    out = sparse_decode_attention(q_rot, k_lr, k_rest, v, idx, scaling=scaling, num_splits=num_splits, out=out,
                                  counters=counters, ready=ready, pdl=ready is not None, config=attn_cfg)
    return (out, idx) if return_indices else out


def _side_stream(device: torch.device):
    key = (device.index, STREAM_PRIORITY)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=device, priority=STREAM_PRIORITY)
    return _SIDE_STREAMS[key]


def _bracket_chunked(q, P, k_sc, k_lr, k_rest, v, lengths, k_budget, mode, reduce, scaling, k_max, num_splits,
                     sink_tokens, local_window, out, fold, attn_cfg, return_indices):
    """The bracket path in STREAM_CHUNKS chunks of sequences on two streams (see STREAM_CHUNKS)."""
    B, H, D = q.shape
    n = min(STREAM_CHUNKS, B)
    bounds = [(B * i // n, B * (i + 1) // n) for i in range(n)]
    R = H if mode == "head" else P.shape[0]
    S = k_lr.shape[2]
    cuda = q.is_cuda
    main = torch.cuda.current_stream(q.device) if cuda else None
    side = _side_stream(q.device) if cuda else None
    q_rot = rotate_q(q, P)
    if out is None:
        out = torch.empty(B, H, D, dtype=v.dtype, device=q.device)
    if side is not None:
        side.wait_stream(main)
    args = []
    for b0, b1 in bounds:  # every chunk's scoring pass (and its bracket programs) on the caller's stream
        kb = k_budget[b0:b1] if isinstance(k_budget, torch.Tensor) else k_budget
        ws = torch.empty(bracket_workspace_size(b1 - b0, R, S), dtype=torch.int32, device=q.device)
        ctr = torch.empty((b1 - b0) * R, dtype=torch.int32, device=q.device) if fold else None
        kw = dict(mode=mode, reduce=reduce, scaling=scaling, strict=False, k_max=k_max, sink_tokens=sink_tokens,
                  local_window=local_window, attn_counters=ctr, workspace=ws)
        a = (q_rot[b0:b1], k_sc[b0:b1], lengths[b0:b1], kb)
        idx, _ = loki_select_bracket(*a, stages=2, **kw)
        ev = None
        if side is not None:
            ev = torch.cuda.Event()
            ev.record(main)
        args.append((a, kw, idx, ctr, ev))
    done = []
    for a, kw, idx, ctr, ev in args:  # each chunk's classify + band select on the high-priority stream
        if side is None:
            loki_select_bracket(*a, first_stage=3, idx_out=idx, **kw)
            done.append(None)
            continue
        side.wait_event(ev)
        with torch.cuda.stream(side):
            loki_select_bracket(*a, first_stage=3, idx_out=idx, **kw)
            ev2 = torch.cuda.Event()
            ev2.record(side)
        done.append(ev2)
    for (b0, b1), (a, kw, idx, ctr, ev), ev2 in zip(bounds, args, done):  # each chunk's attention, caller's stream
        if ev2 is not None:
            main.wait_event(ev2)
        sparse_decode_attention(q_rot[b0:b1], k_lr[b0:b1], k_rest[b0:b1], v[b0:b1], idx, scaling=scaling,
                                num_splits=num_splits, out=out[b0:b1], counters=ctr, config=attn_cfg)
    if side is not None:
        main.wait_stream(side)
    if return_indices:
        kmax = max(x[2].shape[2] for x in args)
        idx = torch.full((B, R, kmax), -1, dtype=torch.int32, device=q.device)
        for (b0, b1), x in zip(bounds, args):
            idx[b0:b1, :, :x[2].shape[2]] = x[2]
        return out, idx
    return out
