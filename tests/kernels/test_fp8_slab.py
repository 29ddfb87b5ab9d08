"""An fp8 (e4m3) scoring slab (session 19, opt-in): `allocate_cache_rows(slab_dtype=torch.float8_e4m3fn)`.

The scoring pass then reads half the bytes and scores the fp8 values exactly (tiles widened to fp16, q' in two fp16
halves), so the selection is the exact top-k of the fp8-rounded keys' scores; the attention still reads the cache's
16-bit K and V rows.  The float64 references below score `slab.double()`, which defines that semantics.  CPU: fp16
cache under the interpreter; GPU: bf16."""
import pytest
import torch

from kernels import LokiInputError, loki_decode
from kernels.kv_cache import allocate_cache_rows, append_kv, prefill_kv, rotate_keys_ref
from kernels.reference import loki_scores_ref, rotate_q_ref, sparse_attention_ref, topk_select_ref
from kernels.scores import loki_scores, rotate_q
from kernels.testing import check_selection, random_cache, random_orthonormal, rel_err, rows_copy
from kernels.topk import budgets_ref

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}
FP8 = torch.float8_e4m3fn
CACHE = torch.bfloat16 if ON_GPU else torch.float16


def _fp8_rows(B, KVH, S, D, d, lengths, gen):
    """A random row-layout cache with an fp8 copy of k_lr as its slab; (k_lr, k_rest, v, lengths, slab)."""
    k_lr, k_rest, v, L = random_cache(B, KVH, S, D, d, CACHE, DEVICE, lengths=lengths, generator=gen)
    r_lr, r_rest, r_v, r_len, slab16 = rows_copy(k_lr, k_rest, v, L)
    return r_lr, r_rest, r_v, r_len, slab16.to(FP8)


@pytest.mark.parametrize("mode,reduce,g", [("group", "max", 4), ("group", "sum", 3), ("head", "max", 1)])
def test_fp8_slab_scores_match_float64(mode, reduce, g, gen):
    """loki_scores over an fp8 slab equals the float64 scores of the fp8 values (to fp32 rounding)."""
    B, KVH, S, D, d = 2, 2, 77, 64, 16
    *_, L, slab = _fp8_rows(B, KVH, S, D, d, [77, 40], gen)
    q_rot = torch.randn(B, KVH * g, D, generator=gen).to(DEVICE)
    got = loki_scores(q_rot, slab, L, d=d, mode=mode, reduce=reduce)
    want = loki_scores_ref(q_rot.cpu(), slab.cpu().double(), L.cpu(), mode=mode, reduce=reduce)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got.cpu()), fin)
    assert (got.cpu().double()[fin] - want[fin]).abs().max().item() <= 1e-5 * want[fin].abs().max().item()


@pytest.mark.parametrize("path", ["bracket", "fused", "split"])
@pytest.mark.parametrize("S,lengths,k,g", [(2304, [2304, 2101], 288, 4), (61, [61, 17], 1, 3), (50, [50, 33], 50, 1)])
def test_fp8_slab_decode_selects_the_fp8_top_k(path, S, lengths, k, g, gen):
    """The whole step over an fp8 slab: the selection is the exact top-k of the fp8 keys' float64 scores (ties
    aside), and the output is the attention over it with the cache's 16-bit rows.  S = 2304 takes the bracket path's
    sample bracket (rows of at least 4 x its 512-token sample); the short rows cover k = 1 and k = the whole row."""
    B, KVH, D, d = 2, 2, 64, 16
    k_lr, k_rest, v, L, slab = _fp8_rows(B, KVH, S, D, d, lengths, gen)
    q = torch.randn(B, KVH * g, D, generator=gen).to(CACHE).to(DEVICE)
    P = random_orthonormal(KVH, D, DEVICE, generator=gen)
    out, idx = loki_decode(q, P, k_lr, k_rest, v, L, k, path=path, strict=False, slab=slab, return_indices=True)
    q_rot = rotate_q_ref(q.cpu(), P.cpu())
    scores = loki_scores_ref(q_rot, slab.cpu().double(), L.cpu())
    _, exact = check_selection(idx, scores, L.cpu(), budgets_ref(k, L.cpu()), tol=1e-5 * scores[torch.isfinite(
        scores)].abs().max().item())
    assert exact >= 1
    ref = sparse_attention_ref(q_rot, k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert rel_err(out, ref) <= TOL[CACHE]


def test_fp8_slab_really_drives_the_selection(gen):
    """The same cache with a 16-bit and an fp8 slab: the two selections differ where e4m3 rounding reorders the
    keys near the k-th score (so the scoring pass read the fp8 slab, not k_lr), each exact for its own slab."""
    B, KVH, S, D, d, k = 2, 2, 2304, 64, 16, 576
    k_lr, k_rest, v, L, slab8 = _fp8_rows(B, KVH, S, D, d, None, gen)
    slab16 = k_lr.contiguous()
    q = torch.randn(B, KVH * 4, D, generator=gen).to(CACHE).to(DEVICE)
    P = random_orthonormal(KVH, D, DEVICE, generator=gen)
    _, i8 = loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False, slab=slab8, return_indices=True)
    _, i16 = loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False, slab=slab16, return_indices=True)
    q_rot = rotate_q_ref(q.cpu(), P.cpu())
    r8 = topk_select_ref(loki_scores_ref(q_rot, slab8.cpu().double(), L.cpu()), L.cpu(), k)
    r16 = topk_select_ref(loki_scores_ref(q_rot, slab16.cpu().double(), L.cpu()), L.cpu(), k)
    assert not torch.equal(r8, r16)  # (this seed: e4m3 rounding moves keys across the k-th score)
    same = [(torch.equal(a.sort().values, b.sort().values), torch.equal(c.sort().values, e.sort().values))
            for a, b, c, e in zip(i8.long().cpu().flatten(0, 1), r8.flatten(0, 1), i16.long().cpu().flatten(0, 1),
                                  r16.flatten(0, 1))]
    assert sum(s8 for s8, _ in same) >= len(same) - 1 and sum(s16 for _, s16 in same) >= len(same) - 1
    # overlap of the two selections: most of the budget, not all of it
    ov = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(r8.flatten(0, 1), r16.flatten(0, 1))]
    assert 0.8 < min(ov) and max(ov) <= 1.0 and min(ov) < 1.0


def test_fp8_slab_writes(gen):
    """append_kv / prefill_kv write an fp8 slab: each value the e4m3 rounding of the rotated key (within one e4m3
    step: the interpreter's conversion may round the other way at a tie), k_lr / k_rest / v as with a 16-bit slab."""
    B, KVH, S, D, d = 2, 2, 40, 64, 16
    k_lr, k_rest, v, L, slab = allocate_cache_rows(B, KVH, S, D, d, dtype=CACHE, device=DEVICE, slab_dtype=FP8)
    assert slab.dtype == FP8 and slab.shape == k_lr.shape and slab.is_contiguous()
    L.zero_()
    P = random_orthonormal(KVH, D, DEVICE, generator=gen)
    kk = torch.randn(B, KVH, 7, D, generator=gen).to(CACHE).to(DEVICE)
    vv = torch.randn(B, KVH, 7, D, generator=gen).to(CACHE).to(DEVICE)
    prefill_kv(kk, vv, P, k_lr, k_rest, v, L, advance=True, slab=slab)
    kn = torch.randn(B, KVH, D, generator=gen).to(CACHE).to(DEVICE)
    append_kv(kn, kn, P, k_lr, k_rest, v, L, advance=True, slab=slab)
    assert L.tolist() == [8, 8]
    want = rotate_keys_ref(torch.cat([kk, kn[:, :, None]], 2).cpu(), P.cpu())[..., :d]  # (B, KVH, 8, d) float64
    got = slab[:, :, :8].cpu().double()
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2 ** -6))) - 3)  # e4m3: 3 mantissa bits
    assert ((got - want).abs() <= step + 1e-12).all()
    assert (k_lr[:, :, :8].cpu().double() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_fp8_slab_bad_input(gen):
    """An fp8 slab only beside a 16-bit cache, only e4m3; the cache itself stays 16/32-bit."""
    B, KVH, S, D, d = 1, 2, 16, 32, 8
    k_lr, k_rest, v, L = random_cache(B, KVH, S, D, d, torch.float32, DEVICE, generator=gen)
    q = torch.randn(B, KVH, D, device=DEVICE)
    P = random_orthonormal(KVH, D, DEVICE, generator=gen)
    with pytest.raises(LokiInputError, match="float8_e4m3fn for a 16-bit cache"):
        loki_decode(q, P, k_lr, k_rest, v, L, 4, slab=k_lr.contiguous().to(FP8))
    c16 = [t.to(CACHE) for t in (k_lr, k_rest, v)]
    with pytest.raises(LokiInputError, match="slab must match k_lr"):
        loki_decode(q, P, *c16, L, 4, slab=c16[0].contiguous().to(torch.float8_e5m2))
    with pytest.raises(LokiInputError, match="slab_dtype must be"):
        allocate_cache_rows(B, KVH, S, D, d, dtype=torch.float32, device=DEVICE, slab_dtype=FP8)
    with pytest.raises(LokiInputError, match="k_lr must be float32, float16 or bfloat16"):
        loki_decode(q, P, c16[0].to(FP8), *c16[1:], L, 4)
    with pytest.raises(LokiInputError, match=r"k_lr must be .* float8_e4m3fn, got torch.float8_e5m2"):
        loki_scores(rotate_q(q, P), torch.zeros(B, KVH, S, d, dtype=torch.float8_e5m2, device=DEVICE), L)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (production shape)")
@pytest.mark.parametrize("d", [32, 16])
def test_fp8_slab_gpu_16k(d):
    """A production shape (S_max 16K, 8 KV heads x 4 query heads, bf16): the fp8 slab's step with its rules (the
    rotation PDL where the slab moves <= 32 bytes per token: d = 32 fp8 too), twice (counters reused): the selection
    is the exact top-k of the fp8 keys' scores, the output within bf16 tolerance of the float64 attention over it."""
    torch.manual_seed(71 + d)
    B, KVH, g, S, D = 2, 8, 4, 16384, 128
    k_lr, k_rest, v, L = random_cache(B, KVH, S, D, d, torch.bfloat16, "cuda", lengths=[16384, 9001])
    r_lr, r_rest, r_v, r_len, slab16 = rows_copy(k_lr, k_rest, v, L)
    slab = slab16.to(FP8)
    q = torch.randn(B, KVH * g, D, device="cuda", dtype=torch.bfloat16)
    P = random_orthonormal(KVH, D, "cuda")
    k = S // 8
    for _ in range(2):
        out, idx = loki_decode(q, P, r_lr, r_rest, r_v, r_len, k, strict=False, slab=slab, return_indices=True)
    torch.cuda.synchronize()
    q_rot = rotate_q_ref(q.cpu(), P.cpu())
    scores = loki_scores_ref(q_rot, slab.cpu().double(), L.cpu())
    tol = 1e-5 * scores[torch.isfinite(scores)].abs().max().item()
    # (check_selection requires the reference's set wherever the k-th gap exceeds 2 tol; e4m3 keys, 16 values per
    # binade, leave gaps below that at the boundary of ~1/3 of 16K-token rows: h200_pytest_s19e.log, 10 of 16)
    n, exact = check_selection(idx, scores, L.cpu(), budgets_ref(k, L.cpu()), tol=tol)
    assert exact >= 1
    ref = sparse_attention_ref(q_rot, k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
