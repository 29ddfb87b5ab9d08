import pytest
import torch

from kernels import LokiInputError, allocate_cache, append_kv, prefill_kv
from kernels.kv_cache import append_kv_ref, prefill_kv_ref
from kernels.testing import random_orthonormal

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative (fp16: 2^-11, bf16: 2^-8 per rounding)


def _poisoned_cache(B, KVH, S, D, d, dtype):
    k_lr, k_rest, v, lengths = allocate_cache(B, KVH, S, D, d, dtype=dtype, device=DEV)
    for t in (k_lr, k_rest, v):
        t.fill_(float("nan"))
    return k_lr, k_rest, v


def _same(a, b):
    """|a - b| relative to 1 + |b| (16-bit caches: one rounding of the rotated keys), 0 where both are NaN."""
    a, b = a.double().cpu(), b.double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return torch.where(both_nan, torch.zeros_like(a), (a - b).abs() / (1 + b.abs()))


@pytest.mark.parametrize("D,d", [(64, 8), (128, 32)])
def test_append_kv(dtype, D, d):
    B, KVH, S = 3, 2, 12
    k_lr, k_rest, v = _poisoned_cache(B, KVH, S, D, d, dtype)
    lengths = torch.tensor([0, 5, 11], dtype=torch.int32, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    kn = torch.randn(B, KVH, D, device=DEV).to(dtype)
    vn = torch.randn(B, KVH, D, device=DEV).to(dtype)
    ref = append_kv_ref(kn.cpu(), vn.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu())
    append_kv(kn, vn, P, k_lr, k_rest, v, lengths, advance=True)
    assert lengths.tolist() == [1, 6, 12]
    tol = TOL[dtype]
    for got, want in zip((k_lr, k_rest, v), ref):
        assert _same(got, want).max().item() <= tol
    # the cache is full for sequence 2 now
    with pytest.raises(LokiInputError, match="full"):
        append_kv(kn, vn, P, k_lr, k_rest, v, lengths)
    # strict=False drops the write to the full sequence silently and writes the others
    before = [t.clone() for t in (k_lr, k_rest, v)]
    append_kv(kn, vn, P, k_lr, k_rest, v, lengths, strict=False)
    for got, was in zip((k_lr, k_rest, v), before):
        assert _same(got[2], was[2]).max().item() == 0
        assert torch.isnan(got[:2]).sum() < torch.isnan(was[:2]).sum()  # written into the poisoned slots


def test_prefill_kv(dtype):
    B, KVH, S, D, d, T = 2, 3, 40, 64, 16, 21
    k_lr, k_rest, v = _poisoned_cache(B, KVH, S, D, d, dtype)
    lengths = torch.tensor([0, 7], dtype=torch.int32, device=DEV)
    n_new = torch.tensor([21, 13], dtype=torch.int32, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    k = torch.randn(B, KVH, T, D, device=DEV).to(dtype)
    vn = torch.randn(B, KVH, T, D, device=DEV).to(dtype)
    ref = prefill_kv_ref(k.cpu(), vn.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(), n_new.cpu())
    prefill_kv(k, vn, P, k_lr, k_rest, v, lengths, n_new=n_new, advance=True)
    assert lengths.tolist() == [21, 20]
    tol = TOL[dtype]
    for got, want in zip((k_lr, k_rest, v), ref):
        assert _same(got, want).max().item() <= tol


def test_cache_bad_inputs():
    B, KVH, S, D, d = 2, 2, 8, 64, 16
    k_lr, k_rest, v, lengths = allocate_cache(B, KVH, S, D, d, dtype=torch.float32, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    kn = torch.randn(B, KVH, D, device=DEV)
    with pytest.raises(LokiInputError, match="k_new"):
        append_kv(kn[:, :1], kn, P, k_lr, k_rest, v, lengths)
    with pytest.raises(LokiInputError, match="dtype"):
        append_kv(kn, kn, P, k_lr.half(), k_rest, v, lengths)
    with pytest.raises(LokiInputError, match="P must have shape"):
        append_kv(kn, kn, P[:, :32, :32].contiguous(), k_lr, k_rest, v, lengths)
    with pytest.raises(LokiInputError, match="k_rest"):
        append_kv(kn, kn, P, k_lr, k_rest[..., :-1], v, lengths)
    with pytest.raises(LokiInputError, match="contiguous"):
        append_kv(torch.randn(B, KVH, 2 * D, device=DEV)[..., ::2], kn, P, k_lr, k_rest, v, lengths)
    with pytest.raises(LokiInputError, match="lengths"):
        append_kv(kn, kn, P, k_lr, k_rest, v, lengths.float())
    with pytest.raises(LokiInputError, match="exceed"):
        prefill_kv(torch.randn(B, KVH, 9, D, device=DEV), torch.randn(B, KVH, 9, D, device=DEV), P,
                   k_lr, k_rest, v, lengths)


@pytest.mark.parametrize("kv", [True, False])
def test_row_layout_append_and_prefill(dtype, kv):
    """allocate_cache_rows (session 13): k_lr / k_rest (/ v) are views of whole rows, the slab a contiguous copy of
    k_lr; append_kv and prefill_kv with slab= write the slab too, the rest exactly as the slab layout."""
    from kernels import allocate_cache_rows
    B, KVH, S, D, d, T = 2, 3, 40, 64, 16, 21
    k_lr, k_rest, v, lengths, slab = allocate_cache_rows(B, KVH, S, D, d, dtype=dtype, device=DEV, kv=kv)
    assert k_lr.shape == slab.shape == (B, KVH, S, d) and k_rest.shape == (B, KVH, S, D - d)
    assert slab.is_contiguous() and k_lr.stride(2) == (2 * D if kv else D) and v.stride(2) == (2 * D if kv else D)
    if kv:  # one K' | V row per token
        assert v.data_ptr() == k_lr.data_ptr() + D * k_lr.element_size()
    for t in (k_lr, k_rest, v, slab):
        t.fill_(float("nan"))
    P = random_orthonormal(KVH, D, DEV)
    k = torch.randn(B, KVH, T, D, device=DEV).to(dtype)
    vn = torch.randn(B, KVH, T, D, device=DEV).to(dtype)
    n_new = torch.tensor([21, 13], dtype=torch.int32, device=DEV)
    ref = prefill_kv_ref(k.cpu(), vn.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(), n_new.cpu())
    prefill_kv(k, vn, P, k_lr, k_rest, v, lengths, n_new=n_new, advance=True, slab=slab)
    kn, vv = k[:, :, 0].contiguous(), vn[:, :, 0].contiguous()
    ref = append_kv_ref(kn.cpu(), vv.cpu(), P.cpu(), *ref, lengths.cpu())
    append_kv(kn, vv, P, k_lr, k_rest, v, lengths, advance=True, slab=slab)
    assert lengths.tolist() == [22, 14]
    tol = TOL[dtype]
    for got, want in zip((k_lr, k_rest, v, slab), ref + (ref[0],)):
        assert _same(got, want).max().item() <= tol
    assert _same(slab, k_lr).max().item() == 0  # the same rounded values
    with pytest.raises(LokiInputError, match="slab must match k_lr"):
        append_kv(kn, vv, P, k_lr, k_rest, v, lengths, slab=slab[..., :d - 1])
