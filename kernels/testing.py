"""Helpers for tests and benchmarks: random caches, orthonormal P, selection checks."""
from __future__ import annotations

import torch


def random_orthonormal(kv_heads: int, D: int, device="cpu", generator=None) -> torch.Tensor:
    """(KVH, D, D) fp32 orthonormal matrices (row-major contiguous)."""
    a = torch.randn(kv_heads, D, D, generator=generator, dtype=torch.float64)
    qm, _ = torch.linalg.qr(a)
    return qm.to(torch.float32).contiguous().to(device)


def random_cache(B, KVH, S, D, d, dtype, device, lengths=None, generator=None):
    """Random rotated cache (k_lr, k_rest, v, lengths) with values ~ N(0, 1) (positions >= length are random too)."""
    k_lr = torch.randn(B, KVH, S, d, generator=generator).to(dtype).to(device)
    k_rest = torch.randn(B, KVH, S, D - d, generator=generator).to(dtype).to(device)
    v = torch.randn(B, KVH, S, D, generator=generator).to(dtype).to(device)
    if lengths is None:
        lengths = torch.full((B,), S, dtype=torch.int32)
    lengths = torch.as_tensor(lengths, dtype=torch.int32).to(device)
    return k_lr, k_rest, v, lengths


def rows_copy(k_lr, k_rest, v, lengths=None, kv: bool = True):
    """The same cache values in a row layout (`kv_cache.allocate_cache_rows`): (k_lr, k_rest, v, lengths, slab);
    lengths copied where given, else zeros."""
    from .kv_cache import allocate_cache_rows
    B, KVH, S, d = k_lr.shape
    rows = allocate_cache_rows(B, KVH, S, v.shape[-1], d, dtype=k_lr.dtype, device=k_lr.device, kv=kv)
    for dst, src in zip(rows, (k_lr, k_rest, v, lengths, k_lr)):
        if src is not None:
            dst.copy_(src)
    return rows


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    assert not torch.isnan(x).any(), "NaN in output"
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def check_selection(idx: torch.Tensor, ref_scores: torch.Tensor, lengths, budgets, tol: float):
    """Check a selection against float64 reference scores.

    For every row: the first k_b entries are distinct valid positions, the rest are -1, and the selected set is a
    top-k_b set of the reference scores up to `tol` (every selected score >= the k_b-th largest - tol, every
    unselected one <= it + tol).  Where the gap at the boundary exceeds 2*tol the set must equal the reference
    top-k exactly.  Returns (rows checked, rows compared exactly).
    """
    idx = idx.long().cpu()
    ref = ref_scores.double().cpu()
    B, G, KMAX = idx.shape
    exact = 0
    for b in range(B):
        n, kb = int(lengths[b]), int(budgets[b])
        for r in range(G):
            row = idx[b, r]
            assert (row[kb:] == -1).all(), f"row ({b},{r}): padding beyond k_b={kb} is not -1: {row[kb:]}"
            sel = row[:kb]
            assert ((sel >= 0) & (sel < n)).all(), f"row ({b},{r}): index out of [0, {n}): {sel}"
            assert sel.unique().numel() == kb, f"row ({b},{r}): duplicate indices"
            if kb == 0:
                continue
            vals = ref[b, r, :n]
            srt = vals.sort(descending=True).values
            vk = srt[kb - 1].item()
            mask = torch.zeros(n, dtype=torch.bool)
            mask[sel] = True
            assert vals[mask].min().item() >= vk - tol, f"row ({b},{r}): selected a score below the k-th"
            if kb < n:
                assert vals[~mask].max().item() <= vk + tol, f"row ({b},{r}): missed a score above the k-th"
                if srt[kb - 1].item() - srt[kb].item() > 2 * tol:
                    want = torch.topk(vals, kb).indices.sort().values
                    assert torch.equal(sel.sort().values, want), f"row ({b},{r}): selection differs"
                    exact += 1
            else:
                exact += 1
    return B * G, exact


def capture_graph(fn, n_calls: int = 1) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``n_calls`` calls of fn(), captured after two warm-up calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_calls):
            fn()
    return g
