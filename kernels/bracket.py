"""Loki's front half (rotate q, approximate scores, exact top-k), each step spread over the programs it needs.

Four kernels (classify="split", overlap=True: the defaults, session 5):

1. ``scores._rotate_q_kernel`` (one program per (sequence, KV head, 16 output columns)): q' = q @ P[kvh] in fp32
   FMAs, written in full for the attention kernel.
2. ``_bracket_scores_kernel`` (grid (rows, tiles + 1)).  Column 0 of the grid, dispatched first, holds one
   program per score row (``_bracket_row``): it scores SAMPLE evenly spaced tokens of the row, sorts them
   (``tl.sort``) and keeps two order-preserving uint32 keys lo <= hi whose sample ranks bracket rank k*SAMPLE/n by
   +- NSIG binomial standard deviations (rows shorter than 4*SAMPLE, or whose budget covers the row, get the whole
   key range), and zeroes the row's counters.  The other programs (many per row, like ``loki_scores``) score
   every tile of tokens against the low-rank slab (the pass that reads d/D of K), force sink / local-window
   positions to +inf and write every key to the row's key workspace.  The brackets' latency (a sort per row)
   hides under that bandwidth-bound pass instead of preceding it.
3. ``_bracket_classify_vec_kernel`` (many programs per row; ``_bracket_classify_kernel`` until session 10): key > hi
   is selected outright (written to the output through a block prefix sum and one relaxed atomic per block),
   lo <= key <= hi goes to the row's band workspace (key and position).
4. ``_bracket_finish_kernel`` (one program per row): if #(> hi) <= k <= #(> hi) + #band, the remaining
   k - #(> hi) come from the band only (13-20% of the row): bands of up to BAND_REG keys are held in registers
   (session 10: in three BAND_REG / 4 blocks where the expected band fits 3/4 of BAND_REG, `band_blocks`) and the
   k-th key is found bit by bit (``_select_in_registers``), larger ones take an exact MSD radix select
   (``topk._radix_select``).  Otherwise the bracket missed (rare: ~6e-5 per row at NSIG = 4) and the whole row's
   keys are radix-selected.  The result is exact either way; indices beyond a row's budget are -1.

flow (session 13, BRACKET_FLOW, where the rotation PDL is off): the scoring grid runs row after row, each of its
programs counting itself in its row's record, and the classify kernel is launched during the scoring pass
(programmatic dependent launch), each of its programs waiting for its row's count.

overlap=False (session 4): one kernel (one program per row) rotates q and writes the bracket before the scoring
kernel.  Budgets: an int, a (B,) tensor, or a float fraction of each sequence computed on the device
(``_budget_of``: no torch ops per call).

classify="fused" (session 2's variant, three kernels) classifies each key inside the scoring kernel instead of
writing it (steps 2 and 3 in one pass; the miss path then recomputes the row's keys).  Measured on the H200 the
split variant is as fast at 4K/16K and 5-10% faster at 32K/64K (kernels/NOTES.md, v6).

Compared with ``loki_select`` (one program per row does everything) this removes the serial full-row passes of
one program.  Index order within a row is unspecified (the atomics interleave blocks), and ties at the k-th
value are broken by band order, not by position.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (BRACKET_RECORD, SLAB_FP8, ceil_fraction, check, check_pow2, default_scaling, fraction_arg,
                     is_interpreter, next_pow2, pdl_available, pdl_trigger, pdl_wait)
from .scores import _load_q_lr_T, _q_operands, _rotate_heads, _row_of, _score_tile, launch_rotate_q, rot_chunks
from .topk import _bit_length, _bracket_of_sample, _key_of, _radix_select, check_select_inputs


# per score row: lo, hi, #above, #band (the two counters: one int64-aligned pair), the row's budget (session 11: read
# by the attention kernel's early start, `bracket_ready`), the row's count of finished scoring programs (session 13,
# BRACKET_FLOW), 2 unused
BR_STRIDE = BRACKET_RECORD
BR_INTS = BRACKET_RECORD.value
FLOW_SLOT = tl.constexpr(5)


@triton.jit
def _forced(sc, offs, n, SINK, LOCAL):
    """Sink tokens (offs < SINK) and the local window (offs >= n - LOCAL) score +inf: always selected."""
    force = (offs < SINK) | (offs >= n - LOCAL)
    return tl.where(force, float("inf"), sc)


@triton.jit
def _budget_of(len_ptr, kb_ptr, b, K_INT, FRAC_Q, FORCED, S_MAX, KMAX, KB_MODE: tl.constexpr):
    """(n, budget) of sequence b.  KB_MODE 0: K_INT; 1: kb_ptr[b]; 2: a fraction of the sequence, ceil(n * num / den)
    in int64 (FRAC_Q = num << 32 | den, `fraction_arg`), raised to the forced count min(n, FORCED).  Clipped to 1..n
    and KMAX."""
    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX), 0)
    if KB_MODE == 1:
        K = tl.load(kb_ptr + b).to(tl.int32)
    elif KB_MODE == 2:
        num = FRAC_Q.to(tl.int64) >> 32
        den = FRAC_Q.to(tl.int64) & 0xFFFFFFFF
        K = ((n.to(tl.int64) * num + den - 1) // den).to(tl.int32)
        K = tl.maximum(K, tl.minimum(n, FORCED))
    else:
        K = K_INT
    kb = tl.minimum(tl.minimum(tl.maximum(K, 1), n), KMAX)
    return n, kb


@triton.jit
def _bracket_row(pid, b, h0, kvh, n, kb, qrot_ptr, sqr_b, sqr_h, klr_ptr, slr_b, slr_h, slr_s, ws_ptr, br_ptr,
                 ac_ptr, scale, nsig, SINK, LOCAL, WS_ROW, ZERO_AC: tl.constexpr, HPR: tl.constexpr,
                 G_PAD: tl.constexpr, D_LR: tl.constexpr, BLOCK_DL: tl.constexpr, SAMPLE: tl.constexpr,
                 SUB: tl.constexpr, K_FP32: tl.constexpr, REDUCE_MAX: tl.constexpr):
    """Score SAMPLE evenly spaced tokens of row pid against q' (already written), sort them, write the bracket
    (lo, hi) and zero the row's two counters (and, ZERO_AC, the attention kernel's split counter ac_ptr[pid])."""
    lo_key = tl.zeros([], dtype=tl.uint32)
    hi_key = tl.full([], 0xFFFFFFFF, tl.uint32)
    if (kb < n) & (n >= 4 * SAMPLE):
        qT = _load_q_lr_T(qrot_ptr, sqr_b, sqr_h, b, h0, HPR, G_PAD, D_LR, BLOCK_DL) * scale
        qT_hi, qT_lo = _q_operands(qT, klr_ptr.dtype.element_ty, HPR, G_PAD)
        k_base = klr_ptr + b * slr_b + kvh * slr_h
        sbuf = ws_ptr + pid.to(tl.int64) * WS_ROW  # the band's key region: free until the classification
        for c in tl.static_range(0, SAMPLE, SUB):
            i = c + tl.arange(0, SUB)
            spos = ((i.to(tl.int64) * n) // SAMPLE).to(tl.int32)
            sc = _score_tile(k_base, slr_s, spos, i < SAMPLE, qT, qT_hi, qT_lo, D_LR, BLOCK_DL, HPR, G_PAD,
                             K_FP32, REDUCE_MAX)
            sc = _forced(sc, spos, n, SINK, LOCAL)
            tl.store(sbuf + i, _key_of(sc).to(tl.int32, bitcast=True))
        tl.debug_barrier()  # sample keys written by all threads are read back by all threads
        sk = tl.load(sbuf + tl.arange(0, SAMPLE)).to(tl.uint32, bitcast=True)
        lo_key, hi_key = _bracket_of_sample(sk, kb, n, nsig, SAMPLE)
    br = br_ptr + pid * BR_STRIDE
    tl.store(br, lo_key.to(tl.int32, bitcast=True))
    tl.store(br + 1, hi_key.to(tl.int32, bitcast=True))
    tl.store(br + 2, 0)
    tl.store(br + 3, 0)
    tl.store(br + 4, kb)
    if ZERO_AC:
        tl.store(ac_ptr + pid, 0)


@triton.jit
def _bracket_kernel(q_ptr, sq_b, sq_h, P_ptr, sp_h, sp_r, qrot_ptr, sqr_b, sqr_h,
                    klr_ptr, slr_b, slr_h, slr_s, ws_ptr, br_ptr, ac_ptr, len_ptr, kb_ptr, K_INT, FRAC_Q, FORCED,
                    scale, R, G, S_MAX, KMAX, nsig, SINK, LOCAL, WS_ROW,
                    ZERO_AC: tl.constexpr, ROTATE: tl.constexpr, KB_MODE: tl.constexpr, HPR: tl.constexpr,
                    G_PAD: tl.constexpr, G_ROT: tl.constexpr, D: tl.constexpr, D_LR: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DL: tl.constexpr, SAMPLE: tl.constexpr, SUB: tl.constexpr, K_FP32: tl.constexpr,
                    REDUCE_MAX: tl.constexpr, ROT_C: tl.constexpr, ROT_I: tl.constexpr):
    """overlap=False: rotate q (one program per row) and write the row's bracket, before the scoring kernel."""
    pid = tl.program_id(0)
    b, r, h0, kvh = _row_of(pid, R, HPR, G)
    n, kb = _budget_of(len_ptr, kb_ptr, b, K_INT, FRAC_Q, FORCED, S_MAX, KMAX, KB_MODE)
    if ROTATE:
        _rotate_heads(q_ptr, sq_b, sq_h, P_ptr, sp_h, sp_r, qrot_ptr, sqr_b, sqr_h, b, h0, kvh,
                      HPR, G_ROT, D, BLOCK_D, ROT_C, ROT_I)
        tl.debug_barrier()  # q' written by all threads of the program is read back below
    _bracket_row(pid, b, h0, kvh, n, kb, qrot_ptr, sqr_b, sqr_h, klr_ptr, slr_b, slr_h, slr_s, ws_ptr, br_ptr,
                 ac_ptr, scale, nsig, SINK, LOCAL, WS_ROW, ZERO_AC, HPR, G_PAD, D_LR, BLOCK_DL, SAMPLE, SUB, K_FP32,
                 REDUCE_MAX)


@triton.jit
def _bracket_scores_kernel(qrot_ptr, sqr_b, sqr_h, klr_ptr, slr_b, slr_h, slr_s, ws_ptr, br_ptr, ac_ptr, out_ptr,
                           so_b, so_r, len_ptr, kb_ptr, K_INT, FRAC_Q, FORCED, scale, R, G, S_MAX, KMAX, nsig, SINK,
                           LOCAL, WS_ROW, TPP, NCOL, ZERO_AC: tl.constexpr, KB_MODE: tl.constexpr, HPR: tl.constexpr,
                           G_PAD: tl.constexpr, D_LR: tl.constexpr,
                           BLOCK_DL: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, K_FP32: tl.constexpr,
                           REDUCE_MAX: tl.constexpr, CLASSIFY: tl.constexpr, OVERLAP: tl.constexpr,
                           SAMPLE: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr, HINTS: tl.constexpr = False,
                           PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, FLOW: tl.constexpr = False,
                           FLOW_PDL: tl.constexpr = False):
    """Grid (rows, tiles [+ 1]).  OVERLAP (= 1): the programs of grid column 0, dispatched first, write the rows'
    brackets (`_bracket_row`) while the others score, so the bracket's latency hides under the scoring pass.
    Each scoring program takes TILES tiles of BLOCK_N tokens, unrolled (STAGES = 0), or (STAGES > 0, session 7) TPP
    tiles in a software-pipelined loop that keeps the next tiles' loads in flight while it scores one.
    PDL (session 11, BRACKET_ROTATE_PDL; session 12: on where d <= 16 and S_max >= 16K): launched while the rotation
    kernel runs; the scoring programs first prefetch their first PREFETCH tiles of the slab into L2 (memory otherwise
    idle during the rotation), then every program waits for q' (griddepcontrol) before it reads it.
    FLOW (session 13, BRACKET_FLOW; needs OVERLAP): a one-dimensional grid, the rows' bracket programs first, then
    each row's NCOL scoring programs, row after row, so that rows finish in order; every program ends with a
    release increment of its row's counter (record slot FLOW_SLOT, zeroed by the rotation kernel), which the classify
    kernel, launched early (FLOW_PDL: every program here triggers it at once), waits for row by row."""
    if FLOW:
        pdl_trigger(FLOW_PDL)
        prog = tl.program_id(0)
        nrows = tl.num_programs(0) // (NCOL + 1)
        rel = prog - nrows
        pid = tl.where(rel < 0, prog, rel // NCOL)
        tb = tl.where(rel < 0, -1, rel % NCOL)
    else:
        pid = tl.program_id(0)
        tb = tl.program_id(1) - OVERLAP
    b, r, h0, kvh = _row_of(pid, R, HPR, G)
    if tb < 0:
        pdl_wait(PDL)  # (q', from the rotation kernel)
        n, kb = _budget_of(len_ptr, kb_ptr, b, K_INT, FRAC_Q, FORCED, S_MAX, KMAX, KB_MODE)
        _bracket_row(pid, b, h0, kvh, n, kb, qrot_ptr, sqr_b, sqr_h, klr_ptr, slr_b, slr_h, slr_s, ws_ptr,
                     br_ptr, ac_ptr, scale, nsig, SINK, LOCAL, WS_ROW, ZERO_AC, HPR, G_PAD, D_LR, BLOCK_DL, SAMPLE,
                     SUB, K_FP32, REDUCE_MAX)
    else:
        n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX), 0)
        if STAGES > 0:
            start0 = tb * (TPP * BLOCK_N)
        else:
            start0 = tb * (TILES * BLOCK_N)
        if start0 < n:
            k_base = klr_ptr + b * slr_b + kvh * slr_h
            if PDL:
                for t in tl.static_range(PREFETCH):
                    offs = start0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
                    _prefetch_l2(k_base + offs.to(tl.int64) * slr_s, offs < n)
                pdl_wait(PDL)  # (q', from the rotation kernel)
            qT = _load_q_lr_T(qrot_ptr, sqr_b, sqr_h, b, h0, HPR, G_PAD, D_LR, BLOCK_DL) * scale
            qT_hi, qT_lo = _q_operands(qT, klr_ptr.dtype.element_ty, HPR, G_PAD)
            br = br_ptr + pid * BR_STRIDE
            lo_key = tl.load(br).to(tl.uint32, bitcast=True)
            hi_key = tl.load(br + 1).to(tl.uint32, bitcast=True)
            cnt_ptr = (br + 2).to(tl.pointer_type(tl.int64))  # the two int32 counters as one 8-byte-aligned int64
            bkey = ws_ptr + pid.to(tl.int64) * WS_ROW
            bidx = bkey + S_MAX
            o_row = out_ptr + b * so_b + r * so_r
            if STAGES > 0:
                for t in tl.range(0, tl.minimum(TPP, tl.cdiv(n - start0, BLOCK_N)), num_stages=STAGES):
                    _score_key_tile(start0 + t * BLOCK_N + tl.arange(0, BLOCK_N), n, k_base, slr_s, qT, qT_hi, qT_lo,
                                    lo_key, hi_key, cnt_ptr, o_row, bkey, bidx, S_MAX, KMAX, SINK, LOCAL, D_LR,
                                    BLOCK_DL, HPR, G_PAD, K_FP32, REDUCE_MAX, CLASSIFY, HINTS)
            else:
                for t in tl.static_range(TILES):
                    _score_key_tile(start0 + t * BLOCK_N + tl.arange(0, BLOCK_N), n, k_base, slr_s, qT, qT_hi, qT_lo,
                                    lo_key, hi_key, cnt_ptr, o_row, bkey, bidx, S_MAX, KMAX, SINK, LOCAL, D_LR,
                                    BLOCK_DL, HPR, G_PAD, K_FP32, REDUCE_MAX, CLASSIFY, HINTS)
    if FLOW:  # this program's stores (keys; bracket record) are done: count it in its row's counter
        pdl_wait(PDL)  # (the rotation kernel zeroed the counter)
        tl.debug_barrier()
        tl.atomic_add(br_ptr + pid * BR_STRIDE + FLOW_SLOT, 1, sem="release")


@triton.jit
def _prefetch_l2(ptrs, mask):
    """prefetch.global.L2 of each address where mask (inline PTX; GPU only)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _score_key_tile(offs, n, k_base, slr_s, qT, qT_hi, qT_lo, lo_key, hi_key, cnt_ptr, o_row, bkey, bidx, S_MAX, KMAX,
                    SINK, LOCAL, D_LR: tl.constexpr, BLOCK_DL: tl.constexpr, HPR: tl.constexpr, G_PAD: tl.constexpr,
                    K_FP32: tl.constexpr, REDUCE_MAX: tl.constexpr, CLASSIFY: tl.constexpr, HINTS: tl.constexpr):
    """Score the tokens `offs` and write their keys (or, CLASSIFY, classify them against the bracket).  HINTS
    (`BRACKET_CACHE_HINTS`): the slab is read evict_first and the keys written evict_last, so that the keys (4 bytes
    per token) are still in L2 when the classify kernel reads them."""
    valid = offs < n
    if HINTS:
        sc = _score_tile(k_base, slr_s, offs, valid, qT, qT_hi, qT_lo, D_LR, BLOCK_DL, HPR, G_PAD, K_FP32, REDUCE_MAX,
                         True)
    else:
        sc = _score_tile(k_base, slr_s, offs, valid, qT, qT_hi, qT_lo, D_LR, BLOCK_DL, HPR, G_PAD, K_FP32, REDUCE_MAX)
    key = _key_of(_forced(sc, offs, n, SINK, LOCAL))
    if CLASSIFY:
        _classify(key, offs, valid, lo_key, hi_key, cnt_ptr, o_row, bkey, bidx, KMAX)
    else:
        # masked by S_MAX, not n: a mask uniform over vectors (S_MAX % 16 == 0) lets the store be vectorized; the
        # keys past n are never read (every reader masks by n)
        if HINTS:
            tl.store(bkey + 2 * S_MAX + offs, key.to(tl.int32, bitcast=True), mask=offs < S_MAX,
                     eviction_policy="evict_last")
        else:
            tl.store(bkey + 2 * S_MAX + offs, key.to(tl.int32, bitcast=True), mask=offs < S_MAX)


@triton.jit
def _classify(key, offs, valid, lo_key, hi_key, cnt_ptr, o_row, bkey, bidx, KMAX):
    """key > hi: position written to the output row; lo <= key <= hi: (key, position) appended to the band."""
    gt = valid & (key > hi_key)
    bd = valid & (key >= lo_key) & (key <= hi_key)
    packed = gt.to(tl.int32) + (bd.to(tl.int32) << 16)
    c_ex = tl.cumsum(packed, axis=0) - packed
    tot = tl.sum(packed, axis=0)
    # one relaxed 64-bit atomic claims both output ranges (low word: #above, high word: #band); kernel
    # boundaries order it against the other kernels, so no fence is needed (acq_rel fences cost ~2x here)
    inc = (tot & 0xFFFF).to(tl.int64) + ((tot >> 16).to(tl.int64) << 32)
    old = tl.atomic_add(cnt_ptr, inc, sem="relaxed")
    gpos = (old & 0xFFFFFFFF).to(tl.int32) + (c_ex & 0xFFFF)
    bpos = (old >> 32).to(tl.int32) + (c_ex >> 16)
    tl.store(o_row + gpos, offs.to(o_row.dtype.element_ty), mask=gt & (gpos < KMAX))
    tl.store(bkey + bpos, key.to(tl.int32, bitcast=True), mask=bd)
    tl.store(bidx + bpos, offs, mask=bd)


@triton.jit
def _classify_row(ws_ptr, br_ptr, pid, S_MAX, WS_ROW, CG: tl.constexpr = False):
    """(lo, hi, the row's two counters as one 8-byte-aligned int64 pointer, band keys, band positions) of score row
    pid, for the classify kernels (CG: the record read past L1)."""
    br = br_ptr + pid * BR_STRIDE
    lo_key = tl.load(br, cache_modifier=".cg" if CG else "").to(tl.uint32, bitcast=True)
    hi_key = tl.load(br + 1, cache_modifier=".cg" if CG else "").to(tl.uint32, bitcast=True)
    bkey = ws_ptr + pid.to(tl.int64) * WS_ROW
    return lo_key, hi_key, (br + 2).to(tl.pointer_type(tl.int64)), bkey, bkey + S_MAX


@triton.jit
def _bracket_classify_kernel(ws_ptr, br_ptr, out_ptr, so_b, so_r, len_ptr, R, S_MAX, KMAX, WS_ROW,
                             BLOCK_C: tl.constexpr, SCALAR: tl.constexpr, HINTS: tl.constexpr = False):
    """classify="split": the keys the scoring kernel wrote, classified by many programs per row."""
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    b = pid // R
    r = pid % R
    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX), 0)
    start = tb * BLOCK_C
    if start < n:
        lo_key, hi_key, cnt_ptr, bkey, bidx = _classify_row(ws_ptr, br_ptr, pid, S_MAX, WS_ROW)
        offs = start + tl.arange(0, BLOCK_C)
        if SCALAR:
            # (session 7) one key per thread and load: the same layout as the scattered stores of `_classify`,
            # which otherwise each convert their pointers, values and masks through shared memory
            offs = tl.max_contiguous(offs, [1])
        valid = offs < n
        if HINTS:  # the keys' last reader
            key = tl.load(bkey + 2 * S_MAX + offs, mask=offs < S_MAX, other=0,
                          eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        else:
            key = tl.load(bkey + 2 * S_MAX + offs, mask=offs < S_MAX, other=0).to(tl.uint32, bitcast=True)
        _classify(key, offs, valid, lo_key, hi_key, cnt_ptr, out_ptr + b * so_b + r * so_r, bkey, bidx, KMAX)


@triton.jit
def _store_if(ptr, val, pred, ASM: tl.constexpr):
    """tl.store(ptr, val, mask=pred) of int32 values; ASM (session 11): one predicated ``st.global.b32`` per element in
    inline PTX.  Triton's coalescing pass gives a scattered store a one-element-per-thread layout and converts its
    pointers, values and masks to it through shared memory; an inline-asm store keeps its operands' layout (the
    blocked layout of `_bracket_classify_vec_kernel`, several keys per thread).  Not under the interpreter."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [ptr, val.to(tl.int32, bitcast=True), pred.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1)
    else:
        tl.store(ptr, val.to(tl.int32, bitcast=True), mask=pred)


@triton.jit
def _bracket_classify_vec_kernel(ws_ptr, br_ptr, out_ptr, so_b, so_r, len_ptr, R, S_MAX, KMAX, WS_ROW, NBLK, EXPECT,
                                 BLOCK_C: tl.constexpr, KPT: tl.constexpr, ASM: tl.constexpr,
                                 HINTS: tl.constexpr = False, NB: tl.constexpr = 1, FLOW: tl.constexpr = False,
                                 SPIN: tl.constexpr = True):
    """classify="split" with BRACKET_CLASSIFY_VEC = KPT (session 11): `_bracket_classify_kernel` with each thread
    holding KPT consecutive keys (one vector load), scanned in the thread, then one scan over the BLOCK_C / KPT
    per-thread sums; the stores keep that layout (ASM, `_store_if`).  The session-7 kernel scans every key across
    the threads (a warp scan per key register) and issues ~600 SASS instructions per 1024 keys; this one ~380
    (`python -m kernels.ir classify`).  Keys past the row's length read as 0, below every real key (key 0 is a NaN
    score), so the band test needs no separate length mask.
    FLOW (session 13, BRACKET_FLOW): a one-dimensional grid in row order (NBLK programs per row), launched while the
    scoring kernel runs; a program first waits until all EXPECT programs of its row's scoring grid have counted
    themselves (acquire), then reads the row's keys and record past L1 (.cg).  Block 0 of every row waits even when
    the row is empty, so that this grid's completion implies every scoring program's stores."""
    if FLOW:
        prog = tl.program_id(0)
        pid = prog // NBLK
        tb = prog % NBLK
    else:
        pid = tl.program_id(0)
        tb = tl.program_id(1)
    b = pid // R
    r = pid % R
    n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX), 0)
    start = tb * (NB * BLOCK_C)
    if FLOW:
        if (start < n) | (tb == 0):
            _flow_wait(br_ptr + pid * BR_STRIDE + FLOW_SLOT, EXPECT, SPIN)
    if start < n:
        lo_key, hi_key, cnt_ptr, bkey, bidx = _classify_row(ws_ptr, br_ptr, pid, S_MAX, WS_ROW, FLOW)
        lo_key = tl.maximum(lo_key, 1)  # (keys past the row's length read as 0)
        o_row = out_ptr + b * so_b + r * so_r
        for j in tl.static_range(NB):  # NB blocks per program, one atomic each
            if start + j * BLOCK_C < n:
                offs = start + j * BLOCK_C + tl.arange(0, BLOCK_C // KPT)[:, None] * KPT + tl.arange(0, KPT)[None, :]
                _classify_vec(bkey, bidx, o_row, offs, n, lo_key, hi_key, cnt_ptr, S_MAX, KMAX, ASM, HINTS, FLOW)


@triton.jit
def _flow_wait(cnt, expect, SPIN: tl.constexpr):
    """Spin until the int32 counter at `cnt` reaches `expect` (acquire: the counted programs' stores are visible),
    then a barrier, so that every thread of the program reads after it (session 13, BRACKET_FLOW).  SPIN=False (the
    interpreter, which runs the scoring grid to its end before this kernel): one read, no loop, so that a counting
    bug shows as a wrong count (`test_bracket_flow`) rather than a hang."""
    seen = tl.atomic_add(cnt, 0, sem="acquire")
    if SPIN:
        while seen < expect:
            seen = tl.atomic_add(cnt, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _classify_vec(bkey, bidx, o_row, offs, n, lo_key, hi_key, cnt_ptr, S_MAX, KMAX, ASM: tl.constexpr,
                  HINTS: tl.constexpr, CG: tl.constexpr = False):
    """`_bracket_classify_vec_kernel`'s block of keys `offs` (2-D: KPT consecutive keys per thread).  CG: the keys
    are read past L1 (they were written while this kernel ran)."""
    if CG:  # (ptxas rejects .cg together with an eviction hint)
        key = tl.load(bkey + 2 * S_MAX + offs, mask=offs < S_MAX, other=0, cache_modifier=".cg")
    elif HINTS:  # the keys' last reader
        key = tl.load(bkey + 2 * S_MAX + offs, mask=offs < S_MAX, other=0, eviction_policy="evict_first")
    else:
        key = tl.load(bkey + 2 * S_MAX + offs, mask=offs < S_MAX, other=0)
    key = tl.where(offs < n, key.to(tl.uint32, bitcast=True), 0)
    gt = key > hi_key
    bd = (key >= lo_key) & (key <= hi_key)
    packed = gt.to(tl.int32) + (bd.to(tl.int32) << 16)  # (#above, #band) in one int: blocks < 65536 keys
    t_sum = tl.sum(packed, axis=1)
    c_ex = (tl.cumsum(t_sum, axis=0) - t_sum)[:, None] + tl.cumsum(packed, axis=1) - packed
    tot = tl.sum(t_sum, axis=0)
    inc = (tot & 0xFFFF).to(tl.int64) + ((tot >> 16).to(tl.int64) << 32)
    old = tl.atomic_add(cnt_ptr, inc, sem="relaxed")  # as `_classify`: both ranges claimed at once
    # positions past the output row (#above > KMAX: the bracket missed, and the finish kernel rewrites the row) all
    # go to its last slot
    gpos = tl.minimum((old & 0xFFFFFFFF).to(tl.int32) + (c_ex & 0xFFFF), KMAX - 1)
    bpos = (old >> 32).to(tl.int32) + (c_ex >> 16)
    _store_if(o_row + gpos, offs, gt, ASM)
    _store_if(bkey + bpos, key, bd, ASM)
    _store_if(bidx + bpos, offs, bd, ASM)


@triton.jit
def _kth_key(key, valid, r, hb, prefix, EARLY: tl.constexpr):
    """A threshold T for the r largest of the valid keys (a register block; all share their top 32 - hb bits,
    `prefix`; invalid slots must hold key 0), found bit by bit: up to hb counting passes over registers, no memory
    traffic.

    The r largest are the keys > T plus the first r - #(> T) keys == T.  T is the r-th largest key itself, except
    with EARLY (session 7): the search stops at the first candidate c with exactly r keys >= c (then T = c - 1,
    no key equals T and no tie is taken).  Distinct keys are separated after ~log2(#keys) + a few bits, so a band of
    a few thousand keys spanning ~24 bits stops after ~13-15 passes instead of 24."""
    return _kth_key_blocks(key, key, key, r, hb, prefix, EARLY, False)


@triton.jit
def _kth_key_blocks(k0, k1, k2, r, hb, prefix, EARLY: tl.constexpr, THREE: tl.constexpr):
    """`_kth_key`'s search over one register block (k0) or, THREE (session 10), three (k0, k1, k2): one reduction per
    pass over the blocks' summed compares, so a 3 x 4096-key band costs three quarters of a 16384-key block's passes.
    (No `valid &` in the counts: invalid slots hold key 0 and every candidate is >= 1.)"""
    hbu = tl.minimum(hb, 31).to(tl.uint32)
    t = tl.where(hb >= 32, tl.zeros([], dtype=tl.uint32), prefix << hbu)
    bit = hb - 1
    cnt = tl.full([], -1, tl.int32)
    while bit >= 0:
        cand = t | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        if THREE:
            cnt = tl.sum((k0 >= cand).to(tl.int32) + (k1 >= cand).to(tl.int32) + (k2 >= cand).to(tl.int32), axis=0)
        else:
            cnt = tl.sum((k0 >= cand).to(tl.int32), axis=0)
        t = tl.where(cnt >= r, cand, t)
        if EARLY:
            bit = tl.where(cnt == r, -1, bit - 1)
        else:
            bit -= 1
    # cnt == r: t is the candidate just taken (>= 1) and exactly r keys are >= t, i.e. > t - 1
    return tl.where(cnt == r, t - 1, t)


@triton.jit
def _place_block(key, i, valid, t, need, base, bidx_ptr, out_ptr, idx=None, ASM: tl.constexpr = False):
    """Write the positions of one register block's keys > t and of its first ties (after `base`: the packed counts of
    the blocks before it, low half: keys > t, high half: ties) to out_ptr; returns base plus this block's counts.
    idx: the block's positions, loaded with its keys (BRACKET_BAND_IDX_FIRST), else gathered here.  ASM: the stores in
    inline PTX (`_store_if`), in the keys' register layout."""
    gt = valid & (key > t)
    eq = valid & (key == t)
    packed = gt.to(tl.int32) + (eq.to(tl.int32) << 16)
    c_ex = tl.cumsum(packed, axis=0) - packed + base
    eq_ex = c_ex >> 16
    take = gt | (eq & (eq_ex < need))
    pos = (c_ex & 0xFFFF) + tl.minimum(eq_ex, need)
    if idx is None:
        val = tl.load(bidx_ptr + i, mask=take, other=0)
    else:
        val = idx
    _store_if(out_ptr + pos, val, take, ASM)  # (out: the int32 index rows)
    return base + tl.sum(packed, axis=0)


@triton.jit
def _select_in_registers3(bkey_ptr, bidx_ptr, m, r, out_ptr, hb, prefix, BLK: tl.constexpr, EARLY: tl.constexpr,
                          ASM: tl.constexpr = False):
    """`_select_in_registers` for bands of up to 3 * BLK keys (session 10): three BLK-key register blocks instead of
    one 4 * BLK block, for bands just above a power of 2 (64K rows at k = 1/4: ~7.6K keys, up to ~9.5K over 128 rows,
    where the next power of 2 is 16384).  The band select's time grows with its block (~1.3 us per 1024 keys)."""
    i0 = tl.arange(0, BLK)
    i1 = i0 + BLK
    i2 = i0 + 2 * BLK
    k0 = tl.load(bkey_ptr + i0, mask=i0 < m, other=0).to(tl.uint32, bitcast=True)
    k1 = tl.load(bkey_ptr + i1, mask=i1 < m, other=0).to(tl.uint32, bitcast=True)
    k2 = tl.load(bkey_ptr + i2, mask=i2 < m, other=0).to(tl.uint32, bitcast=True)
    t = _kth_key_blocks(k0, k1, k2, r, hb, prefix, EARLY, True)
    n_gt = tl.sum(((i0 < m) & (k0 > t)).to(tl.int32) + ((i1 < m) & (k1 > t)).to(tl.int32)
                  + ((i2 < m) & (k2 > t)).to(tl.int32), axis=0)
    need = r - n_gt
    base = tl.zeros([], dtype=tl.int32)
    base = _place_block(k0, i0, i0 < m, t, need, base, bidx_ptr, out_ptr, None, ASM)
    base = _place_block(k1, i1, i1 < m, t, need, base, bidx_ptr, out_ptr, None, ASM)
    _place_block(k2, i2, i2 < m, t, need, base, bidx_ptr, out_ptr, None, ASM)


@triton.jit
def _select_in_registers(bkey_ptr, bidx_ptr, m, r, out_ptr, hb, prefix, BAND: tl.constexpr, EARLY: tl.constexpr,
                         IDX_FIRST: tl.constexpr = False, ASM: tl.constexpr = False):
    """out[0:r] = bidx of the r largest of bkey[0:m] (1 <= r <= m <= BAND), every key in registers.

    All keys share their top 32 - hb bits (`prefix`); the r-th largest key T is found bit by bit (`_kth_key`),
    then one prefix sum places the keys > T and the first ties."""
    i = tl.arange(0, BAND)
    valid = i < m
    key = tl.load(bkey_ptr + i, mask=valid, other=0).to(tl.uint32, bitcast=True)
    if IDX_FIRST:  # (session 11) the positions loaded with the keys: no gather after the search
        idx = tl.load(bidx_ptr + i, mask=valid, other=0)
    else:
        idx = None
    t = _kth_key(key, valid, r, hb, prefix, EARLY)
    need = r - tl.sum((valid & (key > t)).to(tl.int32), axis=0)
    _place_block(key, i, valid, t, need, tl.zeros([], dtype=tl.int32), bidx_ptr, out_ptr, idx, ASM)


@triton.jit
def _bracket_finish_kernel(qrot_ptr, sqr_b, sqr_h, klr_ptr, slr_b, slr_h, slr_s, ws_ptr, br_ptr, out_ptr, so_b,
                           so_r, len_ptr, kb_ptr, K_INT, FRAC_Q, FORCED, scale, R, G, S_MAX, KMAX, SINK, LOCAL,
                           WS_ROW,
                           KB_MODE: tl.constexpr, HPR: tl.constexpr, G_PAD: tl.constexpr, D_LR: tl.constexpr,
                           BLOCK_DL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                           K_FP32: tl.constexpr, REDUCE_MAX: tl.constexpr, KEYS_WRITTEN: tl.constexpr,
                           BAND_REG: tl.constexpr, EARLY: tl.constexpr, BAND3: tl.constexpr = False,
                           IDX_FIRST: tl.constexpr = False, ASM: tl.constexpr = False,
                           PDL: tl.constexpr = False):
    """One program per score row: the band select (or, the bracket missed, the whole row's radix select).  BAND3:
    the band in three BAND_REG / 4-key register blocks (`_select_in_registers3`) instead of one BAND_REG block.
    PDL (session 11): the attention kernel, launched with launch_pdl=True, may start at once and attend to the
    selection's rows above the bracket (written by the classify kernel) while this kernel selects the band."""
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    b, r, h0, kvh = _row_of(pid, R, HPR, G)
    n, kb = _budget_of(len_ptr, kb_ptr, b, K_INT, FRAC_Q, FORCED, S_MAX, KMAX, KB_MODE)
    br = br_ptr + pid * BR_STRIDE
    lo_key = tl.load(br).to(tl.uint32, bitcast=True)
    hi_key = tl.load(br + 1).to(tl.uint32, bitcast=True)
    c_gt = tl.load(br + 2)
    c_band = tl.load(br + 3)
    bkey = ws_ptr + pid.to(tl.int64) * WS_ROW
    bidx = bkey + S_MAX
    o_row = out_ptr + b * so_b + r * so_r
    if (c_gt <= kb) & (kb <= c_gt + c_band):
        rr = kb - c_gt
        if rr > 0:
            hb, prefix = _band_prefix(lo_key, hi_key)
            if BAND3:
                if c_band <= 3 * (BAND_REG // 4):
                    _select_in_registers3(bkey, bidx, c_band, rr, o_row + c_gt, hb, prefix, BAND_REG // 4, EARLY,
                                          ASM)
                else:
                    _radix_select(bkey, bidx, c_band, rr, o_row + c_gt, hb, prefix, HAS_IDX=True, SRC_KEYS=True,
                                  BLOCK_S=BLOCK_S)
            elif c_band <= BAND_REG:
                _select_in_registers(bkey, bidx, c_band, rr, o_row + c_gt, hb, prefix, BAND_REG, EARLY, IDX_FIRST,
                                     ASM)
            else:
                _radix_select(bkey, bidx, c_band, rr, o_row + c_gt, hb, prefix, HAS_IDX=True, SRC_KEYS=True,
                              BLOCK_S=BLOCK_S)
    elif KEYS_WRITTEN:  # the bracket missed; the scoring kernel wrote every key: radix select over the row
        _radix_select(bkey + 2 * S_MAX, bkey, n, kb, o_row, tl.full([], 32, tl.int32), tl.zeros([], dtype=tl.uint32),
                      HAS_IDX=False, SRC_KEYS=True, BLOCK_S=BLOCK_S)
    else:  # the bracket missed: recompute the row's keys, exact radix select over the whole row
        qT = _load_q_lr_T(qrot_ptr, sqr_b, sqr_h, b, h0, HPR, G_PAD, D_LR, BLOCK_DL) * scale
        qT_hi, qT_lo = _q_operands(qT, klr_ptr.dtype.element_ty, HPR, G_PAD)
        k_base = klr_ptr + b * slr_b + kvh * slr_h
        for start in range(0, n, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            valid = offs < n
            sc = _score_tile(k_base, slr_s, offs, valid, qT, qT_hi, qT_lo, D_LR, BLOCK_DL, HPR, G_PAD, K_FP32,
                             REDUCE_MAX)
            key = _key_of(_forced(sc, offs, n, SINK, LOCAL))
            tl.store(bkey + offs, key.to(tl.int32, bitcast=True), mask=valid)
        tl.debug_barrier()  # keys written by all threads are read back by all threads
        _radix_select(bkey, bkey, n, kb, o_row, tl.full([], 32, tl.int32), tl.zeros([], dtype=tl.uint32),
                      HAS_IDX=False, SRC_KEYS=True, BLOCK_S=BLOCK_S)
    _fill_padding(o_row, kb, KMAX, BLOCK_S)


@triton.jit
def _band_prefix(lo_key, hi_key):
    """(hb, prefix): every key of the bracket [lo, hi] shares its top 32 - hb bits, `prefix`."""
    hb = _bit_length(lo_key ^ hi_key)
    return hb, tl.where(hb >= 32, 0, hi_key >> tl.minimum(hb, 31).to(tl.uint32))


@triton.jit
def _fill_padding(o_row, kb, KMAX, BLOCK_S: tl.constexpr):
    """o_row[kb:KMAX] = -1."""
    ar = tl.arange(0, BLOCK_S)
    for start in range(kb, KMAX, BLOCK_S):
        offs = start + ar
        tl.store(o_row + offs, tl.full([BLOCK_S], -1, o_row.dtype.element_ty), mask=offs < KMAX)


@triton.jit
def _threshold_in_registers(bkey_ptr, bidx_ptr, m, r, hb, prefix, BAND: tl.constexpr, EARLY: tl.constexpr):
    """(T, P) for the r largest of bkey[0:m] (1 <= r <= m <= BAND; positions bidx[0:m] ascending): the threshold
    T of `_kth_key`, and P, the position of the last tie taken when ties at T are taken in position order.  The
    selection is then: key > T, or key == T and position <= P."""
    i = tl.arange(0, BAND)
    valid = i < m
    key = tl.load(bkey_ptr + i, mask=valid, other=0).to(tl.uint32, bitcast=True)
    t = _kth_key(key, valid, r, hb, prefix, EARLY)
    gt = valid & (key > t)
    eq = (valid & (key == t)).to(tl.int32)
    need = r - tl.sum(gt.to(tl.int32), axis=0)
    eq_ex = tl.cumsum(eq, axis=0) - eq
    pos = tl.load(bidx_ptr + i, mask=valid, other=-1)
    p_last = tl.max(tl.where((eq > 0) & (eq_ex < need), pos, -1), axis=0)
    return t, p_last


@triton.jit
def _bracket_scan_kernel(ws_ptr, br_ptr, out_ptr, so_b, so_r, len_ptr, kb_ptr, K_INT, FRAC_Q, FORCED, R, S_MAX,
                         KMAX, WS_ROW, KB_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                         BAND_REG: tl.constexpr, EARLY: tl.constexpr):
    """classify="scan" (session 6): one program per score row replaces the classify and band-select kernels.
    Pass 1 reads the row's keys (written by the scoring kernel), counts those above the bracket and compacts the
    band in position order (running prefix sums, no atomics); the k-th key T is found in the band (registers);
    pass 2 writes the selected positions, key > T or (key == T and position <= P), in ascending position order.
    Deterministic: the same selection, in the same order, call after call (ties at T: the lowest positions).
    Bands larger than BAND_REG take the band radix select (the band's part after the keys above the bracket);
    a missed bracket takes the whole-row radix select (position order)."""
    pid = tl.program_id(0)
    b = pid // R
    r = pid % R
    n, kb = _budget_of(len_ptr, kb_ptr, b, K_INT, FRAC_Q, FORCED, S_MAX, KMAX, KB_MODE)
    br = br_ptr + pid * BR_STRIDE
    lo_key = tl.load(br).to(tl.uint32, bitcast=True)
    hi_key = tl.load(br + 1).to(tl.uint32, bitcast=True)
    bkey = ws_ptr + pid.to(tl.int64) * WS_ROW
    bidx = bkey + S_MAX
    rkey = bkey + 2 * S_MAX
    o_row = out_ptr + b * so_b + r * so_r
    ar = tl.arange(0, BLOCK_C)
    c_gt = tl.zeros([], dtype=tl.int32)
    c_band = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK_C):  # pass 1: count above the bracket, compact the band
        offs = start + ar
        valid = offs < n
        key = tl.load(rkey + offs, mask=offs < S_MAX, other=0).to(tl.uint32, bitcast=True)  # (vectorized)
        bd = (valid & (key >= lo_key) & (key <= hi_key)).to(tl.int32)
        bpos = c_band + tl.cumsum(bd, axis=0) - bd
        tl.store(bkey + bpos, key.to(tl.int32, bitcast=True), mask=bd > 0)
        tl.store(bidx + bpos, offs, mask=bd > 0)
        c_gt += tl.sum((valid & (key > hi_key)).to(tl.int32), axis=0)
        c_band += tl.sum(bd, axis=0)
    tl.debug_barrier()  # the band written by all threads is read back by all threads
    thr = hi_key
    p_last = tl.full([], -1, tl.int32)
    scan = tl.full([], 1, tl.int32)
    if (c_gt <= kb) & (kb <= c_gt + c_band):
        rr = kb - c_gt
        if rr > 0:
            hb, prefix = _band_prefix(lo_key, hi_key)
            if c_band <= BAND_REG:
                thr, p_last = _threshold_in_registers(bkey, bidx, c_band, rr, hb, prefix, BAND_REG, EARLY)
            else:  # pass 2 below writes the keys above the bracket, the radix select the band's rr after them
                _radix_select(bkey, bidx, c_band, rr, o_row + c_gt, hb, prefix, HAS_IDX=True, SRC_KEYS=True,
                              BLOCK_S=BLOCK_S)
    else:  # the bracket missed: exact radix select over the row's keys
        _radix_select(rkey, bkey, n, kb, o_row, tl.full([], 32, tl.int32), tl.zeros([], dtype=tl.uint32),
                      HAS_IDX=False, SRC_KEYS=True, BLOCK_S=BLOCK_S)
        scan = 0
    if scan != 0:
        base = tl.zeros([], dtype=tl.int32)
        for start in range(0, n, BLOCK_C):  # pass 2: the selected positions, in position order
            offs = start + ar
            valid = offs < n
            key = tl.load(rkey + offs, mask=offs < S_MAX, other=0).to(tl.uint32, bitcast=True)
            take = (valid & ((key > thr) | ((key == thr) & (offs <= p_last)))).to(tl.int32)
            pos = base + tl.cumsum(take, axis=0) - take
            tl.store(o_row + pos, offs.to(o_row.dtype.element_ty), mask=(take > 0) & (pos < KMAX))
            base += tl.sum(take, axis=0)
    _fill_padding(o_row, kb, KMAX, BLOCK_S)


# GPU defaults (measured on the H200, kernels/NOTES.md); the scoring kernel takes its tiles from SCORES_CONFIG
BRACKET_SAMPLE = 1024  # largest sample (power of 2); rows shorter than 4x the sample take the whole key range
BRACKET_SAMPLE_DIV = 64  # session 5: sample = min(BRACKET_SAMPLE, max(512, pow2 <= S_max / DIV)) (0: always
#                          BRACKET_SAMPLE): 512 up to 32K, 1024 from 64K, where the narrower band fits the registers
#                          (measured: 1024 is 4-9 us faster at 64K, 2-4 us slower at 4K-32K; 2048+ slower everywhere)
BRACKET_SUB = 256  # sampled tokens scored per sub-tile of the bracket kernel
BRACKET_NSIG = 4.0
BRACKET_BLOCK_S = 2048  # tile of the band radix select
BRACKET_WARPS = 8
BRACKET_CLASSIFY = "split"  # session 4: "split" (scores + a separate classify kernel), "fused" (v4) or "scan" (v8)
BRACKET_SCAN_BLOCK = 4096  # keys per iteration of the scan kernel's two passes (classify="scan")
BRACKET_SCAN_WARPS = 8
CLASSIFY_MODES = ("split", "fused", "scan")
BRACKET_CLASSIFY_BLOCK = 1024  # keys per program of the classify kernel (1024-2048 within 1%, 32K tune, session 5)
BRACKET_CLASSIFY_WARPS = 4
BRACKET_CLASSIFY_SCALAR = True  # session 7: one key per thread and load (no layout conversions before the stores)
BRACKET_CLASSIFY_VEC = 4  # session 11: > 0: `_bracket_classify_vec_kernel`, this many consecutive keys per thread
BRACKET_CLASSIFY_NB = 1  # session 11: blocks of BRACKET_CLASSIFY_BLOCK keys per vec-classify program
BRACKET_CLASSIFY_ASM = True  # session 11: its scattered stores in inline PTX (`_store_if`; never under the interpreter)
BRACKET_OVERLAP = True  # session 5: brackets written by extra programs of the scoring kernel (split only)
BRACKET_BAND_REG = 16384  # largest band selected in registers (bit-by-bit counting); larger: radix select.  Session 7:
#                           16384 (was 8192): at 64K with k = 1/4 ~20% of the rows' bands overflowed 8192 keys
BRACKET_BAND3 = True  # session 10: bands of up to 3/4 of their power-of-2 block in three quarter blocks (`band_blocks`)
# session 11: the band select's scattered stores in inline PTX (`_store_if`), and one-block bands of up to
# BRACKET_BAND_IDX_FIRST keys load their positions together with their keys (no gather after the search): together
# 103 instead of 159 registers at a 8192-key block (Triton 3.9; the H200's 3.6: 151 instead of 193, where the stores
# alone take 212) and 0.1-1.9 us faster per step at every batch-16 point (h200_variants_s11b, s11c, s11d)
BRACKET_BAND_IDX_FIRST = 8192
BRACKET_BAND_ASM = True
# session 11, an option: > 0: the scoring kernel is launched while the rotation kernel runs (programmatic dependent
# launch) and each scoring program prefetches its first BRACKET_ROTATE_PDL slab tiles into L2 before it waits for q'
# (HBM idles during the ~5 us rotation: ~20 MB could move); 0: off.  Measured in session 12 (h200_variants_s12a, 1 /
# 2 tiles against off): d = 16 at 64K 4.1 / 3.2 us and at 16K 1.0 / 0.5 us faster; d = 32 at 64K 2.6-3.7 us slower,
# at 16K within +-1 us; 4K 5.9-9.3 us slower.  So on (1 tile) only for d <= BRACKET_ROTATE_PDL_MAX_D (0: any d) and
# S_max >= BRACKET_ROTATE_PDL_MIN_S: with kernels.loki.ATTN_LOWRANK_D (two waves of attention programs at the same
# points) 64K / (D/8, 1/16) 204.7 -> 196.6 us, 16K / (D/8, 1/16) 73.5 -> 71.5, every other point within 0.2 us
# (h200_variants_s12d, "s12_d16"); alone 64K 4.9 us faster at batch 16, 0.7 / 1.1 us at batch 1 / 64K and 128K
# (h200_variants_s12f, "s12_rot16")
BRACKET_ROTATE_PDL = 1
BRACKET_ROTATE_PDL_MAX_D = 16
BRACKET_ROTATE_PDL_MIN_S = 16384
# session 12, measured no gain (h200_variants_s12d: 112 / 96 -0.5 to +3.7 us at every point), 0 (none): a register
# cap (maxnreg) for the band-select kernel, whose SMs the early-started attention programs share (142 registers x 4
# warps on Triton 3.6: one fits beside a 151-register band select of a 8192-key block, two beside a 112-register one)
BRACKET_FINISH_MAXNREG = 0
# session 13: the classify kernel launched while the scoring kernel runs (programmatic dependent launch), each of its
# programs waiting on its row's count of finished scoring programs; the scoring grid runs row after row (brackets
# first), so the classification of the rows already scored overlaps the scoring pass's last wave.  Only with
# overlap, a rotation (P given), classify="split" and the vec classify kernel
BRACKET_FLOW = "auto"  # "auto": where the rotation PDL (BRACKET_ROTATE_PDL's rule) is off; True / False: always / never
BRACKET_FLOW_PDL = True  # (False: the same grids and waits, the classify kernel launched after the scoring kernel)
BRACKET_BAND_SD = 3.0  # band registers >= the expected band + this many standard deviations (`band_registers`)
# session 10: L2 eviction hints (the slab read evict_first, the keys written evict_last for the classify kernel, which
# reads them evict_first).  "auto": on where the keys of all rows take at most BRACKET_HINTS_MAX_BYTES (about a third of
# the H200's 50 MB L2): measured 1.5-2.5 us faster per step at 16K, 6 us slower at 64K / (D/4, 1/4), neutral elsewhere
# (bench_results/h200_variants_s10{a,c}).  True / False: always / never
BRACKET_CACHE_HINTS = "auto"
BRACKET_HINTS_MAX_BYTES = 16 << 20
BRACKET_EARLY_EXIT = True  # session 7: the bit-by-bit search stops once exactly r keys are >= the candidate
# scoring tiles (by d: the entry of the largest key <= d); session 7: a software-pipelined tile loop (`stages`) over
# enough tiles per program (at least `tiles`) for about `programs` programs in all (8-19 us faster at 64K, d = 16)
BRACKET_SCORE_CONFIG = {0: dict(block_n=256, tiles=2, num_warps=4, stages=3, programs=4096),
                        32: dict(block_n=128, tiles=4, num_warps=4, stages=3, programs=4096)}


def cache_hints(rows: int, S: int) -> bool:
    """Whether the scoring and classify kernels use L2 eviction hints (BRACKET_CACHE_HINTS) for `rows` score rows
    of S_max = S keys."""
    if BRACKET_CACHE_HINTS == "auto":
        return rows * S * 4 <= BRACKET_HINTS_MAX_BYTES
    return bool(BRACKET_CACHE_HINTS)


def default_sample(S: int) -> int:
    """Bracket sample for rows of up to S tokens (see BRACKET_SAMPLE_DIV)."""
    if not BRACKET_SAMPLE_DIV:
        return BRACKET_SAMPLE
    q = max(1, S // BRACKET_SAMPLE_DIV)
    return min(BRACKET_SAMPLE, max(512, 1 << (q.bit_length() - 1)))  # the largest power of 2 <= S / DIV


def band_fraction(sample: int, nsig: float, f: float = 0.5) -> float:
    """Expected band, as a fraction of the row, for a budget of a fraction f of it: the bracket spans
    +- (nsig * sqrt(f (1 - f) s) + 4) sample ranks; widest at f = 1/2 (s = 512: 19%, 2048: 9.2%, 4096: 6.4%)."""
    f = min(max(f, 0.0), 1.0)
    return 2 * (nsig * math.sqrt(f * (1 - f) * sample) + 4) / sample


def band_registers(S: int, sample: int, nsig: float, f: float = 0.5) -> int:
    """Keys the band select holds in registers: the power of 2 above the expected band plus BRACKET_BAND_SD of its
    standard deviations, at most BRACKET_BAND_REG.  A band that overflows them takes the much slower radix select,
    and one such row sets the kernel's time.  The band between two sample order statistics m ranks apart holds
    ~S m / sample keys, with a relative standard deviation of ~1 / sqrt(m)."""
    return min(BRACKET_BAND_REG, max(1024, next_pow2(_band_want(S, sample, nsig, f))))


def _band_want(S: int, sample: int, nsig: float, f: float) -> int:
    """The expected band plus BRACKET_BAND_SD of its standard deviations, in keys."""
    frac = band_fraction(sample, nsig, f)
    return math.ceil(S * frac * (1.0 + BRACKET_BAND_SD / math.sqrt(max(frac * sample, 1.0))))


def band_blocks(S: int, sample: int, nsig: float, f: float, band_reg: int) -> int:
    """1, or (BRACKET_BAND3, session 10) 3: the band select holds its band in three band_reg / 4-key blocks, where
    the band `band_registers` sized (expected + BRACKET_BAND_SD deviations) fits 3 / 4 of its block."""
    if not BRACKET_BAND3 or band_reg < 64:
        return 1
    return 3 if _band_want(S, sample, nsig, f) <= 3 * (band_reg // 4) else 1


def _score_config(d: int, config: dict | None) -> dict:
    base = BRACKET_SCORE_CONFIG[max(k for k in BRACKET_SCORE_CONFIG if k <= d)]
    return dict(base, **(config or {}))


def loki_select_bracket(q: torch.Tensor, k_lr: torch.Tensor, lengths: torch.Tensor, k, P: torch.Tensor | None = None,
                        mode: str = "group", reduce: str = "max", scaling: float | None = None, strict: bool = True,
                        k_max: int | None = None, sink_tokens: int = 0, local_window: int = 0,
                        q_rot_out: torch.Tensor | None = None, config: dict | None = None,
                        sample: int | None = None, nsig: float | None = None,
                        workspace: torch.Tensor | None = None, stages: int = 4, classify: str | None = None,
                        band_reg: int | None = None, band_parts: int | None = None, overlap: bool | None = None,
                        attn_counters: torch.Tensor | None = None, pdl: bool = False, flow: bool | None = None):
    """(Rotate q) + scores + exact top-k, each step spread over many programs per row (see module doc).

    Same contract as `topk.loki_select`: q (B, H, D) raw queries when P (KVH, D, D) is given (q' = q @ P is
    computed and returned), else already rotated; k_lr (B, KVH, S_max, d); k an int or (B,) int budget (clipped
    to 1..lengths[b]; strict=True raises instead, with one host sync), or a float in (0, 1]: the fraction
    ceil(k * lengths[b]) of each sequence, at least the forced count min(lengths[b], sink_tokens + local_window),
    computed on the device, exactly in int64 (`fraction_budget` is the torch equivalent; no host sync).
    sink_tokens / local_window: the first / last positions of each sequence are always selected (they count
    towards the budget).  Returns
    (idx (B, R, k_max) int32 padded with -1, q_rot (B, H, D) fp32 or None).  ``workspace``: optional int32
    buffer of >= B*R*(W*S_max + 8) elements (`bracket_workspace_size`: the rows' records, band keys and positions[,
    row keys]), W = 3 with classify="split", 2 with "fused".
    classify: "split" (the scoring kernel writes every key, a second many-program kernel classifies them),
    "fused" (the scoring kernel classifies on the spot) or "scan" (the scoring kernel writes every key, one program
    per row finds the k-th key and writes the selection in position order: deterministic, `_bracket_scan_kernel`);
    default BRACKET_CLASSIFY.  band_reg: the largest band selected in registers (power of 2; larger bands take the
    radix select); default `band_registers`.  band_parts: 1, or 3 (bands of up to 3/4 band_reg in three band_reg / 4
    blocks, `_select_in_registers3`); default `band_blocks`.
    overlap (classify="split" or "scan"; default BRACKET_OVERLAP): q is rotated by its own small kernel and the brackets
    are written by extra programs of the scoring kernel (dispatched first, running alongside the scoring programs)
    instead of by a kernel of their own before it.
    attn_counters: optional int32 tensor of >= B*R elements that the bracket programs zero, for the sparse
    attention kernel's in-kernel split combine (`sparse_decode_attention(counters=)`).
    ``stages`` < 4 launches only the first kernels (for the benchmark's per-kernel times; idx is then garbage).
    pdl (session 11): the band-select kernel lets the next kernel start early (launch_pdl=True on the GPU: the
    sparse attention with ``ready=bracket_ready(workspace, ...)``); where PDL is not available it is ignored.
    flow (session 13; default BRACKET_FLOW where PDL is available): the scoring grid row after row, and the classify
    kernel started early, each program waiting for its row's scoring programs (see `_bracket_scores_kernel`); needs
    overlap, P (the rotation kernel zeroes the rows' counters), classify="split" and BRACKET_CLASSIFY_VEC.  flow=True
    runs the same grids under the interpreter / without PDL (the classify kernel then starts after the scoring kernel).
    """
    _check_forced(sink_tokens, local_window)
    frac = None
    if isinstance(k, float):  # a fraction of each sequence, computed on the device (no host sync, graph safe)
        check_fraction(k, "k")
        if strict:
            check_fraction_k_max(k, lengths, sink_tokens, local_window, k_max)
        frac, k = k, 1
        if k_max is None:
            k_max = fraction_k_max(frac, k_lr.shape[2], sink_tokens, local_window)
    B, KVH, S, d, D, H, R, HPR, K_INT, kb, KMAX, rotate, q_rot_out = check_select_inputs(
        q, k_lr, lengths, k, P, mode, reduce, strict and frac is None, k_max, q_rot_out)
    kb_mode = 2 if frac is not None else int(kb is not None)
    frac_q = fraction_arg(frac) if frac is not None else 0
    forced = sink_tokens + local_window if frac is not None else 0
    interp = is_interpreter()
    if sample is None:
        sample = 64 if interp else default_sample(S)
    sample = int(sample)
    check_pow2(sample, "sample", 16)
    nsig = float(BRACKET_NSIG if nsig is None else nsig)
    classify = BRACKET_CLASSIFY if classify is None else classify
    check(classify in CLASSIFY_MODES, f"classify must be one of {', '.join(CLASSIFY_MODES)}; got {classify!r}")
    f = frac if frac is not None else (K_INT / S if kb is None else 0.5)  # the budget's fraction (worst: 1/2)
    if band_reg is None:  # registers sized for the band the bracket should leave at this budget
        band_reg = 128 if interp else band_registers(S, sample, nsig, f)
    band_reg = int(band_reg)
    check(band_reg >= 16 and band_reg & (band_reg - 1) == 0 and band_reg < 65536,
          f"band_reg must be a power of 2 in [16, 32768], got {band_reg}")
    if band_parts is None:
        band_parts = 1 if interp else band_blocks(S, sample, nsig, f, band_reg)
    check(band_parts in (1, 3) and (band_parts == 1 or band_reg >= 64),
          f"band_parts must be 1, or 3 with band_reg >= 64; got band_parts={band_parts}, band_reg={band_reg}")
    split = classify != "fused"  # split and scan: the scoring kernel writes every key
    overlap = split and (BRACKET_OVERLAP if overlap is None else bool(overlap))
    ws_row = _key_ints(S, classify)  # one score row's band (and key) workspace
    n_ws = bracket_workspace_size(B, R, S, classify)
    if workspace is None:
        workspace = torch.empty(n_ws, dtype=torch.int32, device=k_lr.device)
    check(workspace.dtype == torch.int32 and workspace.is_contiguous() and workspace.numel() >= n_ws
          and workspace.device == k_lr.device and workspace.data_ptr() % 8 == 0,
          f"workspace must be a contiguous, 8-byte aligned int32 tensor of >= {n_ws} elements on {k_lr.device}")
    # (the rows' records first: their counters stay int64-aligned)
    br, ws = workspace[:B * R * BR_INTS], workspace[B * R * BR_INTS:n_ws]
    idx = torch.empty(B, R, KMAX, dtype=torch.int32, device=k_lr.device)
    zero_ac = attn_counters is not None
    if zero_ac:
        check(attn_counters.dtype == torch.int32 and attn_counters.is_contiguous()
              and attn_counters.numel() >= B * R and attn_counters.device == k_lr.device,
              f"attn_counters must be a contiguous int32 tensor of >= {B * R} elements on {k_lr.device}")
    ac = attn_counters if zero_ac else idx
    scale = default_scaling(D, scaling)
    qr = q_rot_out if rotate else q
    Pt = P if rotate else q
    kbt = kb if kb is not None else lengths
    G = H // KVH
    BLOCK_DL = max(16, next_pow2(d))
    G_PAD = max(16, next_pow2(HPR))
    common = dict(HPR=HPR, G_PAD=G_PAD, D_LR=d, BLOCK_DL=BLOCK_DL, K_FP32=k_lr.dtype == torch.float32,
                  REDUCE_MAX=reduce == "max")
    sub = min(sample, 32 if interp else BRACKET_SUB)
    # session 11 / 12 (BRACKET_ROTATE_PDL): the scoring kernel launched during the rotation, prefetching slab tiles,
    # where d and S_max are in the measured range where that is faster
    # (session 19: an fp8 slab counts as d / 2, its bytes per token; at d = 32, h200_fp8_variants_s19c "pdl32"
    # against h200_bench_s19a_fp8: 16K 1.1 / 1.2 us and 64K 5.6 / 4.5 us faster at k = 1/4 / 1/8)
    d_rule = d // 2 if k_lr.dtype == SLAB_FP8 else d
    rot_pdl = (bool(BRACKET_ROTATE_PDL) and overlap and rotate and pdl_available(k_lr.device)
               and d_rule <= (BRACKET_ROTATE_PDL_MAX_D or d_rule) and S >= BRACKET_ROTATE_PDL_MIN_S)
    cfg = _score_config(d, config)  # scoring tiles; classify_block / classify_warps / finish_warps: the others
    vec = int(cfg.get("classify_vec", BRACKET_CLASSIFY_VEC))
    flow_ok = overlap and rotate and classify == "split" and bool(vec)
    if flow is None:
        flow = (flow_ok and pdl_available(k_lr.device)
                and (not rot_pdl if BRACKET_FLOW == "auto" else bool(BRACKET_FLOW)))
    check(not flow or flow_ok, "flow=True needs overlap, P (q rotated here), classify='split' and the vec classify "
          "kernel (BRACKET_CLASSIFY_VEC > 0)")
    flow_pdl = flow and bool(BRACKET_FLOW_PDL) and pdl_available(k_lr.device)
    if overlap:
        if rotate:
            launch_rotate_q(q, P, q_rot_out, KVH, G, D, pdl=rot_pdl, zero=br[int(FLOW_SLOT):] if flow else None,
                            zero_rows=R // KVH, zero_stride=BR_INTS)
    else:
        BLOCK_D = max(32, next_pow2(D))
        _bracket_kernel[(B * R,)](
            q, q.stride(0), q.stride(1), Pt, Pt.stride(0), Pt.stride(1), qr, qr.stride(0), qr.stride(1),
            k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2), ws, br, ac, lengths, kbt, K_INT, frac_q, forced,
            scale, R, G, S, KMAX, nsig, sink_tokens, local_window, ws_row, ZERO_AC=zero_ac,
            ROTATE=rotate, KB_MODE=kb_mode, G_ROT=next_pow2(HPR), D=D, BLOCK_D=BLOCK_D, SAMPLE=sample,
            SUB=sub, **rot_chunks(BLOCK_D, True), **common, num_warps=4 if interp else BRACKET_WARPS)
    if stages < 2:
        return idx, (q_rot_out if rotate else None)
    pipe = int(cfg.get("stages", 0))  # (not `stages`, the argument: kernels launched)
    if interp:
        BLOCK_N, TILES, nw = 32, 1, 4
    else:
        BLOCK_N, TILES, nw = cfg["block_n"], cfg["tiles"], cfg["num_warps"]
    n_tiles = triton.cdiv(S, BLOCK_N)
    tpp = TILES  # tiles per scoring program; pipelined with cfg["programs"]: about that many programs in all
    if pipe and cfg.get("programs"):  # (never fewer than `tiles` per program: short rows keep their tiles)
        tpp = max(TILES, triton.cdiv(n_tiles, triton.cdiv(int(cfg["programs"]), B * R)))
    hints = cache_hints(B * R, S)
    ncol = triton.cdiv(n_tiles, tpp)  # scoring programs per row
    _bracket_scores_kernel[((ncol + 1) * B * R,) if flow else (B * R, ncol + int(overlap))](
        qr, qr.stride(0), qr.stride(1), k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2), ws, br, ac,
        idx, idx.stride(0), idx.stride(1), lengths, kbt, K_INT, frac_q, forced, scale, R, G, S, KMAX, nsig,
        sink_tokens, local_window, ws_row, tpp, ncol, ZERO_AC=zero_ac, KB_MODE=kb_mode, BLOCK_N=BLOCK_N, TILES=TILES,
        **common,
        CLASSIFY=not split,
        OVERLAP=int(overlap), SAMPLE=sample, SUB=sub if interp else min(sample, cfg.get("bracket_sub", BLOCK_N)),
        STAGES=pipe, HINTS=hints and split, PDL=rot_pdl, PREFETCH=int(BRACKET_ROTATE_PDL) if rot_pdl else 0,
        FLOW=flow, FLOW_PDL=flow_pdl, num_warps=nw, **(dict(launch_pdl=True) if rot_pdl else {}))
    if stages < 3:
        return idx, (q_rot_out if rotate else None)
    block_s = 64 if interp else BRACKET_BLOCK_S
    if classify == "split":
        block_c = 64 if interp else cfg.get("classify_block", BRACKET_CLASSIFY_BLOCK)
        if vec:
            nb = int(cfg.get("classify_nb", BRACKET_CLASSIFY_NB))
            nblk = triton.cdiv(S, block_c * nb)
            _bracket_classify_vec_kernel[(B * R * nblk,) if flow else (B * R, nblk)](
                ws, br, idx, idx.stride(0), idx.stride(1), lengths, R, S, KMAX, ws_row, nblk, ncol + 1,
                BLOCK_C=block_c, KPT=vec, ASM=BRACKET_CLASSIFY_ASM and not interp, HINTS=hints, NB=nb, FLOW=flow,
                SPIN=not interp,
                num_warps=4 if interp else cfg.get("classify_warps", BRACKET_CLASSIFY_WARPS),
                **(dict(launch_pdl=True) if flow_pdl else {}))
        else:
            _bracket_classify_kernel[(B * R, triton.cdiv(S, block_c))](
                ws, br, idx, idx.stride(0), idx.stride(1), lengths, R, S, KMAX, ws_row, BLOCK_C=block_c,
                SCALAR=BRACKET_CLASSIFY_SCALAR, HINTS=hints,
                num_warps=4 if interp else cfg.get("classify_warps", BRACKET_CLASSIFY_WARPS))
    if stages < 4:
        return idx, (q_rot_out if rotate else None)
    if classify == "scan":
        _bracket_scan_kernel[(B * R,)](
            ws, br, idx, idx.stride(0), idx.stride(1), lengths, kbt, K_INT, frac_q, forced, R, S, KMAX, ws_row,
            KB_MODE=kb_mode, BLOCK_C=64 if interp else cfg.get("scan_block", BRACKET_SCAN_BLOCK),
            BLOCK_S=block_s, BAND_REG=band_reg, EARLY=BRACKET_EARLY_EXIT,
            num_warps=4 if interp else cfg.get("scan_warps", BRACKET_SCAN_WARPS))
        return idx, (q_rot_out if rotate else None)
    _bracket_finish_kernel[(B * R,)](
        qr, qr.stride(0), qr.stride(1), k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2), ws, br,
        idx, idx.stride(0), idx.stride(1), lengths, kbt, K_INT, frac_q, forced, scale, R, G, S, KMAX, sink_tokens,
        local_window,
        ws_row, KB_MODE=kb_mode, BLOCK_N=32 if interp else 256, BLOCK_S=block_s,
        **common, KEYS_WRITTEN=split, BAND_REG=band_reg, EARLY=BRACKET_EARLY_EXIT, BAND3=band_parts == 3,
        IDX_FIRST=bool(BRACKET_BAND_IDX_FIRST) and band_parts == 1 and band_reg <= BRACKET_BAND_IDX_FIRST,
        ASM=BRACKET_BAND_ASM and not interp, PDL=pdl and pdl_available(k_lr.device),
        num_warps=4 if interp else cfg.get("finish_warps", BRACKET_WARPS),
        **(dict(maxnreg=int(BRACKET_FINISH_MAXNREG)) if BRACKET_FINISH_MAXNREG and not interp else {}))
    return idx, (q_rot_out if rotate else None)


def bracket_workspace_size(B: int, R: int, S: int, classify: str | None = None) -> int:
    """int32 elements of `loki_select_bracket`'s workspace for B sequences, R score rows and S_max = S."""
    return B * R * (_key_ints(S, BRACKET_CLASSIFY if classify is None else classify) + BR_INTS)


def _key_ints(S: int, classify: str) -> int:
    """int32 elements of one score row's workspace after the records: band keys and positions, and (classify other
    than "fused": the scoring kernel writes every key) the row's keys."""
    return (3 if classify != "fused" else 2) * S


def bracket_ready(workspace: torch.Tensor, B: int, R: int) -> torch.Tensor:
    """The per-row bracket records of a workspace `loki_select_bracket` filled ((B * R, BR_INTS) int32: lo, hi,
    #above, #band, budget): what the sparse attention's early start (``ready=``) reads.  Once the classify kernel has
    run, a row whose bracket held (#above <= budget <= #above + #band) has its first #above indices final; the band
    select then writes only the positions after them."""
    return workspace[:B * R * BR_INTS].view(B * R, BR_INTS)


def fraction_k_max(frac: float, S_max: int, sink_tokens: int = 0, local_window: int = 0) -> int:
    """The largest budget a float k can mean on a cache of S_max positions (the default index width)."""
    _check_fraction(frac, sink_tokens, local_window)
    return min(S_max, max(ceil_fraction(S_max, frac), sink_tokens + local_window))


def check_fraction_k_max(frac: float, lengths: torch.Tensor, sink_tokens: int, local_window: int, k_max) -> None:
    """strict=True with a float budget and a caller's k_max: refuse a k_max below a sequence's budget (it would cut
    the selection to k_max), as an int budget is refused; one host sync, as strict costs for int budgets too."""
    if k_max is None:
        return
    kb = fraction_budget(frac, lengths, sink_tokens, local_window)
    check(not bool((kb > int(k_max)).any()), f"k_max={k_max} is smaller than the budgets {kb.tolist()} that k={frac} "
                                             "means for these lengths: the selection would be cut to k_max (pass "
                                             "strict=False to clip, or a larger k_max)")


def fraction_budget(frac: float, lengths: torch.Tensor, sink_tokens: int = 0, local_window: int = 0) -> torch.Tensor:
    """The per-sequence budget a float k means (torch ops; the bracket kernels compute it on the device):
    ceil(frac * n) (exact: `ceil_fraction`), at least min(n, sink_tokens + local_window), clipped to 1..n.
    (B,) int32."""
    _check_fraction(frac, sink_tokens, local_window)
    n = lengths.long()
    want = ceil_fraction(n, frac)
    want = torch.maximum(want, forced_count(lengths, sink_tokens, local_window))
    return torch.minimum(want.clamp(min=1), n).to(torch.int32)


def forced_count(lengths: torch.Tensor, sink_tokens: int, local_window: int) -> torch.Tensor:
    """Number of always-selected positions per sequence (sinks and local window may overlap in short ones)."""
    _check_forced(sink_tokens, local_window)
    n = lengths.long()
    return torch.clamp(n, max=int(sink_tokens) + int(local_window)) if sink_tokens + local_window else n * 0


def _check_forced(sink_tokens, local_window) -> None:
    for n, x in (("sink_tokens", sink_tokens), ("local_window", local_window)):
        check(isinstance(x, int) and not isinstance(x, bool) and x >= 0, f"{n} must be an int >= 0, got {x!r}")


def check_fraction(frac, name: str = "k") -> None:
    """The one check of a float budget (every entry point that takes one calls it, naming its own argument)."""
    check(isinstance(frac, float) and 0.0 < frac <= 1.0,
          f"{name} as a float is a fraction of each sequence and must be in (0, 1], got {frac!r}")


def _check_fraction(frac, sink_tokens, local_window) -> None:
    check_fraction(frac, "frac")
    _check_forced(sink_tokens, local_window)
