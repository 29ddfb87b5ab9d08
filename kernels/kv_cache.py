"""Rotated KV cache for Loki: layout, `append_kv` (one decode token) and `prefill_kv` (a block of tokens).

Layout (per layer)
------------------
Keys are stored in PCA coordinates, K' = K @ P[kvh] (P orthonormal, columns = principal directions sorted
by variance, so q'.k' = q.k exactly).  The first ``d`` rotated dims live in their own contiguous slab so the
scoring pass of Loki reads only those bytes:

    k_lr   (B, KVH, S_max, d)       rotated dims [0, d)
    k_rest (B, KVH, S_max, D - d)   rotated dims [d, D)
    v      (B, KVH, S_max, D)       values, not rotated
    lengths (B,) int32/int64        number of valid tokens of each sequence

`allocate_cache` puts k_lr and k_rest in one allocation (two slabs back to back, no memory overhead).
Only the last dimension must be contiguous; other strides are passed to the kernels.

Row layouts (session 13, `allocate_cache_rows`): the attention's K rows whole (k_lr and k_rest are views of one
(B, KVH, S_max, D) tensor) or, with V, one (B, KVH, S_max, 2 D) row per token (K' | V), plus a contiguous copy of
the first d rotated dims (``slab``, what the scoring pass reads; `loki_decode(slab=)`, `append_kv(slab=)`).  Memory
overhead: d / (2 D) of the cache (6.25% at d = D/8, 12.5% at D/4).  Measured on the H200 (kernels/NOTES.md "v15"):
the sparse attention gathers one or two rows per selected token instead of three.

Each file of this package holds kernel + launcher + torch reference side by side.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (check, check_basis, check_cache, check_float, check_last_contiguous, check_lengths,
                     check_same_device, check_slab_dtype, next_pow2, SLAB_FP8)


def allocate_cache(batch: int, kv_heads: int, max_len: int, head_dim: int, d: int, dtype=torch.bfloat16,
                   device="cuda"):
    """Allocate an empty rotated cache: returns (k_lr, k_rest, v, lengths) with lengths = 0 (int32)."""
    check(1 <= d <= head_dim, f"d={d} must be in 1..head_dim={head_dim}")
    n = batch * kv_heads * max_len
    kbuf = torch.empty(n * head_dim, dtype=dtype, device=device)
    k_lr = kbuf[: n * d].view(batch, kv_heads, max_len, d)
    k_rest = kbuf[n * d:].view(batch, kv_heads, max_len, head_dim - d)
    v = torch.empty(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
    lengths = torch.zeros(batch, dtype=torch.int32, device=device)
    return k_lr, k_rest, v, lengths


def _slab_dtype_ok(slab_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """A slab holds the cache's dtype, or (session 19, opt-in) e4m3 beside a 16-bit cache."""
    return slab_dtype == cache_dtype or (slab_dtype == SLAB_FP8 and cache_dtype in (torch.float16, torch.bfloat16))


def allocate_cache_rows(batch: int, kv_heads: int, max_len: int, head_dim: int, d: int, dtype=torch.bfloat16,
                        device="cuda", kv: bool = True, slab_dtype=None):
    """Allocate an empty rotated cache in a row layout: returns (k_lr, k_rest, v, lengths, slab).  k_lr / k_rest are
    views of whole rotated K rows ((B, KVH, S_max, D), or with kv=True the first D of (B, KVH, S_max, 2 D) rows whose
    last D are v); slab is a contiguous (B, KVH, S_max, d) copy of k_lr for the scoring pass.  Pass slab to
    `append_kv` / `prefill_kv` (they write it too) and to `kernels.loki_decode`.  slab_dtype (default: dtype) may be
    torch.float8_e4m3fn for a 16-bit cache (session 19, opt-in; see `check_slab`): keys must then stay within
    e4m3's +-448 (the writers saturate), and a positive scale of the whole slab leaves the selection unchanged."""
    check(1 <= d <= head_dim, f"d={d} must be in 1..head_dim={head_dim}")
    slab_dtype = dtype if slab_dtype is None else slab_dtype
    check(_slab_dtype_ok(slab_dtype, dtype),
          f"slab_dtype must be the cache dtype {dtype} or float8_e4m3fn (16-bit caches), got {slab_dtype}")
    if kv:
        rows = torch.empty(batch, kv_heads, max_len, 2 * head_dim, dtype=dtype, device=device)
        k_full, v = rows[..., :head_dim], rows[..., head_dim:]
    else:
        k_full = torch.empty(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        v = torch.empty(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
    slab = torch.empty(batch, kv_heads, max_len, d, dtype=slab_dtype, device=device)
    lengths = torch.zeros(batch, dtype=torch.int32, device=device)
    return k_full[..., :d], k_full[..., d:], v, lengths, slab


def check_slab(slab: torch.Tensor | None, k_lr: torch.Tensor) -> torch.Tensor:
    """The tensor the scoring pass reads: ``slab`` (a row layout's copy of k_lr, same shape / dtype / device,
    last dim contiguous) or, where None, k_lr itself.  Session 19 (opt-in): the slab of a 16-bit cache may be
    float8_e4m3fn (`allocate_cache_rows(slab_dtype=)`): the scoring pass reads half the bytes and scores the fp8 values
    exactly, so the selection is that of the fp8-rounded keys, not of the cache's (not the issue's method)."""
    if slab is None:
        return k_lr
    check(isinstance(slab, torch.Tensor), f"slab must be a tensor or None, got {type(slab).__name__}")
    check(slab.shape == k_lr.shape and _slab_dtype_ok(slab.dtype, k_lr.dtype) and slab.device == k_lr.device,
          f"slab must match k_lr: shape {tuple(k_lr.shape)}, {k_lr.dtype} (or float8_e4m3fn for a 16-bit cache) on "
          f"{k_lr.device}; got {tuple(slab.shape)}, {slab.dtype} on {slab.device}")
    check_slab_dtype(slab, "slab")
    check_last_contiguous(slab, "slab")
    return slab


@triton.jit
def _slab_value(x, ptr):
    """fp32 rotated keys as stored in the slab at `ptr`.  An fp8 (e4m3) slab (session 19): saturated to +-448 and
    rounded to nearest even in fp32 arithmetic (3 mantissa bits; the 2**-9 grid below 2**-6), so that the final
    conversion is exact.  (Triton 3.9's interpreter rounds fp32 -> e4m3 wrongly where the mantissa carries into the
    exponent: 1.97 -> 1.0; the GPU's cvt.rn.satfinite would give the same values as this.)"""
    if ptr.dtype.element_ty.is_fp8():
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
        nrm = u.to(tl.float32, bitcast=True)
        sub = (x + 24576.0) - 24576.0  # (24576 = 1.5 * 2**14: its fp32 ulp is 2**-9)
        x = tl.where(tl.abs(x) < 0.015625, sub, nrm)
    return x.to(ptr.dtype.element_ty)


# ----------------------------------------------------------------------------------------------------------
# append one token
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _append_kv_kernel(kn_ptr, skn_b, skn_h, vn_ptr, svn_b, svn_h,
                      P_ptr, sp_h, sp_r,
                      klr_ptr, slr_b, slr_h, slr_s,
                      krs_ptr, srs_b, srs_h, srs_s,
                      v_ptr, sv_b, sv_h, sv_s,
                      len_ptr, S_MAX, KVH, sl_ptr, ssl_b, ssl_h, ssl_s,
                      D: tl.constexpr, D_LR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                      SLAB: tl.constexpr = False):
    pid = tl.program_id(0)
    b = (pid // KVH).to(tl.int64)
    h = (pid % KVH).to(tl.int64)
    pos = tl.load(len_ptr + b).to(tl.int64)
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    pos_v = pos + 0 * rows  # block-shaped (scalar-bool & block-bool is not portable to the interpreter)
    ok_r = (pos_v >= 0) & (pos_v < S_MAX)
    k = tl.load(kn_ptr + b * skn_b + h * skn_h + rows, mask=rmask, other=0.0).to(tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < D
        pc = tl.load(P_ptr + h * sp_h + rows[:, None] * sp_r + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        kr = tl.sum(k[:, None] * pc, axis=0)
        is_lr = cols < D_LR
        pos_c = pos + 0 * cols
        ok = (pos_c >= 0) & (pos_c < S_MAX)
        tl.store(klr_ptr + b * slr_b + h * slr_h + pos * slr_s + cols,
                 kr.to(klr_ptr.dtype.element_ty), mask=ok & is_lr)
        if SLAB:
            tl.store(sl_ptr + b * ssl_b + h * ssl_h + pos * ssl_s + cols, _slab_value(kr, sl_ptr),
                     mask=ok & is_lr)
        rc = tl.where(is_lr, 0, cols - D_LR)
        tl.store(krs_ptr + b * srs_b + h * srs_h + pos * srs_s + rc,
                 kr.to(krs_ptr.dtype.element_ty), mask=ok & cmask & (cols >= D_LR))
    vv = tl.load(vn_ptr + b * svn_b + h * svn_h + rows, mask=rmask, other=0.0)
    tl.store(v_ptr + b * sv_b + h * sv_h + pos * sv_s + rows, vv.to(v_ptr.dtype.element_ty), mask=ok_r & rmask)


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, P: torch.Tensor, k_lr: torch.Tensor,
              k_rest: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, advance: bool = False,
              strict: bool = True, slab: torch.Tensor | None = None) -> None:
    """Rotate and write one token per sequence at position ``lengths[b]`` (in place); with ``slab`` (a row layout,
    `allocate_cache_rows`) its first d rotated dims go to the slab too.

    k_new, v_new: (B, KVH, D), any float dtype (written rounded to the cache's).  P: (KVH, D, D) (rotation done in
    fp32).  The op does NOT increment ``lengths``
    unless ``advance=True`` (then ``lengths += 1`` after the write).  With ``strict=True`` a sequence whose
    cache is full raises (this reads ``lengths`` on the host: one device sync); with ``strict=False`` such a
    write is silently dropped (no sync, CUDA-graph safe).
    """
    B, KVH, S, D, d = check_cache(k_lr, k_rest, v)
    for n, t in (("k_new", k_new), ("v_new", v_new)):
        check_float(t, n)
        check(tuple(t.shape) == (B, KVH, D), f"{n} must have shape (B, KVH, D) = {(B, KVH, D)}, got {tuple(t.shape)}")
        check_last_contiguous(t, n)
    check_same_device([("k_lr", k_lr), ("k_new", k_new), ("v_new", v_new)])
    check_basis(P, KVH, D, k_lr.device)
    check_lengths(lengths, B, k_lr.device)
    sl = check_slab(slab, k_lr)
    if strict:
        check(bool((lengths >= 0).all()), f"append_kv: negative lengths {lengths.tolist()}")
        check(bool((lengths < S).all()), f"append_kv: a sequence is full (lengths >= S_max={S})")
    BLOCK_D = next_pow2(D)
    _append_kv_kernel[(B * KVH,)](
        k_new, k_new.stride(0), k_new.stride(1), v_new, v_new.stride(0), v_new.stride(1),
        P, P.stride(0), P.stride(1),
        k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2),
        k_rest, k_rest.stride(0), k_rest.stride(1), k_rest.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        lengths, S, KVH, sl, sl.stride(0), sl.stride(1), sl.stride(2),
        D=D, D_LR=d, BLOCK_D=BLOCK_D, BLOCK_C=min(BLOCK_D, 32), SLAB=slab is not None, num_warps=4)
    if advance:
        lengths += 1


# ----------------------------------------------------------------------------------------------------------
# prefill a block of tokens
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _prefill_kv_kernel(k_ptr, sk_b, sk_h, sk_t, vn_ptr, svn_b, svn_h, svn_t,
                       P_ptr, sp_h, sp_r,
                       klr_ptr, slr_b, slr_h, slr_s,
                       krs_ptr, srs_b, srs_h, srs_s,
                       v_ptr, sv_b, sv_h, sv_s,
                       len_ptr, cnt_ptr, T, S_MAX, KVH, sl_ptr, ssl_b, ssl_h, ssl_s,
                       HAS_CNT: tl.constexpr, D: tl.constexpr, D_LR: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SLAB: tl.constexpr = False):
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    b = (pid // KVH).to(tl.int64)
    h = (pid % KVH).to(tl.int64)
    start = tl.load(len_ptr + b).to(tl.int64)
    if HAS_CNT:
        n_b = tl.load(cnt_ptr + b).to(tl.int64)
    else:
        n_b = T
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = start + t
    tmask = (t < n_b) & (t < T) & (pos >= 0) & (pos < S_MAX)
    rows = tl.arange(0, BLOCK_D)
    rmask = rows < D
    kt = tl.load(k_ptr + b * sk_b + h * sk_h + t[:, None] * sk_t + rows[None, :],
                 mask=tmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < D
        pc = tl.load(P_ptr + h * sp_h + rows[:, None] * sp_r + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        kr = tl.dot(kt, pc, input_precision="ieee")
        is_lr = cols < D_LR
        tl.store(klr_ptr + b * slr_b + h * slr_h + pos[:, None] * slr_s + cols[None, :],
                 kr.to(klr_ptr.dtype.element_ty), mask=tmask[:, None] & is_lr[None, :])
        if SLAB:
            tl.store(sl_ptr + b * ssl_b + h * ssl_h + pos[:, None] * ssl_s + cols[None, :],
                     _slab_value(kr, sl_ptr), mask=tmask[:, None] & is_lr[None, :])
        rc = tl.where(is_lr, 0, cols - D_LR)
        tl.store(krs_ptr + b * srs_b + h * srs_h + pos[:, None] * srs_s + rc[None, :],
                 kr.to(krs_ptr.dtype.element_ty), mask=tmask[:, None] & (cmask & (cols >= D_LR))[None, :])
    vv = tl.load(vn_ptr + b * svn_b + h * svn_h + t[:, None] * svn_t + rows[None, :],
                 mask=tmask[:, None] & rmask[None, :], other=0.0)
    tl.store(v_ptr + b * sv_b + h * sv_h + pos[:, None] * sv_s + rows[None, :], vv.to(v_ptr.dtype.element_ty),
             mask=tmask[:, None] & rmask[None, :])


def prefill_kv(k: torch.Tensor, v_new: torch.Tensor, P: torch.Tensor, k_lr: torch.Tensor, k_rest: torch.Tensor,
               v: torch.Tensor, lengths: torch.Tensor, n_new: torch.Tensor | None = None, advance: bool = False,
               strict: bool = True, slab: torch.Tensor | None = None) -> None:
    """Rotate and write a block of T tokens per sequence at positions ``lengths[b] + t`` (in place); with ``slab``
    (a row layout, `allocate_cache_rows`) their first d rotated dims go to the slab too.

    k, v_new: (B, KVH, T, D).  ``n_new`` (optional, (B,) int): only the first ``n_new[b]`` tokens of sequence
    b are written (ragged prefill).  ``advance=True`` adds the written counts to ``lengths``.
    """
    B, KVH, S, D, d = check_cache(k_lr, k_rest, v)
    for n, t in (("k", k), ("v_new", v_new)):
        check_float(t, n)
        check(t.dim() == 4 and tuple(t.shape[:2]) == (B, KVH) and t.shape[3] == D,
              f"{n} must have shape (B, KVH, T, D) with B={B}, KVH={KVH}, D={D}, got {tuple(t.shape)}")
        check_last_contiguous(t, n)
    check(k.shape == v_new.shape, f"k {tuple(k.shape)} and v_new {tuple(v_new.shape)} differ")
    check_same_device([("k_lr", k_lr), ("k", k), ("v_new", v_new)])
    check_basis(P, KVH, D, k_lr.device)
    check_lengths(lengths, B, k_lr.device)
    T = k.shape[2]
    sl = check_slab(slab, k_lr)
    if n_new is not None:
        check_lengths(n_new, B, k_lr.device, "n_new")
    if strict:
        check(bool((lengths >= 0).all()), f"prefill_kv: negative lengths {lengths.tolist()}")
        if n_new is not None:
            check(bool(((n_new >= 0) & (n_new <= T)).all()), f"n_new must be in 0..T={T}, got {n_new.tolist()}")
        cnt = n_new.to(lengths.dtype) if n_new is not None else T
        check(bool(((lengths + cnt) <= S).all()), f"prefill_kv: writing would exceed S_max={S}")
    if T > 0:
        BLOCK_D = next_pow2(D)
        BLOCK_T = 16
        grid = (B * KVH, triton.cdiv(T, BLOCK_T))
        _prefill_kv_kernel[grid](
            k, k.stride(0), k.stride(1), k.stride(2), v_new, v_new.stride(0), v_new.stride(1), v_new.stride(2),
            P, P.stride(0), P.stride(1),
            k_lr, k_lr.stride(0), k_lr.stride(1), k_lr.stride(2),
            k_rest, k_rest.stride(0), k_rest.stride(1), k_rest.stride(2),
            v, v.stride(0), v.stride(1), v.stride(2),
            lengths, n_new if n_new is not None else lengths, T, S, KVH, sl, sl.stride(0), sl.stride(1), sl.stride(2),
            HAS_CNT=n_new is not None, D=D, D_LR=d, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T,
            BLOCK_C=min(BLOCK_D, 32), SLAB=slab is not None, num_warps=4)
    if advance:
        # (n_new clamped to what the kernel writes, 0..T: with strict=False nothing above was checked)
        lengths += (n_new.clamp(0, T).to(lengths.dtype) if n_new is not None else T)


# ----------------------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------------------
def rotate_keys_ref(k: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """K' = K @ P[kvh] in float64; k: (B, KVH, ..., D)."""
    P64 = P.double()
    if k.dim() == 3:
        return torch.einsum("bhd,hde->bhe", k.double(), P64)
    return torch.einsum("bhtd,hde->bhte", k.double(), P64)


def append_kv_ref(k_new, v_new, P, k_lr, k_rest, v, lengths):
    """Reference of `append_kv` on clones; returns the new (k_lr, k_rest, v)."""
    k_lr, k_rest, v = k_lr.clone(), k_rest.clone(), v.clone()
    d = k_lr.shape[-1]
    kr = rotate_keys_ref(k_new, P)
    for b in range(k_lr.shape[0]):
        p = int(lengths[b])
        if 0 <= p < k_lr.shape[2]:
            k_lr[b, :, p] = kr[b, :, :d].to(k_lr.dtype)
            k_rest[b, :, p] = kr[b, :, d:].to(k_rest.dtype)
            v[b, :, p] = v_new[b].to(v.dtype)
    return k_lr, k_rest, v


def prefill_kv_ref(k, v_new, P, k_lr, k_rest, v, lengths, n_new=None):
    k_lr, k_rest, v = k_lr.clone(), k_rest.clone(), v.clone()
    d = k_lr.shape[-1]
    kr = rotate_keys_ref(k, P)
    for b in range(k_lr.shape[0]):
        p = int(lengths[b])
        n = k.shape[2] if n_new is None else int(n_new[b])
        k_lr[b, :, p:p + n] = kr[b, :, :n, :d].to(k_lr.dtype)
        k_rest[b, :, p:p + n] = kr[b, :, :n, d:].to(k_rest.dtype)
        v[b, :, p:p + n] = v_new[b, :, :n].to(v.dtype)
    return k_lr, k_rest, v
