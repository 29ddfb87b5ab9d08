"""Flash-decoding over the rotated cache: sparse (selected rows only) and dense (all valid rows).

One kernel serves both.  A program owns one (sequence, score row) pair and a contiguous chunk of its tokens
(split-K, "flash-decoding"); it loads the g query heads that share the row's selection (padded to 16 rows for
tensor-core dots), gathers BLOCK_N selected K rows (k_lr | k_rest) and V rows once for all of them, and keeps
an fp32 online softmax.  With more than one split, partial (max, sum, acc) go to an fp32 workspace and a
combine kernel reduces them, or, given zeroed per-row counters (``counters=``, the bracket path), the last program
of each row to finish does (one launch fewer).  q . k is computed as q'[:d] . k_lr + q'[d:] . k_rest (q' = q @ P,
exact).

16-bit caches: the sparse kernel rounds q' and the probabilities to the cache dtype, one tensor-core dot each with
fp32 accumulation, as SDPA and FlashAttention do (config hilo=False, the sparse default since session 10); with
hilo=True (the dense kernel's default) both are split into two 16-bit halves (x = hi + lo), so the dots keep ~fp32
accuracy at twice the tensor-core work.  fp32 caches use IEEE fp32 dots.  The selection is unaffected: the scoring
kernels keep their ~fp32 dots.  The sparse loop loads each tile's indices one iteration ahead of its gathers (config ahead=True, int32
indices; session 8), so an iteration waits for one memory round trip, not two.

Early start (``ready=``, session 11; the bracket path's default, kernels.loki.ATTN_EARLY): the kernel reads each
row's bracket record and attends first to the tiles among the row's first #above indices, which the classify kernel
has already written, then waits for the band select (``pdl``: launched with programmatic dependent launch, the band
select triggers it, `gdc_wait` before the rest) and attends to the rest.  Program sp then takes tiles sp, sp + NSPLIT,
... instead of a contiguous range, so every program has its share of the early tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (BRACKET_RECORD, check, check_cache, check_float, check_last_contiguous, check_lengths,
                     check_lengths_range, check_out, default_scaling, is_interpreter, next_pow2, num_sms,
                     pdl_available, pdl_wait, FLOAT_DTYPES, INDEX_DTYPES, LokiInputError)
from .scores import _split_hi_lo

LOG2E = 1.4426950408889634


@triton.jit
def _flash_decode_kernel(q_ptr, sq_b, sq_h,
                         klr_ptr, slr_b, slr_h, slr_s, krs_ptr, srs_b, srs_h, srs_s, v_ptr, sv_b, sv_h, sv_s,
                         idx_ptr, si_b, si_r, len_ptr,
                         o_ptr, so_b, so_h, mp_ptr, lp_ptr, op_ptr, cnt_ptr, rdy_ptr,
                         qk_scale, R, G, N_ITEMS, TPS, H, NSPLIT,
                         DENSE: tl.constexpr, SPLIT: tl.constexpr, FOLD: tl.constexpr, NS_PAD: tl.constexpr,
                         FOLD_VEC: tl.constexpr, HPR_P2: tl.constexpr, HPR: tl.constexpr, G_PAD: tl.constexpr,
                         D: tl.constexpr, D_LR: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K_FP32: tl.constexpr,
                         HAS_REST: tl.constexpr, AHEAD: tl.constexpr, HILO: tl.constexpr, EVICT: tl.constexpr = False,
                         EARLY: tl.constexpr = False, PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = (pid // R).to(tl.int64)
    r = (pid % R).to(tl.int64)
    h0 = r * HPR
    kvh = h0 // G
    if DENSE:
        n = tl.minimum(tl.load(len_ptr + b).to(tl.int32), N_ITEMS)
    else:
        n = N_ITEMS
    tile_lo = sp * TPS
    tile_hi = tl.minimum(tile_lo + TPS, tl.cdiv(n, BLOCK_N))

    hh = tl.arange(0, G_PAD)
    hv = hh < HPR
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    dd = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + b * sq_b + (h0 + hh) * sq_h
    q_lr = tl.load(q_rows[:, None] + dl[None, :], mask=hv[:, None] & (dl < D_LR)[None, :], other=0.0)
    q_lr = q_lr.to(tl.float32) * qk_scale
    q_lr_hi, q_lr_lo = _split_hi_lo(q_lr, klr_ptr.dtype.element_ty)
    if HAS_REST:
        q_rs = tl.load(q_rows[:, None] + D_LR + dr[None, :], mask=hv[:, None] & (dr < D - D_LR)[None, :], other=0.0)
        q_rs = q_rs.to(tl.float32) * qk_scale
        q_rs_hi, q_rs_lo = _split_hi_lo(q_rs, krs_ptr.dtype.element_ty)
    else:
        q_rs, q_rs_hi, q_rs_lo = q_lr, q_lr_hi, q_lr_lo  # (unused)

    kl_base = klr_ptr + b * slr_b + kvh * slr_h
    kr_base = krs_ptr + b * srs_b + kvh * srs_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    i_base = idx_ptr + b * si_b + r * si_r

    m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    if AHEAD:
        # session 8 (the default): each tile's indices are loaded (plain loads) one iteration before its gathers, so
        # an iteration waits for one memory round trip (the gathers) instead of two (indices, then gathers).  At 2
        # stages Triton still drains its copies every iteration (async_wait num=0) with one K/V buffer (51 KB of
        # shared memory, 3 programs per SM); 3 stages give num=3 but two buffers (88 KB, 2 programs per SM) and
        # measured 25-40% slower (kernels/NOTES.md v10).
        if EARLY:
            # session 11: the program takes every NSPLIT-th tile (sp, sp + NSPLIT, ...), so that every program has
            # its share of the row's first `ready` indices (its keys above the bracket, final once the classify
            # kernel has run); it attends to those tiles first, then waits for the band select (PDL: the kernel
            # before this one, which let it start early) and attends to the rest
            rdy = rdy_ptr + pid * BRACKET_RECORD  # (per row: lo, hi, #above, #band, budget, ...)
            c_gt = tl.load(rdy + 2)
            c_band = tl.load(rdy + 3)
            kbud = tl.load(rdy + 4)
            ready = tl.where((c_gt <= kbud) & (kbud <= c_gt + c_band), c_gt, 0)
            j_hi = tl.cdiv(tl.cdiv(n, BLOCK_N) - sp, NSPLIT)
            j_mid = tl.minimum(tl.maximum(tl.cdiv(ready // BLOCK_N - sp, NSPLIT), 0), j_hi)
            m_i, l_i, acc = _sparse_tiles(0, j_mid, sp, NSPLIT, n, i_base, kl_base, slr_s, kr_base, srs_s, v_base,
                                          sv_s, m_i, l_i, acc, q_lr, q_lr_hi, q_lr_lo, q_rs, q_rs_hi, q_rs_lo, D,
                                          D_LR, BLOCK_DL, BLOCK_DR, BLOCK_D, BLOCK_N, K_FP32, HAS_REST, HILO, EVICT)
            pdl_wait(PDL)
            # (the rest's first indices are loaded again here: the load ahead in the loop above may have read them
            # before the band select wrote them)
            m_i, l_i, acc = _sparse_tiles(j_mid, j_hi, sp, NSPLIT, n, i_base, kl_base, slr_s, kr_base, srs_s, v_base,
                                          sv_s, m_i, l_i, acc, q_lr, q_lr_hi, q_lr_lo, q_rs, q_rs_hi, q_rs_lo, D,
                                          D_LR, BLOCK_DL, BLOCK_DR, BLOCK_D, BLOCK_N, K_FP32, HAS_REST, HILO, EVICT)
        else:
            m_i, l_i, acc = _sparse_tiles(tile_lo, tile_hi, 0, 1, tl.minimum(tile_hi * BLOCK_N, n), i_base, kl_base,
                                          slr_s, kr_base, srs_s, v_base, sv_s, m_i, l_i, acc, q_lr, q_lr_hi, q_lr_lo,
                                          q_rs, q_rs_hi, q_rs_lo, D, D_LR, BLOCK_DL, BLOCK_DR, BLOCK_D, BLOCK_N,
                                          K_FP32, HAS_REST, HILO, EVICT)
    else:
        for t in range(tile_lo, tile_hi):
            offs = t * BLOCK_N + tl.arange(0, BLOCK_N)
            if DENSE:
                tok, valid = offs, offs < n
            else:
                tok, valid = _sparse_tokens(tl.load(i_base + offs, mask=offs < n, other=-1))
            kl, kr, vv = _gather_rows(tok, valid, kl_base, slr_s, kr_base, srs_s, v_base, sv_s, D, D_LR, BLOCK_DL,
                                      BLOCK_DR, BLOCK_D, HAS_REST, EVICT)
            m_i, l_i, acc = _attend_tile(kl, kr, vv, valid, m_i, l_i, acc, q_lr, q_lr_hi, q_lr_lo, q_rs, q_rs_hi,
                                         q_rs_lo, K_FP32, HAS_REST, v_ptr.dtype.element_ty, HILO)

    heads = b * H + h0 + hh
    if SPLIT:
        tl.store(mp_ptr + heads * NSPLIT + sp, m_i, mask=hv)
        tl.store(lp_ptr + heads * NSPLIT + sp, l_i, mask=hv)
        tl.store(op_ptr + (heads * NSPLIT + sp)[:, None] * D + dd[None, :], acc, mask=hv[:, None] & (dd < D)[None, :])
        if FOLD:  # the row's last program to finish combines its splits (no combine launch)
            tl.debug_barrier()  # every thread's partials are stored before the release below
            done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if done == NSPLIT - 1:
                if FOLD_VEC:  # all heads of the row at once: one round trip
                    _combine_heads(mp_ptr, lp_ptr, op_ptr, o_ptr + b * so_b + h0 * so_h, so_h, b * H + h0, HPR,
                                   NSPLIT, HPR_P2, NS_PAD, D, BLOCK_D)
                else:
                    for i in range(HPR):
                        _combine_head(mp_ptr, lp_ptr, op_ptr, o_ptr + b * so_b + (h0 + i) * so_h, b * H + h0 + i,
                                      NSPLIT, NS_PAD, D, BLOCK_D, True)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + (h0 + hh)[:, None] * so_h + dd[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=hv[:, None] & (dd < D)[None, :])


@triton.jit
def _sparse_tiles(j_lo, j_hi, t0, step, lim, i_base, kl_base, slr_s, kr_base, srs_s, v_base, sv_s, m_i, l_i, acc,
                  q_lr, q_lr_hi, q_lr_lo, q_rs, q_rs_hi, q_rs_lo, D: tl.constexpr, D_LR: tl.constexpr,
                  BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  K_FP32: tl.constexpr, HAS_REST: tl.constexpr, HILO: tl.constexpr, EVICT: tl.constexpr):
    """The indices-ahead loop (session 8): online softmax over the selected rows of tiles t0 + j * step of the index
    list (j_lo <= j < j_hi; positions >= lim are padding; contiguous tiles: t0 = 0, step = 1, which fold away at
    compile time), each tile's indices loaded one iteration before its gathers.  Returns the new (m, l, acc)."""
    ar = tl.arange(0, BLOCK_N)
    tok_n = tl.load(i_base + (t0 + j_lo * step) * BLOCK_N + ar, mask=(t0 + j_lo * step) * BLOCK_N + ar < lim, other=-1)
    for j in range(j_lo, j_hi):
        tok, valid = _sparse_tokens(tok_n)
        tok_n = tl.load(i_base + (t0 + (j + 1) * step) * BLOCK_N + ar, mask=(t0 + (j + 1) * step) * BLOCK_N + ar < lim,
                        other=-1)
        kl, kr, vv = _gather_rows(tok, valid, kl_base, slr_s, kr_base, srs_s, v_base, sv_s, D, D_LR, BLOCK_DL,
                                  BLOCK_DR, BLOCK_D, HAS_REST, EVICT)
        m_i, l_i, acc = _attend_tile(kl, kr, vv, valid, m_i, l_i, acc, q_lr, q_lr_hi, q_lr_lo, q_rs, q_rs_hi,
                                     q_rs_lo, K_FP32, HAS_REST, v_base.dtype.element_ty, HILO)
    return m_i, l_i, acc


@triton.jit
def _gather_rows(tok, valid, kl_base, slr_s, kr_base, srs_s, v_base, sv_s, D: tl.constexpr, D_LR: tl.constexpr,
                 BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_D: tl.constexpr, HAS_REST: tl.constexpr,
                 EVICT: tl.constexpr):
    """The K (k_lr | k_rest) and V rows of tokens `tok` (zeros where not `valid`); EVICT (SPARSE_CONFIG["evict"]):
    read evict_first (rows read once)."""
    tok = tok.to(tl.int64)
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    dd = tl.arange(0, BLOCK_D)
    if EVICT:
        kl = tl.load(kl_base + tok[:, None] * slr_s + dl[None, :], mask=valid[:, None] & (dl < D_LR)[None, :],
                     other=0.0, eviction_policy="evict_first")
        vv = tl.load(v_base + tok[:, None] * sv_s + dd[None, :], mask=valid[:, None] & (dd < D)[None, :], other=0.0,
                     eviction_policy="evict_first")
    else:
        kl = tl.load(kl_base + tok[:, None] * slr_s + dl[None, :], mask=valid[:, None] & (dl < D_LR)[None, :],
                     other=0.0)
        vv = tl.load(v_base + tok[:, None] * sv_s + dd[None, :], mask=valid[:, None] & (dd < D)[None, :], other=0.0)
    if HAS_REST:
        if EVICT:
            kr = tl.load(kr_base + tok[:, None] * srs_s + dr[None, :], mask=valid[:, None] & (dr < D - D_LR)[None, :],
                         other=0.0, eviction_policy="evict_first")
        else:
            kr = tl.load(kr_base + tok[:, None] * srs_s + dr[None, :], mask=valid[:, None] & (dr < D - D_LR)[None, :],
                         other=0.0)
    else:
        kr = kl
    return kl, kr, vv


@triton.jit
def _sparse_tokens(tok):
    """(token, valid) of a tile of selected indices (negative: padding)."""
    valid = tok >= 0
    return tl.where(valid, tok, 0), valid


@triton.jit
def _attend_tile(kl, kr, vv, valid, m_i, l_i, acc, q_lr, q_lr_hi, q_lr_lo, q_rs, q_rs_hi, q_rs_lo,
                 K_FP32: tl.constexpr, HAS_REST: tl.constexpr, V_DTYPE: tl.constexpr, HILO: tl.constexpr):
    """One online-softmax step over a tile of K/V rows (q pre-scaled by scale * log2(e)); new (m, l, acc).
    16-bit caches: HILO, q' and p as two 16-bit halves (~fp32 dots); else rounded to the cache dtype, one dot each
    (as SDPA / FlashAttention do)."""
    if K_FP32:
        s = tl.dot(q_lr, tl.trans(kl.to(tl.float32)), input_precision="ieee")
        if HAS_REST:
            s = tl.dot(q_rs, tl.trans(kr.to(tl.float32)), s, input_precision="ieee")
    else:
        klt = tl.trans(kl)
        s = tl.dot(q_lr_hi, klt)
        if HILO:
            s = tl.dot(q_lr_lo, klt, s)
        if HAS_REST:
            krt = tl.trans(kr)
            s = tl.dot(q_rs_hi, krt, s)
            if HILO:
                s = tl.dot(q_rs_lo, krt, s)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if K_FP32:
        acc = tl.dot(p, vv.to(tl.float32), acc, input_precision="ieee")
    else:
        p_hi, p_lo = _split_hi_lo(p, V_DTYPE)
        acc = tl.dot(p_hi, vv, acc)
        if HILO:
            acc = tl.dot(p_lo, vv, acc)
    return m_new, l_i, acc


@triton.jit
def _combine_head(mp_ptr, lp_ptr, op_ptr, o_head, hd, NSPLIT, NS_PAD: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BYPASS_L1: tl.constexpr):
    """o_head[:D] = the softmax-weighted combination of head hd's NSPLIT partials (m, l, acc)."""
    s = tl.arange(0, NS_PAD)
    sm = s < NSPLIT
    dd = tl.arange(0, BLOCK_D)
    amask = sm[:, None] & (dd < D)[None, :]
    # BYPASS_L1: written by other programs of the same kernel: read through L2 (".cg"), not a possibly stale L1 line
    m = tl.load(mp_ptr + hd * NSPLIT + s, mask=sm, other=-1.0e30, cache_modifier=".cg" if BYPASS_L1 else "")
    l = tl.load(lp_ptr + hd * NSPLIT + s, mask=sm, other=0.0, cache_modifier=".cg" if BYPASS_L1 else "")
    acc = tl.load(op_ptr + (hd * NSPLIT + s)[:, None] * D + dd[None, :], mask=amask, other=0.0,
                  cache_modifier=".cg" if BYPASS_L1 else "")
    mx = tl.max(m, axis=0)
    w = tl.where(sm, tl.exp2(m - mx), 0.0)
    L = tl.sum(w * l, axis=0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(L > 0, L, 1.0)
    tl.store(o_head + dd, o.to(o_head.dtype.element_ty), mask=dd < D)


@triton.jit
def _combine_heads(mp_ptr, lp_ptr, op_ptr, o_row, so_h, hd0, HPR, NSPLIT, HPR_P2: tl.constexpr, NS_PAD: tl.constexpr,
                   D: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_combine_head` for heads hd0 .. hd0 + HPR - 1 at once (outputs at o_row + i * so_h), read through L2."""
    hr = tl.arange(0, HPR_P2)
    s = tl.arange(0, NS_PAD)
    dd = tl.arange(0, BLOCK_D)
    hs = (hd0 + hr)[:, None] * NSPLIT + s[None, :]
    msk = (hr < HPR)[:, None] & (s < NSPLIT)[None, :]
    m = tl.load(mp_ptr + hs, mask=msk, other=-1.0e30, cache_modifier=".cg")
    l = tl.load(lp_ptr + hs, mask=msk, other=0.0, cache_modifier=".cg")
    acc = tl.load(op_ptr + hs[:, :, None] * D + dd[None, None, :], mask=msk[:, :, None] & (dd < D)[None, None, :],
                  other=0.0, cache_modifier=".cg")
    mx = tl.max(m, axis=1)
    w = tl.where(msk, tl.exp2(m - mx[:, None]), 0.0)
    L = tl.sum(w * l, axis=1)
    o = tl.sum(w[:, :, None] * acc, axis=1) / tl.where(L > 0, L, 1.0)[:, None]
    tl.store(o_row + hr[:, None] * so_h + dd[None, :], o.to(o_row.dtype.element_ty),
             mask=(hr < HPR)[:, None] & (dd < D)[None, :])


@triton.jit
def _combine_kernel(mp_ptr, lp_ptr, op_ptr, o_ptr, so_b, so_h, H, NSPLIT,
                    NS_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    _combine_head(mp_ptr, lp_ptr, op_ptr, o_ptr + (pid // H) * so_b + (pid % H) * so_h, pid, NSPLIT, NS_PAD, D,
                  BLOCK_D, False)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
# GPU defaults (H200-tuned in kernels/NOTES.md); (BLOCK_N, num_warps, num_stages, waves)
# session 8: ahead (indices one tile ahead of their gathers) at 2 stages (was 3 without).  Session 10: hilo=False (q'
# and p rounded to bf16 / fp16, one tensor-core dot each, as SDPA and FlashAttention; hilo=True splits each fp32
# operand in two 16-bit halves, ~fp32 dots) at 3 stages and one wave: the ahead loop then keeps two tiles in flight
# (Triton 3.9's IR: async_wait num=3; 81 KB of shared memory, 2 programs per SM).  The attention alone: 1-4% faster
# than hilo=False at 2 stages (bench_results/h200_attn_probe_s10b), 6-10% faster than session 8's default in its own
# probe (h200_attn_probe_s8c); outputs within 3e-3 (relative) of the hilo path.  Optional: evict (gathers read
# evict_first), maxnreg (a register cap)
SPARSE_CONFIG = dict(block_n=64, num_warps=4, num_stages=3, waves=1, ahead=True, hilo=False)
FOLD_VECTOR_MAX = 8192  # folded combine: all of a row's heads in one tile when HPR x splits x D fits, else a loop
DENSE_CONFIG = dict(block_n=128, num_warps=4, num_stages=3, waves=1, hilo=True)
# session 15: where a launch has few rows (B x KV heads, or B x heads in head mode, at most FEW_ROWS_FRACTION of the
# SMs: batch <= 8 at 8 KV heads on the H200) and no config is given, the split-K grid takes more, shorter programs.
# Measured (bench_results/h200_{dense_cfg,attn_b1,attn_rule}_probe_s15, rows layout): the dense kernel at batch 1 /
# 128K 180 -> 125 us (71% -> 101% of copy bandwidth; SDPA 124), batch 2 / 64K 201 -> 126, batch 4 / 64K 354 -> 248,
# batch 8 / 16K 155 -> 128, batch 1 / 4K-64K equal or faster; the sparse kernel (two waves) at batch 1 / 128K
# (k = 32768) 53.1 -> 40.5, batch 4 / 64K (k = 16384) 89.4 -> 71.7, batch 8 / 64K 151.8 -> 132.8, within +-0.6 us
# where it does not gain.  At batch 16 (128 rows) the defaults above stay: there the dense kernel is at 105-110%.
# FEW_ROWS_DENSE rounds q' and p to the cache dtype (one 16-bit dot each, as SDPA and the sparse kernel): with the
# split halves (hilo) the same grid is 10-30% slower at batches 2-8.  Not for the sparse kernel's early start (`ready`,
# inside loki_decode): there the two waves made the whole step 2.5-4 us slower at batch 1 although the attention alone
# was 0-11 us faster (h200_bench_s15f_full_rows against s15b)
FEW_ROWS_FRACTION = 0.5
FEW_ROWS_DENSE = dict(block_n=64, num_stages=2, waves=4, hilo=False)
FEW_ROWS_SPARSE = dict(waves=2)


# session 13: where k_rest continues k_lr's rows in memory (a row layout, `kv_cache.allocate_cache_rows`), the kernels
# read whole K rows as one tile (one gather and one dot per tile instead of two, no padding of D - d to a power of 2)
WIDEN_ROWS = True


def rows_continue(k_lr: torch.Tensor, k_rest: torch.Tensor) -> bool:
    """Whether k_rest[b, h, s] starts right where k_lr[b, h, s] ends, for every (b, h, s): the same (b, h, s) strides
    and k_rest's base d elements after k_lr's (then the D values from k_lr[b, h, s, 0] on are that token's K row)."""
    return (k_lr.dtype == k_rest.dtype and k_lr.device == k_rest.device and k_rest.shape[-1] > 0
            and k_lr.stride(-1) == 1 and k_rest.stride(-1) == 1 and k_lr.stride()[:3] == k_rest.stride()[:3]
            and k_rest.data_ptr() == k_lr.data_ptr() + k_lr.shape[-1] * k_lr.element_size())


def check_idx_values(idx: torch.Tensor, S: int) -> None:
    """A caller's selected positions (reads them on the host: one device sync; strict=True only): every non-negative
    entry below S_max, none repeated within a row (a repeated position would be attended to twice)."""
    bad = idx >= S
    if bool(bad.any()):
        b, r, j = (int(x) for x in bad.nonzero()[0])
        raise LokiInputError(f"idx[{b}, {r}, {j}] = {int(idx[b, r, j])} is not a cache position: positions must be "
                             f"< S_max={S} (negative entries are padding)")
    if idx.shape[-1] > 1:
        srt = idx.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            b, r, j = (int(x) for x in dup.nonzero()[0])
            raise LokiInputError(f"idx[{b}, {r}] selects position {int(srt[b, r, j + 1])} more than once: each row "
                                 f"must hold distinct positions (pad with -1)")


def _launch(q_rot, k_lr, k_rest, v, idx, lengths, scaling, dense: bool, num_splits, out, config, counters=None,
            ready=None, pdl=False, strict=False):
    B, KVH, S, D, d = check_cache(k_lr, k_rest, v)
    if WIDEN_ROWS and d < D and rows_continue(k_lr, k_rest):  # whole rows: one (B, KVH, S, D) view, d = D
        k_lr = k_lr.as_strided((B, KVH, S, D), k_lr.stride())
        k_rest, d = k_lr[..., D:], D
    check_float(q_rot, "q_rot")
    check(q_rot.dim() == 3 and q_rot.shape[0] == B and q_rot.shape[2] == D,
          f"q_rot must be (B, H, D) with B={B}, D={D}, got {tuple(q_rot.shape)}")
    check_last_contiguous(q_rot, "q_rot")
    check(q_rot.device == k_lr.device, f"q_rot is on {q_rot.device}, cache on {k_lr.device}")
    H = q_rot.shape[1]
    check(H % KVH == 0, f"H={H} must be a multiple of KVH={KVH}")
    g = H // KVH
    if dense:
        check_lengths(lengths, B, k_lr.device)
        if strict:
            check_lengths_range(lengths, S)
        R, HPR, n_items = KVH, g, S
    else:
        check(isinstance(idx, torch.Tensor) and idx.dtype in INDEX_DTYPES,
              f"idx must be an int32/int64 tensor, got {getattr(idx, 'dtype', type(idx))}")
        check(idx.dim() == 3 and idx.shape[0] == B and idx.shape[1] in (KVH, H),
              f"idx must be (B, KVH, k) (group mode) or (B, H, k) (head mode), got {tuple(idx.shape)}")
        check_last_contiguous(idx, "idx")
        check(idx.device == k_lr.device, f"idx is on {idx.device}, cache on {k_lr.device}")
        if strict:
            check_idx_values(idx, S)
        R = idx.shape[1]
        HPR = g if R == KVH else 1
        n_items = idx.shape[2]
    scale = default_scaling(D, scaling) * LOG2E
    if out is None:
        out = torch.empty(B, H, D, dtype=v.dtype, device=v.device)
    else:
        check_out(out, "out", (B, H, D), FLOAT_DTYPES, v.device)
    interp = is_interpreter()
    cfg = dict(SPARSE_CONFIG if not dense else DENSE_CONFIG)
    if config:
        cfg.update(config)
    elif B * R <= FEW_ROWS_FRACTION * num_sms(k_lr.device) and (dense or ready is None):
        cfg.update(FEW_ROWS_DENSE if dense else FEW_ROWS_SPARSE)
    BLOCK_N = 16 if interp else cfg["block_n"]
    n_tiles = max(1, triton.cdiv(n_items, BLOCK_N))
    if num_splits is None:  # waves = 0: no split-K when the rows alone fill the GPU
        target = max(cfg["waves"], 1) * num_sms(k_lr.device)
        num_splits = min(n_tiles, max(1, triton.cdiv(target, B * R)))
        if cfg["waves"] == 0 and B * R >= num_sms(k_lr.device) * 0.9:
            num_splits = 1
    num_splits = max(1, min(int(num_splits), n_tiles))
    tps = triton.cdiv(n_tiles, num_splits)
    num_splits = triton.cdiv(n_tiles, tps)
    split = num_splits > 1
    fold = split and counters is not None
    if counters is not None:
        check(counters.dtype == torch.int32 and counters.is_contiguous() and counters.numel() >= B * R
              and counters.device == k_lr.device,
              f"counters must be a contiguous int32 tensor of >= {B * R} elements on {k_lr.device}")
    if split:
        mp = torch.empty(B * H * num_splits, dtype=torch.float32, device=v.device)
        lp = torch.empty_like(mp)
        op = torch.empty(B * H * num_splits * D, dtype=torch.float32, device=v.device)
    else:
        mp = lp = op = out
    idx_t = idx if not dense else lengths
    # the folded combine's tile sizes (fixed when not folding, so they add no compiled variants)
    ns_pad, hpr_p2 = (max(2, next_pow2(num_splits)), max(2, next_pow2(HPR))) if fold else (2, 2)
    has_rest = D > d
    # sparse loop: indices one tile ahead of the gathers (session 8).  int32 indices only: session 7's first version
    # of this loop did not compile for int64 indices on triton 3.6 (those take the loop of sessions 1-7)
    ahead = not dense and bool(cfg.get("ahead", False)) and idx.dtype == torch.int32
    # maxnreg (session 10): a register cap, e.g. 128 for 4 programs per SM instead of 3 (51 KB of shared memory each)
    extra = dict(maxnreg=int(cfg["maxnreg"])) if cfg.get("maxnreg") and not interp else {}
    # session 11: the rows' indices that are final before the kernel before this one ends (`ready`: the bracket
    # records, `bracket.bracket_ready`) are attended to first; with pdl (and PDL on this device) the kernel is
    # launched early (launch_pdl) and waits for its predecessor only before the rest (the indices-ahead loop only)
    early = ready is not None and ahead
    if ready is not None:
        rec = BRACKET_RECORD.value
        check(ready.dtype == torch.int32 and ready.is_contiguous() and ready.numel() >= B * R * rec
              and ready.device == k_lr.device,
              f"ready must be a contiguous int32 tensor of >= {B * R * rec} elements ({rec} per score row) on "
              f"{k_lr.device}")
    use_pdl = early and bool(pdl) and pdl_available(k_lr.device)
    if use_pdl:
        extra["launch_pdl"] = True
    _flash_decode_kernel[(B * R, num_splits)](
        q_rot, q_rot.stride(0), q_rot.stride(1),
        k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2),
        k_rest if has_rest else k_lr, k_rest.stride(0) if has_rest else 0, k_rest.stride(1) if has_rest else 0,
        k_rest.stride(2) if has_rest else 0,
        v, v.stride(0), v.stride(1), v.stride(2),
        idx_t, idx_t.stride(0) if not dense else 0, idx_t.stride(1) if not dense else 0,
        lengths if lengths is not None else idx_t,
        out, out.stride(0), out.stride(1), mp, lp, op, counters if fold else mp, ready if early else mp,
        scale, R, g, n_items, tps, H, num_splits,
        DENSE=dense, SPLIT=split, FOLD=fold, NS_PAD=ns_pad, HPR_P2=hpr_p2,
        FOLD_VEC=fold and hpr_p2 * ns_pad * max(16, next_pow2(D)) <= FOLD_VECTOR_MAX, HPR=HPR,
        G_PAD=max(16, next_pow2(HPR)), D=D, D_LR=d,
        BLOCK_DL=max(16, next_pow2(d)), BLOCK_DR=max(16, next_pow2(max(D - d, 1))), BLOCK_D=max(16, next_pow2(D)),
        BLOCK_N=BLOCK_N, K_FP32=v.dtype == torch.float32, HAS_REST=has_rest, AHEAD=ahead,
        HILO=bool(cfg.get("hilo", True)), EVICT=bool(cfg.get("evict", False)), EARLY=early, PDL=use_pdl,
        num_warps=4 if interp else cfg["num_warps"], num_stages=1 if interp else cfg["num_stages"], **extra)
    if split and not fold:
        _combine_kernel[(B * H,)](mp, lp, op, out, out.stride(0), out.stride(1), H, num_splits,
                                  NS_PAD=max(2, next_pow2(num_splits)), D=D, BLOCK_D=max(16, next_pow2(D)),
                                  num_warps=4)
    return out


def sparse_decode_attention(q_rot: torch.Tensor, k_lr: torch.Tensor, k_rest: torch.Tensor, v: torch.Tensor,
                            idx: torch.Tensor, scaling: float | None = None, num_splits: int | None = None,
                            out: torch.Tensor | None = None, config: dict | None = None,
                            counters: torch.Tensor | None = None, ready: torch.Tensor | None = None,
                            pdl: bool = False, strict: bool = True) -> torch.Tensor:
    """Exact softmax attention of the rotated queries over the selected cache rows only.

    q_rot: (B, H, D) (q' = q @ P, any float dtype).  idx: (B, KVH, k) in group mode (one selection per KV head,
    shared by its g query heads; each selected K/V row is read once for the group) or (B, H, k) in head mode;
    entries < 0 are padding.  Indices must be < S_max and distinct within a row, and should be < lengths[b]:
    strict=True (the default) checks the first two on the host (one device sync; `LokiInputError`); pass
    strict=False inside CUDA graphs and in decode loops (then an index >= S_max reads outside the cache, and a
    repeated one is attended to twice).
    scaling defaults to 1/sqrt(D).  Returns (B, H, D) in the cache dtype.  Rows without any selected token
    give zeros.  counters: an int32 tensor of >= B * idx.shape[1] zeros (the caller zeroes them, e.g. inside an
    earlier kernel): then the last program of each row to finish combines the split-K partials itself instead of
    a separate combine kernel (the counters are left non-zero).  ready (session 11): int32 records of 8 per score
    row (lo, hi, #above, #band, budget: `bracket.bracket_ready`): each program first attends to its tiles among the
    row's first #above indices (where #above <= budget <= #above + #band), then to the rest; pdl: launched with
    programmatic dependent launch after a kernel that triggers it (the band select), waiting for that kernel only
    before the rest.  Where PDL is not available the split is kept and nothing waits (stream order holds).
    """
    return _launch(q_rot, k_lr, k_rest, v, idx, None, scaling, False, num_splits, out, config, counters, ready, pdl,
                   strict)


def dense_decode_attention(q_rot: torch.Tensor, k_lr: torch.Tensor, k_rest: torch.Tensor, v: torch.Tensor,
                           lengths: torch.Tensor, scaling: float | None = None, num_splits: int | None = None,
                           out: torch.Tensor | None = None, config: dict | None = None,
                           strict: bool = True) -> torch.Tensor:
    """Flash-decoding over all valid tokens (positions < lengths[b]) of the rotated cache; (B, H, D).
    strict=True (the default) reads lengths on the host (one device sync) and refuses one outside 0..S_max; pass
    strict=False inside CUDA graphs and in decode loops (then lengths are clipped to S_max on the device)."""
    return _launch(q_rot, k_lr, k_rest, v, None, lengths, scaling, True, num_splits, out, config, strict=strict)


# ----------------------------------------------------------------------------------------------------------
# references (float64)
# ----------------------------------------------------------------------------------------------------------
def sparse_attention_ref(q_rot, k_lr, k_rest, v, idx, scaling=None):
    B, H, D = q_rot.shape
    KVH = k_lr.shape[1]
    g = H // KVH
    scale = default_scaling(D, scaling)
    K = torch.cat([k_lr, k_rest], dim=-1).double()
    V = v.double()
    out = torch.zeros(B, H, D, dtype=torch.float64, device=q_rot.device)
    for b in range(B):
        for h in range(H):
            row = h // g if idx.shape[1] == KVH else h
            sel = idx[b, row]
            sel = sel[sel >= 0].long()
            if sel.numel() == 0:
                continue
            kk = K[b, h // g, sel]
            s = scale * (kk @ q_rot[b, h].double())
            out[b, h] = torch.softmax(s, dim=0) @ V[b, h // g, sel]
    return out


def dense_attention_ref(q_rot, k_lr, k_rest, v, lengths, scaling=None):
    B = q_rot.shape[0]
    KVH = k_lr.shape[1]
    idx = torch.full((B, KVH, k_lr.shape[2]), -1, dtype=torch.int64, device=k_lr.device)
    for b in range(B):
        n = int(lengths[b])
        idx[b, :, :n] = torch.arange(n, device=k_lr.device)
    return sparse_attention_ref(q_rot, k_lr, k_rest, v, idx, scaling)
