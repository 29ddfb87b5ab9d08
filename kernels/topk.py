"""Exact top-k selection per (sequence, score row) with per-sequence lengths and budgets.

Algorithm (one program per row, Triton; scores are mapped to order-preserving uint32 keys):

1. Bracket: SAMPLE scores at evenly spaced positions are sorted in registers (`tl.sort`); the sample order
   statistics around rank k*SAMPLE/n (+- NSIG binomial standard deviations) give keys lo <= hi that bracket the
   k-th largest key with high probability.
2. One pass over the row: keys > hi are selected outright (written to the output through a packed prefix sum),
   keys in [lo, hi] (the "band", a few % of the row) are compacted with their positions into a workspace.
3. Exact MSD radix select (8-bit digits, 256-bin `tl.histogram`, starting below the common prefix of lo and hi,
   early exit once the boundary bin holds exactly the number still needed) on the band only, for the
   remaining k - #(> hi); ties at the k-th value are broken towards lower positions.
   If the bracket missed (or the row is short), the same radix select runs on the whole row instead: the result
   is exact either way, only the time differs.

Histogram passes cost ~3 warp-instructions per element (warp-ballot histogram), which is why they only touch
the band.  Output indices are padded with -1 beyond each row's budget; their order within a row is
unspecified (selected-above-the-band first, then the band's picks, each in ascending position order).

`loki_select` fuses the whole front half of a Loki step in one kernel, one program per (sequence, row): rotate q,
score the row against the low-rank slab, select.  The row's keys go through a scratch buffer that stays in L2.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import (check, check_basis, check_float, check_last_contiguous, check_lengths, check_lengths_range,
                     check_out, check_pow2, check_slab_dtype, default_scaling, is_interpreter, next_pow2, rotation_out,
                     INDEX_DTYPES)
from .scores import (_check_q, _load_q_lr_T, _mode_params, _q_operands, _rotate_heads, _row_of,
                     _score_tile, rot_chunks)


@triton.jit
def _key_of(s):
    """fp32 -> uint32 key with the same order (for non-NaN values)."""
    u = s.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) != 0, ~u, u | 0x80000000)


@triton.jit
def _load_key(src_ptr, offs, valid, SRC_KEYS: tl.constexpr):
    if SRC_KEYS:
        key = tl.load(src_ptr + offs, mask=valid, other=0).to(tl.uint32, bitcast=True)
    else:
        key = _key_of(tl.load(src_ptr + offs, mask=valid, other=0.0))
    return key


@triton.jit
def _pick_bin(h, r, NB: tl.constexpr):
    """Largest bin t whose suffix count (bins >= t) reaches r; returns (t, count in t, count above t)."""
    bins = tl.arange(0, NB)
    suffix = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
    t = tl.max(tl.where(suffix >= r, bins, -1), axis=0)
    cnt = tl.sum(tl.where(bins == t, h, 0), axis=0)
    above = tl.sum(tl.where(bins > t, h, 0), axis=0)
    return t, cnt, above


@triton.jit
def _bit_length(x):
    hb = tl.zeros([], dtype=tl.int32)
    while x != 0:
        x = x >> 1
        hb += 1
    return hb


@triton.jit
def _radix_select(key_ptr, idx_ptr, n, r, out_ptr, hb0, prefix0, HAS_IDX: tl.constexpr, SRC_KEYS: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """out[0:r] = positions (or idx[position] with HAS_IDX) of the r largest keys of key[0:n], in position order.

    Every key must satisfy key >> hb0 == prefix0 (hb0 = 32: no constraint).  r >= n takes everything."""
    NB: tl.constexpr = 256
    ar = tl.arange(0, BLOCK_S)
    take_all = (r >= n).to(tl.int32)
    hb = hb0
    prefix = prefix0
    done = take_all
    while (done == 0) & (hb > 0):
        lb = tl.maximum(hb - 8, 0)
        lbu = lb.to(tl.uint32)
        wu = (hb - lb).to(tl.uint32)
        dmask = (tl.full([], 1, tl.uint32) << wu) - 1
        h = tl.zeros([NB], dtype=tl.int32)
        for start in range(0, n, BLOCK_S):
            offs = start + ar
            valid = offs < n
            kl = _load_key(key_ptr, offs, valid, SRC_KEYS) >> lbu
            cand = valid & ((kl >> wu) == prefix)
            h += tl.histogram((kl & dmask).to(tl.int32), NB, mask=cand)
        t, cnt, above = _pick_bin(h, r, NB)
        r = r - above
        prefix = (prefix << wu) | t.to(tl.uint32)
        hb = lb
        done = (cnt == r).to(tl.int32)
    # keys whose top (32 - hb) bits exceed prefix are in; the first r of those equal to it are in.
    hb = tl.where(take_all != 0, 0, hb)
    hbu = hb.to(tl.uint32)
    base = tl.zeros([], dtype=tl.int32)
    eq_seen = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK_S):
        offs = start + ar
        valid = offs < n
        hi = _load_key(key_ptr, offs, valid, SRC_KEYS) >> hbu
        # (block-bool op scalar-bool promotes to int32 in the interpreter: combine through integers)
        gt = valid & (((hi > prefix).to(tl.int32) + take_all) > 0)
        eq = valid & (((hi == prefix).to(tl.int32) * (1 - take_all)) > 0)
        packed = gt.to(tl.int32) + (eq.to(tl.int32) << 16)
        c_ex = tl.cumsum(packed, axis=0) - packed
        gt_ex = c_ex & 0xFFFF
        eq_ex = c_ex >> 16
        r_left = tl.maximum(r - eq_seen, 0)
        take = gt | (eq & (eq_ex < r_left))
        pos = base + gt_ex + tl.minimum(eq_ex, r_left)
        if HAS_IDX:
            val = tl.load(idx_ptr + offs, mask=take, other=0)
        else:
            val = offs
        tl.store(out_ptr + pos, val.to(out_ptr.dtype.element_ty), mask=take)
        tot = tl.sum(packed, axis=0)
        n_eq = tot >> 16
        base += (tot & 0xFFFF) + tl.minimum(n_eq, r_left)
        eq_seen += n_eq


@triton.jit
def _bracket_of_sample(sk, kb, n, nsig, SAMPLE: tl.constexpr):
    """Keys (lo, hi) whose ranks in the sorted sample `sk` (SAMPLE keys of a row of n) bracket rank k*SAMPLE/n by
    +- nsig binomial standard deviations (+4); the whole key range on a side that runs off the sample."""
    i = tl.arange(0, SAMPLE)
    srt = tl.sort((sk ^ 0x80000000).to(tl.int32, bitcast=True), descending=True)
    frac = kb.to(tl.float32) / n.to(tl.float32)
    pm = frac * SAMPLE
    dlt = nsig * tl.sqrt(pm * (1.0 - frac)) + 4.0
    r_hi = tl.floor(pm - dlt).to(tl.int32)
    r_lo = tl.ceil(pm + dlt).to(tl.int32)
    v_hi = (tl.sum(tl.where(i == r_hi, srt, 0), axis=0).to(tl.uint32, bitcast=True)) ^ 0x80000000
    v_lo = (tl.sum(tl.where(i == r_lo, srt, 0), axis=0).to(tl.uint32, bitcast=True)) ^ 0x80000000
    hi_key = tl.where(r_hi >= 0, v_hi, tl.full([], 0xFFFFFFFF, tl.uint32))
    lo_key = tl.where(r_lo < SAMPLE, v_lo, tl.zeros([], dtype=tl.uint32))
    return lo_key, hi_key


@triton.jit
def _select_row(src_ptr, n, kb, out_ptr, bkey_ptr, bidx_ptr, KMAX, nsig, SRC_KEYS: tl.constexpr,
                BLOCK_S: tl.constexpr, SAMPLE: tl.constexpr):
    """Write the indices of the kb largest of src[0:n] to out[0:kb], -1 to out[kb:KMAX] (see module doc)."""
    ar = tl.arange(0, BLOCK_S)
    use_band = tl.zeros([], dtype=tl.int32)
    c_gt = tl.zeros([], dtype=tl.int32)
    c_band = tl.zeros([], dtype=tl.int32)
    lo_key = tl.zeros([], dtype=tl.uint32)
    hi_key = tl.full([], 0xFFFFFFFF, tl.uint32)
    if SAMPLE > 0:  # (compile-time) SAMPLE = 0: always the direct full-row radix select
        if (kb < n) & (n >= 4 * SAMPLE):
            i = tl.arange(0, SAMPLE)
            spos = ((i.to(tl.int64) * n) // SAMPLE).to(tl.int32)
            sk = _load_key(src_ptr, spos, i < SAMPLE, SRC_KEYS)
            lo_key, hi_key = _bracket_of_sample(sk, kb, n, nsig, SAMPLE)
            for start in range(0, n, BLOCK_S):
                offs = start + ar
                valid = offs < n
                if SRC_KEYS:
                    key = tl.load(src_ptr + offs, mask=valid, other=0).to(tl.uint32, bitcast=True)
                else:
                    key = tl.load(src_ptr + offs, mask=valid, other=0.0).to(tl.uint32, bitcast=True)
                    key = tl.where((key >> 31) != 0, ~key, key | 0x80000000)
                gt = valid & (key > hi_key)
                bd = valid & (key >= lo_key) & (key <= hi_key)
                packed = gt.to(tl.int32) + (bd.to(tl.int32) << 16)
                c_ex = tl.cumsum(packed, axis=0) - packed
                gpos = c_gt + (c_ex & 0xFFFF)
                bpos = c_band + (c_ex >> 16)
                tl.store(out_ptr + gpos, offs.to(out_ptr.dtype.element_ty), mask=gt & (gpos < KMAX))
                tl.store(bkey_ptr + bpos, key.to(tl.int32, bitcast=True), mask=bd)
                tl.store(bidx_ptr + bpos, offs, mask=bd)
                tot = tl.sum(packed, axis=0)
                c_gt += tot & 0xFFFF
                c_band += tot >> 16
            use_band = ((c_gt <= kb) & (kb <= c_gt + c_band)).to(tl.int32)
            tl.debug_barrier()  # the band written by all threads is read back by all threads below
    if use_band != 0:
        r = kb - c_gt
        if r > 0:
            hb = _bit_length(lo_key ^ hi_key)
            prefix = tl.where(hb >= 32, 0, hi_key >> tl.minimum(hb, 31).to(tl.uint32))
            _radix_select(bkey_ptr, bidx_ptr, c_band, r, out_ptr + c_gt, hb, prefix, HAS_IDX=True, SRC_KEYS=True,
                          BLOCK_S=BLOCK_S)
    else:  # short row, k = whole row, or the bracket missed: exact radix select on the whole row
        _radix_select(src_ptr, src_ptr, n, kb, out_ptr, tl.full([], 32, tl.int32), tl.zeros([], dtype=tl.uint32),
                      HAS_IDX=False, SRC_KEYS=SRC_KEYS, BLOCK_S=BLOCK_S)
    for start in range(kb, KMAX, BLOCK_S):
        offs = start + ar
        tl.store(out_ptr + offs, tl.full([BLOCK_S], -1, out_ptr.dtype.element_ty), mask=offs < KMAX)


@triton.jit
def _row_budget(len_ptr, kb_ptr, b, K_INT, S_MAX, KMAX, HAS_KB: tl.constexpr):
    n = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX)
    n = tl.maximum(n, 0)
    if HAS_KB:
        K = tl.load(kb_ptr + b).to(tl.int32)
    else:
        K = K_INT
    kb = tl.minimum(tl.minimum(tl.maximum(K, 1), n), KMAX)
    return n, kb


@triton.jit
def _topk_kernel(s_ptr, ss_b, ss_r, out_ptr, so_b, so_r, ws_ptr, len_ptr, kb_ptr, K_INT, R, S_MAX, KMAX, nsig,
                 HAS_KB: tl.constexpr, BLOCK_S: tl.constexpr, SAMPLE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // R).to(tl.int64)
    r = (pid % R).to(tl.int64)
    n, kb = _row_budget(len_ptr, kb_ptr, b, K_INT, S_MAX, KMAX, HAS_KB)
    ws = ws_ptr + pid.to(tl.int64) * (2 * S_MAX)
    _select_row(s_ptr + b * ss_b + r * ss_r, n, kb, out_ptr + b * so_b + r * so_r, ws, ws + S_MAX, KMAX, nsig,
                SRC_KEYS=False, BLOCK_S=BLOCK_S, SAMPLE=SAMPLE)


@triton.jit
def _loki_select_kernel(q_ptr, sq_b, sq_h, P_ptr, sp_h, sp_r, qrot_ptr, sqr_b, sqr_h,
                        klr_ptr, slr_b, slr_h, slr_s, ws_ptr, out_ptr, so_b, so_r,
                        len_ptr, kb_ptr, K_INT, scale, R, G, S_MAX, KMAX, nsig,
                        ROTATE: tl.constexpr, HAS_KB: tl.constexpr, HPR: tl.constexpr, G_PAD: tl.constexpr,
                        G_ROT: tl.constexpr, D: tl.constexpr, D_LR: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        SAMPLE: tl.constexpr, K_FP32: tl.constexpr, REDUCE_MAX: tl.constexpr,
                        ROT_C: tl.constexpr, ROT_I: tl.constexpr):
    pid = tl.program_id(0)
    b, r, h0, kvh = _row_of(pid, R, HPR, G)
    n, kb = _row_budget(len_ptr, kb_ptr, b, K_INT, S_MAX, KMAX, HAS_KB)
    if ROTATE:
        _rotate_heads(q_ptr, sq_b, sq_h, P_ptr, sp_h, sp_r, qrot_ptr, sqr_b, sqr_h, b, h0, kvh,
                      HPR, G_ROT, D, BLOCK_D, ROT_C, ROT_I)
        tl.debug_barrier()  # q' written by all threads of the program is read back below
        qT = _load_q_lr_T(qrot_ptr, sqr_b, sqr_h, b, h0, HPR, G_PAD, D_LR, BLOCK_DL)
    else:
        qT = _load_q_lr_T(q_ptr, sq_b, sq_h, b, h0, HPR, G_PAD, D_LR, BLOCK_DL)
    qT = qT * scale
    qT_hi, qT_lo = _q_operands(qT, klr_ptr.dtype.element_ty, HPR, G_PAD)
    k_base = klr_ptr + b * slr_b + kvh * slr_h
    key_base = ws_ptr + pid.to(tl.int64) * (3 * S_MAX)
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = offs < n
        sc = _score_tile(k_base, slr_s, offs, valid, qT, qT_hi, qT_lo, D_LR, BLOCK_DL, HPR, G_PAD, K_FP32,
                         REDUCE_MAX)
        key = _key_of(sc)
        tl.store(key_base + offs, key.to(tl.int32, bitcast=True), mask=valid)
    tl.debug_barrier()  # keys written by all threads of the program are read back below
    _select_row(key_base, n, kb, out_ptr + b * so_b + r * so_r, key_base + S_MAX, key_base + 2 * S_MAX, KMAX, nsig,
                SRC_KEYS=True, BLOCK_S=BLOCK_S, SAMPLE=SAMPLE)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _budget_args(k, lengths, B: int, strict: bool, k_max: int | None):
    """Returns (K_INT, kb_tensor or None, KMAX)."""
    if isinstance(k, torch.Tensor):
        check(k.dtype in INDEX_DTYPES, f"k as a tensor must be int32/int64, got {k.dtype}")
        check(tuple(k.shape) == (B,), f"k as a tensor must have shape ({B},), got {tuple(k.shape)}")
        check(k.device == lengths.device, f"k is on {k.device}, lengths on {lengths.device}")
        k = k.contiguous()
        if strict:
            check(bool((k >= 1).all()), "every budget in k must be >= 1")
            bad = k > lengths.to(k.dtype)
            check(not bool(bad.any()), f"k larger than the sequence length for sequences "
                                       f"{bad.nonzero().flatten().tolist()} (pass strict=False to clip)")
        if k_max is None:
            k_max = int(k.max().item()) if k.numel() else 1
        _check_k_max(k_max)
        if strict:
            check(not bool((k > k_max).any()), f"k_max={k_max} is smaller than the budgets {k.tolist()}: the "
                                               f"selection would be cut to k_max (pass strict=False to clip)")
        return 0, k, int(k_max)
    check(isinstance(k, int) and not isinstance(k, bool), f"k must be an int or a (B,) int tensor, got {type(k)}")
    check(k >= 1, f"k must be >= 1, got {k}")
    if k_max is not None:
        _check_k_max(k_max)
        if strict:
            check(k_max >= k, f"k_max={k_max} is smaller than k={k}: the selection would be cut to k_max (pass "
                              f"strict=False to clip)")
    if strict:
        bad = lengths < k
        check(not bool(bad.any()), f"k={k} is larger than the length of sequences "
                                   f"{bad.nonzero().flatten().tolist()} (pass strict=False to clip)")
    return int(k), None, int(k if k_max is None else k_max)


def _check_k_max(k_max) -> None:
    check(isinstance(k_max, int) and not isinstance(k_max, bool) and k_max >= 1,
          f"k_max (the index output's width) must be an int >= 1, got {k_max!r}")


# GPU defaults (see kernels/NOTES.md)
SELECT_BLOCK_S = 2048  # elements per tile of a radix / compaction pass
SELECT_WARPS = 8
SELECT_SAMPLE = 1024  # sample size of the bracketing step (rows shorter than 4x this are selected directly)
SELECT_NSIG = 4.0  # bracket half-width in binomial standard deviations
FUSED_BLOCK_N = 512  # tokens per scoring tile in the fused kernel
FUSED_WARPS = 8


def _select_block(block_s=None):
    return 64 if is_interpreter() else (block_s or SELECT_BLOCK_S)


def _select_sample(sample=None):
    """Sample size of the bracketing step; 0 = no bracket (direct radix select on the whole row)."""
    if sample is not None:
        return int(sample)
    return 64 if is_interpreter() else SELECT_SAMPLE


def _workspace(ws, numel: int, device):
    if ws is None:
        return torch.empty(max(numel, 1), dtype=torch.int32, device=device)
    check(ws.dtype == torch.int32 and ws.is_contiguous() and ws.numel() >= numel and ws.device == device,
          f"workspace must be a contiguous int32 tensor of >= {numel} elements on {device}")
    return ws


def topk_select(scores: torch.Tensor, lengths: torch.Tensor, k, strict: bool = True, k_max: int | None = None,
                index_dtype: torch.dtype = torch.int32, out: torch.Tensor | None = None, block_s: int | None = None,
                num_warps: int | None = None, sample: int | None = None, nsig: float | None = None,
                workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k of fp32 ``scores`` (B, G, S_max) over the first lengths[b] positions of each row.

    k: int, or (B,) int tensor of per-sequence budgets.  Each budget is clipped to 1..lengths[b]; with
    ``strict=True`` a budget larger than its sequence's length raises instead (reads lengths on the host: one
    device sync; use strict=False inside CUDA graphs).  Returns indices (B, G, k_max) of ``index_dtype``, in
    unspecified order within a row, padded with -1 beyond each row's budget (k_max = k, or max(k) for a
    tensor).  ``sample``/``nsig`` tune the bracketing step (power-of-2 sample size; the result is exact for
    any values).  ``workspace``: optional int32 buffer of >= B*G*2*S_max elements.
    """
    check(isinstance(scores, torch.Tensor) and scores.dtype == torch.float32,
          f"scores must be a float32 tensor, got {getattr(scores, 'dtype', type(scores))}")
    check(scores.dim() == 3, f"scores must be (B, G, S_max), got {tuple(scores.shape)}")
    check_last_contiguous(scores, "scores")
    B, G, S = scores.shape
    check_lengths(lengths, B, scores.device)
    check(index_dtype in INDEX_DTYPES, f"index_dtype must be int32 or int64, got {index_dtype}")
    check_pow2(block_s, "block_s", 16)
    check_pow2(sample, "sample", 16, zero_ok=True)
    check_pow2(num_warps, "num_warps")
    if strict:
        check_lengths_range(lengths, S, "the scores' S_max")
    K_INT, kb, KMAX = _budget_args(k, lengths, B, strict, k_max)
    if out is None:
        out = torch.empty(B, G, KMAX, dtype=index_dtype, device=scores.device)
    else:
        check_out(out, "out", (B, G, KMAX), INDEX_DTYPES, scores.device)
    ws = _workspace(workspace, B * G * 2 * S, scores.device)
    _topk_kernel[(B * G,)](scores, scores.stride(0), scores.stride(1), out, out.stride(0), out.stride(1), ws,
                           lengths, kb if kb is not None else lengths, K_INT, G, S, KMAX,
                           float(SELECT_NSIG if nsig is None else nsig),
                           HAS_KB=kb is not None, BLOCK_S=_select_block(block_s), SAMPLE=_select_sample(sample),
                           num_warps=4 if is_interpreter() else (num_warps or SELECT_WARPS))
    return out


class SelectArgs(NamedTuple):
    B: int
    KVH: int
    S: int
    d: int
    D: int
    H: int
    R: int
    HPR: int
    K_INT: int
    kb: torch.Tensor | None
    KMAX: int
    rotate: bool
    q_rot_out: torch.Tensor | None


def check_select_inputs(q, k_lr, lengths, k, P, mode, reduce, strict, k_max, q_rot_out) -> SelectArgs:
    """Host-side validation shared by the select launchers (`loki_select`, `bracket.loki_select_bracket`);
    allocates the fp32 q' output when P is given and none was passed."""
    check_slab_dtype(k_lr, "k_lr")
    check(k_lr.dim() == 4, f"k_lr must be (B, KVH, S_max, d), got {tuple(k_lr.shape)}")
    check_last_contiguous(k_lr, "k_lr")
    B, KVH, S, d = k_lr.shape
    check_float(q, "q")
    check(q.dim() == 3 and q.shape[0] == B, f"q must be (B, H, D) with B={B}, got {tuple(q.shape)}")
    D = q.shape[2]
    check(D >= d, f"q head dim {D} is smaller than d={d}")
    H = _check_q(q, "q", B, D, KVH, k_lr.device)
    check_lengths(lengths, B, k_lr.device)
    R, HPR = _mode_params(mode, reduce, H, KVH)
    if strict:
        check_lengths_range(lengths, S)
    K_INT, kb, KMAX = _budget_args(k, lengths, B, strict, k_max)
    rotate = P is not None
    if rotate:
        check_basis(P, KVH, D, k_lr.device)
        q_rot_out = rotation_out(q_rot_out, "q_rot_out", B, H, D, q.device)
    return SelectArgs(B, KVH, S, d, D, H, R, HPR, K_INT, kb, KMAX, rotate, q_rot_out)


def loki_select(q: torch.Tensor, k_lr: torch.Tensor, lengths: torch.Tensor, k, P: torch.Tensor | None = None,
                mode: str = "group", reduce: str = "max", scaling: float | None = None, strict: bool = True,
                k_max: int | None = None, q_rot_out: torch.Tensor | None = None, block_n: int | None = None,
                num_warps: int | None = None, block_s: int | None = None, sample: int | None = None,
                nsig: float | None = None, workspace: torch.Tensor | None = None):
    """Fused front half of a Loki step: (rotate q) + scores + top-k, one program per (sequence, score row).

    q: (B, H, D) raw queries if P is given (then q' = q @ P[kvh] is computed here and returned), else already
    rotated queries.  Returns (idx, q_rot): idx (B, G, k_max) int32 as `topk_select`; q_rot (B, H, D) fp32
    (None when P is None).  scaling defaults to 1/sqrt(D).
    """
    B, KVH, S, d, D, H, R, HPR, K_INT, kb, KMAX, rotate, q_rot_out = check_select_inputs(
        q, k_lr, lengths, k, P, mode, reduce, strict, k_max, q_rot_out)
    check_pow2(block_n, "block_n", 16)
    check_pow2(block_s, "block_s", 16)
    check_pow2(sample, "sample", 16, zero_ok=True)
    check_pow2(num_warps, "num_warps")
    scale = default_scaling(D, scaling)
    ws = _workspace(workspace, B * R * 3 * S, k_lr.device)
    idx = torch.empty(B, R, KMAX, dtype=torch.int32, device=k_lr.device)
    interp = is_interpreter()
    BLOCK_N = 32 if interp else (block_n or FUSED_BLOCK_N)
    nw = 4 if interp else (num_warps or FUSED_WARPS)
    qr = q_rot_out if rotate else q
    Pt = P if rotate else q
    _loki_select_kernel[(B * R,)](
        q, q.stride(0), q.stride(1), Pt, Pt.stride(0), Pt.stride(1), qr, qr.stride(0), qr.stride(1),
        k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2), ws,
        idx, idx.stride(0), idx.stride(1), lengths, kb if kb is not None else lengths, K_INT, scale,
        R, H // KVH, S, KMAX, float(SELECT_NSIG if nsig is None else nsig),
        ROTATE=rotate, HAS_KB=kb is not None, HPR=HPR, G_PAD=max(16, next_pow2(HPR)), G_ROT=next_pow2(HPR), D=D,
        D_LR=d, BLOCK_D=max(32, next_pow2(D)), BLOCK_DL=max(16, next_pow2(d)), BLOCK_N=BLOCK_N,
        BLOCK_S=_select_block(block_s), SAMPLE=_select_sample(sample),
        K_FP32=k_lr.dtype == torch.float32, REDUCE_MAX=reduce == "max", **rot_chunks(max(32, next_pow2(D)), True),
        num_warps=nw)
    return idx, (q_rot_out if rotate else None)


# ----------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------
def budgets_ref(k, lengths) -> list:
    B = lengths.shape[0]
    ks = [int(k[b]) if isinstance(k, torch.Tensor) else int(k) for b in range(B)]
    return [min(max(ks[b], 1), int(lengths[b])) for b in range(B)]


def topk_select_ref(scores: torch.Tensor, lengths: torch.Tensor, k, k_max: int | None = None) -> torch.Tensor:
    """torch.topk per row (clipped budgets), sorted ascending, padded with -1; int64, on scores' device."""
    B, G, S = scores.shape
    kbs = budgets_ref(k, lengths)
    KMAX = k_max if k_max is not None else (int(k.max()) if isinstance(k, torch.Tensor) else int(k))
    out = torch.full((B, G, KMAX), -1, dtype=torch.int64, device=scores.device)
    for b in range(B):
        n, kb = int(lengths[b]), kbs[b]
        if kb <= 0:
            continue
        idx = torch.topk(scores[b, :, :n], kb, dim=-1).indices.sort(dim=-1).values
        out[b, :, :kb] = idx
    return out
