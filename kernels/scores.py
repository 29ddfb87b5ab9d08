"""Loki approximate scores: q'[:d] . k'[:d] against the low-rank key slab, and the query rotation q' = q @ P.

Score of token j for query head h:  s[h, j] = scaling * sum_{i<d} q'_h[i] * k_lr[j, i]   (fp32).
mode="group": one score row per KV head, combining its g = H / KVH query heads (reduce="max": max over heads of
the scaled scores, reduce="sum": their sum), so that one selection serves the whole group.
mode="head": one row per query head (the paper's per-head selection).
Positions j >= lengths[b] get -inf.

16-bit caches: the dot runs on tensor cores with q split in two 16-bit halves (q = q_hi + q_lo), which keeps the
scores within ~1e-5 relative of fp32; since session 19 both halves share one MMA operand where they fit its 16
columns (`_q_operands`), so it costs no extra MMA there.  fp32 caches use an IEEE fp32 dot.  An fp8 (e4m3) slab
(session 19, opt-in) is widened to fp16 in the tile, against fp16 halves of q.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import (check, check_basis, check_float, check_last_contiguous, check_lengths, check_lengths_range,
                     check_out, check_slab_dtype, default_scaling, is_interpreter, next_pow2, pdl_trigger, rotation_out)


# ----------------------------------------------------------------------------------------------------------
# shared jit helpers (also used by the fused select kernel in topk.py)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(q_ptr, sq_b, sq_h, P_ptr, sp_h, sp_r, out_ptr, so_b, so_h, b, h0, kvh,
                  HPR: tl.constexpr, G_ROT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """out[b, h0 + i] = q[b, h0 + i] @ P[kvh] in fp32 FMAs (i < HPR).

    (An IEEE fp32 tl.dot with these tiny shapes took ~60 us on an H200; broadcast-multiply-reduce takes ~2.)"""
    hh = tl.arange(0, G_ROT)
    hv = hh < HPR
    q_rows = q_ptr + b * sq_b + (h0 + hh) * sq_h
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cm = cols < D
        acc = tl.zeros([G_ROT, BLOCK_C], dtype=tl.float32)
        for i0 in tl.static_range(0, BLOCK_D, BLOCK_I):
            ii = i0 + tl.arange(0, BLOCK_I)
            im = ii < D
            qc = tl.load(q_rows[:, None] + ii[None, :], mask=hv[:, None] & im[None, :], other=0.0).to(tl.float32)
            pc = tl.load(P_ptr + kvh * sp_h + ii[:, None] * sp_r + cols[None, :], mask=im[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(qc[:, :, None] * pc[None, :, :], axis=1)
        tl.store(out_ptr + b * so_b + (h0 + hh)[:, None] * so_h + cols[None, :], acc, mask=hv[:, None] & cm[None, :])


@triton.jit
def _row_of(pid, R, HPR: tl.constexpr, G):
    """(b, r, first query head h0, KV head) of score row pid (rows ordered (sequence, row))."""
    b = (pid // R).to(tl.int64)
    r = (pid % R).to(tl.int64)
    h0 = r * HPR
    return b, r, h0, h0 // G


@triton.jit
def _load_q_lr_T(q_ptr, sq_b, sq_h, b, h0, HPR: tl.constexpr, G_PAD: tl.constexpr, D_LR: tl.constexpr,
                 BLOCK_DL: tl.constexpr):
    hh = tl.arange(0, G_PAD)
    dl = tl.arange(0, BLOCK_DL)
    return tl.load(q_ptr + b * sq_b + (h0 + hh)[None, :] * sq_h + dl[:, None],
                   mask=(dl < D_LR)[:, None] & (hh < HPR)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _score_tile(k_base, s_tok, offs, valid, qT, qT_hi, qT_lo, D_LR: tl.constexpr, BLOCK_DL: tl.constexpr,
                HPR: tl.constexpr, G_PAD: tl.constexpr, K_FP32: tl.constexpr, REDUCE_MAX: tl.constexpr,
                EVICT_FIRST: tl.constexpr = False):
    """Scores of BLOCK_N tokens (rows `offs`) against the HPR (scaled) query heads; reduced over heads -> (BLOCK_N,).
    EVICT_FIRST: the slab tile is read evict_first (read once: keep it from displacing what is read again soon)."""
    dl = tl.arange(0, BLOCK_DL)
    if EVICT_FIRST:
        kt = tl.load(k_base + offs.to(tl.int64)[:, None] * s_tok + dl[None, :],
                     mask=valid[:, None] & (dl < D_LR)[None, :], other=0.0, eviction_policy="evict_first")
    else:
        kt = tl.load(k_base + offs.to(tl.int64)[:, None] * s_tok + dl[None, :],
                     mask=valid[:, None] & (dl < D_LR)[None, :], other=0.0)
    if K_FP32:
        s = tl.dot(kt.to(tl.float32), qT, input_precision="ieee")
    else:
        if kt.dtype.is_fp8():  # an fp8 slab (session 19, opt-in): exact in fp16, against fp16 halves of q'
            kt = kt.to(tl.float16)
        if SCORES_PACK and 2 * HPR <= G_PAD:  # (`_q_operands`: qT_hi holds hi_0, lo_0, hi_1, lo_1, ...)
            s2 = tl.dot(kt, qT_hi)
            s_hi, s_lo = tl.split(tl.reshape(s2, (s2.shape[0], G_PAD // 2, 2)))
            s = s_hi + s_lo
        else:
            s = tl.dot(kt, qT_hi)
            s = tl.dot(kt, qT_lo, s)
    if HPR == 1:
        sc = tl.sum(s, axis=1)  # padded head columns are exactly 0
    elif REDUCE_MAX:
        hh = tl.arange(0, s.shape[1])
        sc = tl.max(tl.where((hh < HPR)[None, :], s, float("-inf")), axis=1)
    else:
        sc = tl.sum(s, axis=1)
    return sc


# session 19: the hi and lo halves of q' interleaved in one MMA operand where both fit the G_PAD (>= 16) columns the
# MMA needs anyway (2 * heads per row <= G_PAD: GQA groups of up to 8 heads), so each score tile takes one dot instead
# of two.  KERNELS_SCORES_PACK=0 in the environment (at import): two dots, as before (for A/B runs)
SCORES_PACK = tl.constexpr(os.environ.get("KERNELS_SCORES_PACK", "1") != "0")


@triton.jit
def _q_operands(qT, dtype: tl.constexpr, HPR: tl.constexpr, G_PAD: tl.constexpr):
    """(qT_hi, qT_lo): the 16-bit operands `_score_tile` multiplies each key tile by, from the scaled fp32 qT
    (BLOCK_DL, G_PAD; zero beyond HPR columns).  Packed (SCORES_PACK, 2 * HPR <= G_PAD): qT_hi's columns are
    hi_0, lo_0, hi_1, lo_1, ... of the first G_PAD / 2 heads (qT_lo the same tensor, unused)."""
    if SCORES_PACK and 2 * HPR <= G_PAD:
        first, _ = tl.split(tl.permute(tl.reshape(qT, (qT.shape[0], 2, G_PAD // 2)), (0, 2, 1)))
        hi, lo = _split_hi_lo(first, dtype)
        packed = tl.reshape(tl.join(hi, lo), (qT.shape[0], G_PAD))
        return packed, packed
    else:
        return _split_hi_lo(qT, dtype)


@triton.jit
def _split_hi_lo(x, dtype: tl.constexpr):
    """x (fp32) as hi + lo in the 16-bit dtype of the tiles it meets in a dot; for an fp8 slab (whose tiles
    `_score_tile` widens to fp16, exactly) in fp16."""
    hi = x.to(dtype)
    if hi.dtype.is_fp8():  # (a tensor's dtype, not the constexpr's: portable across Triton versions)
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
    else:
        lo = (x - hi.to(tl.float32)).to(dtype)
    return hi, lo


def rot_chunks(block_d: int, whole_rows: bool = False) -> dict:
    """Chunking of the FMA rotation (interpreter: one chunk).  On the GPU each chunk is one load round trip, so
    few chunks are better: whole input rows (ROT_I = D) for the per-row rotations of rotate_q / loki_select."""
    if is_interpreter():
        return dict(ROT_C=block_d, ROT_I=block_d)
    return dict(ROT_C=32, ROT_I=block_d if whole_rows else 32)


# ----------------------------------------------------------------------------------------------------------
# rotate q
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_q_kernel(q_ptr, sq_b, sq_h, P_ptr, sp_h, sp_r, out_ptr, so_b, so_h, KVH, zero_ptr,
                     G: tl.constexpr, G_ROT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     ROT_C: tl.constexpr, PDL: tl.constexpr = False, ZERO_ROWS: tl.constexpr = 0,
                     ZERO_STRIDE: tl.constexpr = 1, ZERO_P2: tl.constexpr = 1):
    """One program per (sequence, KV head, chunk of ROT_C output columns): out = q @ P[kvh][:, chunk], fp32 FMAs,
    whole input rows in one load (one memory round trip per program).  PDL (session 11, an option): the next kernel,
    launched with launch_pdl=True, may start at once (it waits for q' itself).  ZERO_ROWS > 0 (session 13, the
    bracket path's row flow): the column-0 program of (sequence, KV head) p zeroes zero_ptr[(p * ZERO_ROWS + j) *
    ZERO_STRIDE] for j < ZERO_ROWS (the per-row counters the next kernels count their finished programs in)."""
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    if ZERO_ROWS > 0:
        if tl.program_id(1) == 0:
            zj = tl.arange(0, ZERO_P2)  # (ZERO_P2: the power of 2 >= ZERO_ROWS)
            tl.store(zero_ptr + (pid * ZERO_ROWS + zj) * ZERO_STRIDE, tl.zeros([ZERO_P2], dtype=tl.int32),
                     mask=zj < ZERO_ROWS)
    b = (pid // KVH).to(tl.int64)
    kvh = (pid % KVH).to(tl.int64)
    hh = tl.arange(0, G_ROT)
    hv = hh < G
    ii = tl.arange(0, BLOCK_D)
    im = ii < D
    cols = tl.program_id(1) * ROT_C + tl.arange(0, ROT_C)
    cm = cols < D
    q_rows = q_ptr + b * sq_b + (kvh * G + hh) * sq_h
    qc = tl.load(q_rows[:, None] + ii[None, :], mask=hv[:, None] & im[None, :], other=0.0).to(tl.float32)
    pc = tl.load(P_ptr + kvh * sp_h + ii[:, None] * sp_r + cols[None, :], mask=im[:, None] & cm[None, :],
                 other=0.0).to(tl.float32)
    acc = tl.sum(qc[:, :, None] * pc[None, :, :], axis=1)
    tl.store(out_ptr + b * so_b + (kvh * G + hh)[:, None] * so_h + cols[None, :], acc, mask=hv[:, None] & cm[None, :])


ROTATE_COLS = 0  # output columns per rotation program; 0: 128 // next_pow2(g), at least 8 (session 11: 32 at g = 4
#                  measured 0.4-1 us faster per step than the 16 of sessions 5-10, h200_variants_s11b)
# session 15: 2 warps per rotation program (was 4): the rotation alone 4.41 -> 3.36 us at batch 16 (2.46 -> 2.56 at
# batch 1), the step 0.1-3.9 us faster at 8 of 9 batch-16 points, 0.4 slower at one (h200_rotate_probe_s15,
# h200_variants_s15i).  Measured slower: 8 warps (+3.4 us alone) and the reduction over the input dimension in chunks
# of 16-64 (ROTATE_CHUNK, 2e3cf06: the step 4-11 us slower, h200_variants_s15h)
ROTATE_WARPS = 2


def launch_rotate_q(q: torch.Tensor, P: torch.Tensor, out: torch.Tensor, KVH: int, g: int, D: int, pdl: bool = False,
                    zero: torch.Tensor | None = None, zero_rows: int = 0, zero_stride: int = 1):
    """q (B, H, D) @ P[h // g] -> out (fp32), no checks (callers validate).  pdl: let the next kernel start early.
    zero / zero_rows / zero_stride: int32 counters to zero, zero_rows per (sequence, KV head)."""
    BLOCK_D = max(16, next_pow2(D))
    G_ROT = next_pow2(g)
    rot_c = BLOCK_D if is_interpreter() else (ROTATE_COLS or max(8, min(BLOCK_D, 128 // G_ROT)))
    _rotate_q_kernel[(q.shape[0] * KVH, triton.cdiv(D, rot_c))](
        q, q.stride(0), q.stride(1), P, P.stride(0), P.stride(1), out, out.stride(0), out.stride(1), KVH,
        zero if zero is not None else out, G=g, G_ROT=G_ROT, D=D, BLOCK_D=BLOCK_D, ROT_C=rot_c, PDL=pdl,
        ZERO_ROWS=zero_rows if zero is not None else 0, ZERO_STRIDE=zero_stride, ZERO_P2=next_pow2(max(1, zero_rows)),
        num_warps=4 if is_interpreter() else ROTATE_WARPS)
    return out


def _check_q(q: torch.Tensor, name: str, B: int, D: int, KVH: int, device):
    check_float(q, name)
    check(q.dim() == 3 and q.shape[0] == B and q.shape[2] == D,
          f"{name} must have shape (B, H, D) with B={B}, D={D}, got {tuple(q.shape)}")
    H = q.shape[1]
    check(H % KVH == 0, f"number of query heads H={H} must be a multiple of KV heads KVH={KVH}")
    check_last_contiguous(q, name)
    check(q.device == device, f"{name} is on {q.device}, expected {device}")
    return H


def rotate_q(q: torch.Tensor, P: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """q' = q @ P[h // g] for every query head; q (B, H, D), P (KVH, D, D) -> fp32 (B, H, D)."""
    check_float(P, "P")
    check(P.dim() == 3 and P.shape[1] == P.shape[2], f"P must be (KVH, D, D), got {tuple(P.shape)}")
    KVH, D = P.shape[0], P.shape[1]
    check_last_contiguous(P, "P")
    check(q.dim() == 3, f"q must be (B, H, D), got {tuple(q.shape)}")
    H = _check_q(q, "q", q.shape[0], D, KVH, P.device)
    B = q.shape[0]
    out = rotation_out(out, "out", B, H, D, q.device)
    return launch_rotate_q(q, P, out, KVH, H // KVH, D)


def rotate_q_ref(q: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    B, H, D = q.shape
    KVH = P.shape[0]
    g = H // KVH
    return torch.einsum("bkgd,kde->bkge", q.double().view(B, KVH, g, D), P.double()).reshape(B, H, D)


# ----------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _scores_kernel(q_ptr, sq_b, sq_h, klr_ptr, slr_b, slr_h, slr_s, out_ptr, so_b, so_r, len_ptr,
                   scale, R, G, S_MAX,
                   HPR: tl.constexpr, G_PAD: tl.constexpr, D_LR: tl.constexpr, BLOCK_DL: tl.constexpr,
                   BLOCK_N: tl.constexpr, TILES: tl.constexpr, K_FP32: tl.constexpr, REDUCE_MAX: tl.constexpr):
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    b = (pid // R).to(tl.int64)
    r = pid % R
    h0 = r * HPR
    kvh = (h0 // G).to(tl.int64)
    n = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S_MAX)
    qT = _load_q_lr_T(q_ptr, sq_b, sq_h, b, h0, HPR, G_PAD, D_LR, BLOCK_DL) * scale
    qT_hi, qT_lo = _q_operands(qT, klr_ptr.dtype.element_ty, HPR, G_PAD)
    k_base = klr_ptr + b * slr_b + kvh * slr_h
    o_base = out_ptr + b * so_b + r * so_r
    for i in tl.static_range(TILES):
        offs = (tb * TILES + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs < n
        sc = _score_tile(k_base, slr_s, offs, valid, qT, qT_hi, qT_lo, D_LR, BLOCK_DL, HPR, G_PAD, K_FP32,
                         REDUCE_MAX)
        sc = tl.where(valid, sc, float("-inf"))
        tl.store(o_base + offs, sc, mask=offs < S_MAX)


# GPU defaults (see kernels/NOTES.md), by low-rank dim d (the entry of the largest key <= d is used)
SCORES_CONFIG = {0: dict(block_n=256, tiles=4, num_warps=4), 32: dict(block_n=128, tiles=2, num_warps=4)}


def scores_config(d: int) -> dict:
    return dict(SCORES_CONFIG[max(k for k in SCORES_CONFIG if k <= d)])


def _mode_params(mode: str, reduce: str, H: int, KVH: int):
    check(mode in ("group", "head"), f"mode must be 'group' or 'head', got {mode!r}")
    check(reduce in ("max", "sum"), f"reduce must be 'max' or 'sum', got {reduce!r}")
    g = H // KVH
    if mode == "group":
        return KVH, g  # rows, heads per row
    return H, 1


def loki_scores(q_rot: torch.Tensor, k_lr: torch.Tensor, lengths: torch.Tensor, d: int | None = None,
                mode: str = "group", reduce: str = "max", scaling: float | None = None, head_dim: int | None = None,
                out: torch.Tensor | None = None, config: dict | None = None, P: torch.Tensor | None = None,
                q_rot_out: torch.Tensor | None = None, strict: bool = True) -> torch.Tensor:
    """Approximate Loki scores.

    q_rot: (B, H, D') rotated queries (any float dtype; only the first d dims are read, D' >= d).
    If P (KVH, D, D) is given, q_rot is the *raw* q instead: it is rotated first (`rotate_q`'s kernel, one more
    launch) and the full q' = q @ P (fp32) is written to ``q_rot_out`` (allocated if None; returned as the second
    value).  (A rotation inside the scoring programs was measured slower, kernels/NOTES.md v16 / v22, and its
    bf16 variant did not compile on Triton 3.6; it was removed in session 21.)
    k_lr: (B, KVH, S_max, d) low-rank key slab.  lengths: (B,) int.  d: must equal k_lr.shape[-1] if given.
    scaling: defaults to 1/sqrt(head_dim) with head_dim = q_rot.shape[-1] unless given.
    Returns fp32 scores (B, KVH, S_max) for mode="group" or (B, H, S_max) for mode="head", -inf beyond lengths.
    strict=True (the default) reads lengths on the host (one device sync) and refuses one outside 0..S_max; pass
    strict=False inside CUDA graphs and in decode loops (then lengths are clipped to S_max on the device).
    """
    check_slab_dtype(k_lr, "k_lr")
    check(k_lr.dim() == 4, f"k_lr must be (B, KVH, S_max, d), got {tuple(k_lr.shape)}")
    check_last_contiguous(k_lr, "k_lr")
    B, KVH, S, dd = k_lr.shape
    if d is not None:
        check(int(d) == dd, f"d={d} does not match the low-rank slab k_lr (last dim {dd})")
    check_float(q_rot, "q_rot")
    check(q_rot.dim() == 3 and q_rot.shape[0] == B and q_rot.shape[2] >= dd,
          f"q_rot must be (B, H, D) with B={B} and D >= d={dd}, got {tuple(q_rot.shape)}")
    check_last_contiguous(q_rot, "q_rot")
    check(q_rot.device == k_lr.device, f"q_rot is on {q_rot.device}, k_lr on {k_lr.device}")
    H = q_rot.shape[1]
    check(H % KVH == 0, f"H={H} must be a multiple of KVH={KVH}")
    check_lengths(lengths, B, k_lr.device)
    if strict:
        check_lengths_range(lengths, S)
    R, HPR = _mode_params(mode, reduce, H, KVH)
    scale = default_scaling(head_dim if head_dim is not None else q_rot.shape[2], scaling)
    Dq = q_rot.shape[2]
    rotate = P is not None
    if rotate:
        check_basis(P, KVH, Dq, k_lr.device)
        q_rot_out = rotation_out(q_rot_out, "q_rot_out", B, H, Dq, k_lr.device)
    if out is None:
        out = torch.empty(B, R, S, dtype=torch.float32, device=k_lr.device)
    else:
        check_out(out, "out", (B, R, S), (torch.float32,), k_lr.device)
    if is_interpreter():
        BLOCK_N, TILES, nw = 32, 1, 4
    else:
        cfg = dict(scores_config(dd), **(config or {}))
        BLOCK_N, TILES, nw = cfg["block_n"], cfg["tiles"], cfg["num_warps"]
    grid = (B * R, triton.cdiv(S, BLOCK_N * TILES))
    qr = launch_rotate_q(q_rot, P, q_rot_out, KVH, H // KVH, Dq) if rotate else q_rot
    _scores_kernel[grid](qr, qr.stride(0), qr.stride(1), k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2),
                         out, out.stride(0), out.stride(1), lengths, scale, R, H // KVH, S,
                         HPR=HPR, G_PAD=max(16, next_pow2(HPR)), D_LR=dd, BLOCK_DL=max(16, next_pow2(dd)),
                         BLOCK_N=BLOCK_N, TILES=TILES, K_FP32=k_lr.dtype == torch.float32,
                         REDUCE_MAX=reduce == "max", num_warps=nw)
    return (out, q_rot_out) if rotate else out


def loki_scores_ref(q_rot, k_lr, lengths, mode="group", reduce="max", scaling=None, head_dim=None):
    """float64 reference of `loki_scores`."""
    B, KVH, S, d = k_lr.shape
    H = q_rot.shape[1]
    g = H // KVH
    scale = default_scaling(head_dim if head_dim is not None else q_rot.shape[2], scaling)
    kk = k_lr.double().repeat_interleave(g, dim=1)  # (B, H, S, d)
    s = scale * torch.einsum("bhd,bhsd->bhs", q_rot[..., :d].double(), kk)
    if mode == "group":
        s = s.view(B, KVH, g, S)
        s = s.amax(2) if reduce == "max" else s.sum(2)
    pos = torch.arange(S, device=k_lr.device)
    return s.masked_fill(pos[None, None, :] >= lengths.to(k_lr.device)[:, None, None], float("-inf"))
