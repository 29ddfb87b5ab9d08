"""The kernels' contracts end to end: the two invariants of the method against float64 computed here from the raw
(unrotated) keys, odd shapes through every op, and the bad inputs each launcher must refuse before any launch."""
import pytest
import torch

from kernels import (LokiInputError, allocate_cache, append_kv, dense_decode_attention, forced_count,
                     fraction_budget, loki_decode, loki_scores, loki_select, loki_select_bracket, prefill_kv, rotate_q,
                     sparse_decode_attention, topk_select)
from kernels.attention import dense_attention_ref
from kernels.kv_cache import append_kv_ref, prefill_kv_ref
from kernels.reference import loki_decode_ref
from kernels.scores import loki_scores_ref, rotate_q_ref
from kernels.testing import check_selection, random_cache, random_orthonormal, rel_err
from kernels.topk import budgets_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _exact_scores(q, P, k_lr, k_rest, mode, reduce, scaling):
    """float64 q . k over the cached keys, from the raw q and the keys rotated back (K = K' P^T): no Loki code."""
    B, H, D = q.shape
    KVH = k_lr.shape[1]
    g = H // KVH
    K = torch.cat([k_lr, k_rest], -1).double().cpu() @ P.double().cpu().transpose(1, 2)[None]  # (B, KVH, S, D)
    s = scaling * torch.einsum("bkgd,bksd->bkgs", q.double().cpu().view(B, KVH, g, D), K)
    if mode == "head":
        return s.reshape(B, H, -1), K
    return (s.amax(2) if reduce == "max" else s.sum(2)), K


def _dense_from_raw(q, K, v, lengths, scaling):
    """float64 softmax attention of the raw q over the raw keys K (B, KVH, S, D) and values, valid tokens only."""
    B, H, D = q.shape
    KVH = K.shape[1]
    g = H // KVH
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        for h in range(H):
            p = torch.softmax(scaling * (K[b, h // g, :n] @ q[b, h].double().cpu()), 0)
            out[b, h] = p @ v[b, h // g, :n].double().cpu()
    return out


@pytest.mark.parametrize("path", ["bracket", "fused", "split", "torch_topk"])
@pytest.mark.parametrize("mode,reduce,g", [("group", "max", 4), ("group", "sum", 3), ("head", "max", 1),
                                           ("head", "max", 3)])
def test_full_rank_selects_exact_top_k(dtype, path, mode, reduce, g):
    """Loki with d = D scores with the exact q . k: its selection is the exact top-k of the raw scores (every row
    whose k-th / (k+1)-th scores are not tied)."""
    torch.manual_seed(g + len(path))
    B, KVH, S, D = 3, 2, 37, 32
    lens = [37, 20, 9]
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, D, dtype, DEV, lengths=lens)
    assert k_rest.shape[-1] == 0
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    exact_scores, _ = _exact_scores(q, P, k_lr, k_rest, mode, reduce, D ** -0.5)
    pos = torch.arange(S)
    exact_scores = exact_scores.masked_fill(pos >= lengths.cpu()[:, None, None], float("-inf"))
    tol = 2e-5 * exact_scores[torch.isfinite(exact_scores)].abs().max().item()
    for k in (1, 7):
        _, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, k, mode=mode, reduce=reduce, path=path,
                             strict=path != "torch_topk", return_indices=True)
        if path == "torch_topk":  # unsorted; -1 only where torch.topk reached the -inf tail
            assert (idx >= 0).all()
        n, exact = check_selection(idx, exact_scores, lengths.cpu(), budgets_ref(k, lengths.cpu()), tol)
        assert exact == n, f"{n - exact} rows tied at the k-th score: pick another seed"


@pytest.mark.parametrize("path", ["bracket", "fused", "split", "torch_topk"])
@pytest.mark.parametrize("mode,g", [("group", 4), ("head", 3), ("group", 1)])
def test_whole_context_budget_is_dense_attention(dtype, path, mode, g):
    """A budget covering every cached token makes Loki exact dense attention: equal to the float64 softmax
    attention of the raw q over the raw keys, and to the dense flash-decoding kernel on the same cache."""
    torch.manual_seed(10 + g)
    B, KVH, S, D, d = 3, 2, 40, 64, 16
    lens = [40, 23, 1]
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=lens)
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    _, K = _exact_scores(q, P, k_lr, k_rest, mode, "max", D ** -0.5)
    ref = _dense_from_raw(q, K, v, lengths.cpu(), D ** -0.5)
    dense = dense_decode_attention(rotate_q(q, P), k_lr, k_rest, v, lengths)
    assert rel_err(dense, ref) <= TOL[dtype]
    budgets = [S] if path == "torch_topk" else [lengths.clone(), 1.0]  # torch_topk: int budgets only
    for kb in budgets:
        out = loki_decode(q, P, k_lr, k_rest, v, lengths, kb, mode=mode, path=path, strict=path != "torch_topk")
        assert rel_err(out, ref) <= TOL[dtype], f"budget {kb!r}"
        assert rel_err(out, dense.double()) <= 2 * TOL[dtype]


@pytest.mark.parametrize("D,d,g", [(80, 12, 3), (48, 5, 1)])
def test_odd_shapes_through_every_op(dtype, D, d, g):
    """Head dims and low-rank dims that are not powers of 2, through prefill, append, scores, the decode paths (k =
    1, 7, the whole context) and the dense kernel, each against its float64 reference."""
    torch.manual_seed(D + d)
    B, KVH, S, T = 3, 2, 29, 17
    H = KVH * g
    k_lr, k_rest, v, lengths = allocate_cache(B, KVH, S, D, d, dtype=dtype, device=DEV)
    for t in (k_lr, k_rest, v):  # (the tokens before each sequence's start: random, no tied scores)
        t.copy_(torch.randn(t.shape))
    P = random_orthonormal(KVH, D, DEV)
    lengths.copy_(torch.tensor([0, 4, 11]))
    n_new = torch.tensor([17, 9, 13], dtype=torch.int32, device=DEV)
    kx = torch.randn(B, KVH, T, D, device=DEV).to(dtype)
    vx = torch.randn(B, KVH, T, D, device=DEV).to(dtype)
    want = prefill_kv_ref(kx.cpu(), vx.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(), n_new.cpu())
    prefill_kv(kx, vx, P, k_lr, k_rest, v, lengths, n_new=n_new, advance=True)
    assert lengths.tolist() == [17, 13, 24]
    # relative: the kernel and the reference may round the rotated keys one ulp apart (fp16 2^-10, bf16 2^-7)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, w in zip((k_lr, k_rest, v), want):
        assert ((got.cpu().double() - w.double()).abs() <= tol * (1 + w.double().abs())).all()
    kn, vn = torch.randn(B, KVH, D, device=DEV).to(dtype), torch.randn(B, KVH, D, device=DEV).to(dtype)
    want = append_kv_ref(kn.cpu(), vn.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu())
    append_kv(kn, vn, P, k_lr, k_rest, v, lengths, advance=True)
    for got, w in zip((k_lr, k_rest, v), want):
        assert ((got.cpu().double() - w.double()).abs() <= tol * (1 + w.double().abs())).all()
    q = torch.randn(B, H, D, device=DEV)
    qr = rotate_q(q, P)
    assert rel_err(qr, rotate_q_ref(q.cpu(), P.cpu())) <= 1e-6
    for mode in ("group", "head"):
        sc = loki_scores(qr, k_lr, lengths, mode=mode)
        ref = loki_scores_ref(qr.cpu(), k_lr.cpu(), lengths.cpu(), mode=mode)
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(sc.cpu()), fin)
        assert rel_err(sc.cpu()[fin], ref[fin]) <= 1e-5
    for path, k in (("bracket", 1), ("bracket", "whole"), ("fused", 7), ("split", 1), ("split", 7),
                    ("fused", "whole")):
        kb = lengths.clone() if k == "whole" else k
        out, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, kb, path=path, return_indices=True)
        ref_out, _, ref_scores = loki_decode_ref(q.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(),
                                                 kb.cpu() if k == "whole" else k)
        fin = torch.isfinite(ref_scores)
        n, exact = check_selection(idx, ref_scores, lengths.cpu(), budgets_ref(kb.cpu() if k == "whole" else k,
                                                                                lengths.cpu()),
                                   2e-5 * ref_scores[fin].abs().max().item())
        assert exact == n
        assert rel_err(out, ref_out) <= TOL[dtype], (path, k)
    dense = dense_decode_attention(qr, k_lr, k_rest, v, lengths)
    assert rel_err(dense, dense_attention_ref(qr.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu())) <= TOL[dtype]


def test_scores_rotating_q_inside_the_kernel(dtype):
    """`loki_scores(P=...)`: the raw q rotated inside the scoring kernel; q' written to a caller's buffer."""
    torch.manual_seed(3)
    B, KVH, g, S, D, d = 2, 2, 3, 33, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[33, 12])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    buf = torch.full((B, KVH * g, D), float("nan"), device=DEV)
    for mode in ("group", "head"):
        sc, qr = loki_scores(q, k_lr, lengths, mode=mode, P=P, q_rot_out=buf)
        assert qr is buf
        q64 = rotate_q_ref(q.cpu(), P.cpu())
        assert rel_err(qr, q64) <= 1e-6
        ref = loki_scores_ref(q64, k_lr.cpu(), lengths.cpu(), mode=mode)
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(sc.cpu()), fin)
        assert rel_err(sc.cpu()[fin], ref[fin]) <= 1e-5


def test_bad_inputs_are_refused_before_launch():
    """Each wrong argument raises one LokiInputError naming it (no launch, no partial write)."""
    B, KVH, S, D, d = 2, 2, 16, 32, 8
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[16, 5])
    q = torch.randn(B, 4, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    cache = (k_lr, k_rest, v, lengths)
    # a basis for another number of KV heads, on every path (the split paths once rotated with it silently)
    for path in ("bracket", "fused", "split", "torch_topk"):
        for bad in (P[:1].contiguous(), random_orthonormal(4, D, DEV)):
            with pytest.raises(LokiInputError, match=r"P must have shape \(KVH, D, D\)"):
                loki_decode(q, bad, *cache, 3, path=path)
    # output buffers: shape, dtype, device (a short one would be written out of bounds)
    with pytest.raises(LokiInputError, match="out must have shape"):
        rotate_q(q, P, out=torch.empty(1, 4, D, device=DEV))
    with pytest.raises(LokiInputError, match="out must be float32"):
        rotate_q(q, P, out=torch.empty(B, 4, D, dtype=torch.float16, device=DEV))
    for fn in (loki_select_bracket, loki_select):
        with pytest.raises(LokiInputError, match="q_rot_out must have shape"):
            fn(q, k_lr, lengths, 2, P=P, q_rot_out=torch.empty(1, 4, D, device=DEV))
        with pytest.raises(LokiInputError, match="q_rot_out must be float32"):
            fn(q, k_lr, lengths, 2, P=P, q_rot_out=torch.empty(B, 4, D, dtype=torch.float16, device=DEV))
    with pytest.raises(LokiInputError, match="q_rot_out must have shape"):
        loki_scores(q, k_lr, lengths, P=P, q_rot_out=torch.empty(B, 4, D - 1, device=DEV))
    with pytest.raises(LokiInputError, match="out must be"):
        loki_decode(q, P, *cache, 3, out=torch.empty(B, 4, D, dtype=torch.int32, device=DEV))
    with pytest.raises(LokiInputError, match="out must have shape"):
        dense_decode_attention(q, k_lr, k_rest, v, lengths, out=torch.empty(B, 2, D, device=DEV))
    with pytest.raises(LokiInputError, match="out must have shape"):
        topk_select(torch.randn(B, KVH, S, device=DEV), lengths, 2, out=torch.empty(B, KVH, 3, dtype=torch.int32,
                                                                                    device=DEV))
    # k_max: the index width may not silently cut a strict budget
    with pytest.raises(LokiInputError, match="k_max=2 is smaller than k=4"):
        loki_decode(q, P, *cache, 4, k_max=2)
    with pytest.raises(LokiInputError, match="k_max=2 is smaller than the budgets"):
        loki_decode(q, P, *cache, torch.tensor([4, 3], dtype=torch.int32, device=DEV), k_max=2)
    # ... nor a float budget's (strict): 1.0 of lengths 16 and 5 is 16 and 5 keys, not k_max = 2
    for path in ("bracket", "fused", "split"):
        with pytest.raises(LokiInputError, match=r"k_max=2 is smaller than the budgets \[16, 5\] that k=1.0 means"):
            loki_decode(q, P, *cache, 1.0, k_max=2, path=path)
    with pytest.raises(LokiInputError, match=r"k_max=2 is smaller than the budgets \[8, 3\] that k=0.5 means"):
        loki_select_bracket(q, k_lr, lengths, 0.5, P=P, k_max=2)
    loki_select_bracket(q, k_lr, lengths, 0.5, P=P, k_max=2, strict=False)  # strict=False: clipped, as documented
    for km in (0, -1, 2.5):
        with pytest.raises(LokiInputError, match="k_max"):
            topk_select(torch.randn(B, KVH, S, device=DEV), lengths, 3, k_max=km)
    with pytest.raises(LokiInputError, match="int budget >= 1"):
        loki_decode(q, P, *cache, 0, path="torch_topk", strict=False)
    # d against D: the message names d and D
    with pytest.raises(LokiInputError, match=r"low-rank dim d=40 .* must be in 1\.\.D=32"):
        dense_decode_attention(q, torch.randn(B, KVH, S, 40, device=DEV), k_rest, v, lengths)
    # negative lengths and counts (strict: read on the host)
    neg = torch.tensor([3, -1], dtype=torch.int32, device=DEV)
    with pytest.raises(LokiInputError, match="lengths must be >= 0"):
        loki_decode(q, P, k_lr, k_rest, v, neg, 1)
    with pytest.raises(LokiInputError, match="negative lengths"):
        append_kv(q[:, :KVH], q[:, :KVH], P, k_lr, k_rest, v, neg)
    kx = torch.randn(B, KVH, 3, D, device=DEV)
    with pytest.raises(LokiInputError, match="n_new must be int32 or int64, got torch.float32"):
        prefill_kv(kx, kx, P, k_lr, k_rest, v, lengths, n_new=torch.ones(B, device=DEV))
    with pytest.raises(LokiInputError, match=r"n_new must have shape \(2,\), got \(3,\)"):
        prefill_kv(kx, kx, P, k_lr, k_rest, v, lengths, n_new=torch.ones(3, dtype=torch.int32, device=DEV))
    with pytest.raises(LokiInputError, match="n_new must be in 0..T=3"):
        prefill_kv(kx, kx, P, k_lr, k_rest, v, torch.zeros(B, dtype=torch.int32, device=DEV),
                   n_new=torch.tensor([-2, 1], dtype=torch.int32, device=DEV))
    # the float budget helpers
    for frac in (2.0, -1.0, 0.0):  # one check, one message, naming the argument the caller passed
        with pytest.raises(LokiInputError, match=r"frac as a float is a fraction of each sequence and must be in \(0, 1\]"):
            fraction_budget(frac, lengths)
        with pytest.raises(LokiInputError, match=r"k_budget as a float is a fraction .* in \(0, 1\], got"):
            loki_decode(q, P, k_lr, k_rest, v, lengths, frac)
        with pytest.raises(LokiInputError, match=r"k as a float is a fraction .* in \(0, 1\], got"):
            loki_select_bracket(q, k_lr, lengths, frac, P=P)
    with pytest.raises(LokiInputError, match="sink_tokens must be an int >= 0"):
        forced_count(lengths, -3, 0)
    # tuning arguments that become tile sizes
    with pytest.raises(LokiInputError, match="block_s must be a power of 2"):
        topk_select(torch.randn(B, KVH, S, device=DEV), lengths, 2, block_s=100)
    with pytest.raises(LokiInputError, match="sample must be a power of 2"):
        loki_select(q, k_lr, lengths, 2, P=P, sample=48)
    with pytest.raises(LokiInputError, match="block_n must be a power of 2"):
        loki_select(q, k_lr, lengths, 2, P=P, block_n=24)
    # nothing above touched the cache or the lengths
    assert lengths.tolist() == [16, 5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter only (the GPU computes in bfloat16)")
def test_bfloat16_is_refused_under_the_interpreter():
    """Triton's CPU interpreter has no bfloat16 arithmetic (its bf16 tl.dot is off by ~1e10, silently): every op
    that computes refuses bf16 there with one message that says what runs instead."""
    B, KVH, S, D, d = 1, 1, 16, 16, 4
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.bfloat16, DEV, lengths=[16])
    q = torch.randn(B, 2, D, device=DEV, dtype=torch.bfloat16)
    P = random_orthonormal(KVH, D, DEV)
    msg = "is bfloat16, which Triton's CPU interpreter .* cannot compute with; use float16 or float32 on the CPU"
    with pytest.raises(LokiInputError, match=msg):
        loki_decode(q, P, k_lr, k_rest, v, lengths, 4)
    with pytest.raises(LokiInputError, match=msg):
        dense_decode_attention(q, k_lr, k_rest, v, lengths)
    with pytest.raises(LokiInputError, match=msg):
        loki_scores(q.float(), k_lr, lengths, P=P)
    assert lengths.tolist() == [16]


def test_non_strict_writes_are_bounded():
    """strict=False never reads device values on the host: a full sequence's append is dropped, and a ragged
    prefill's lengths advance by what was written (n_new clamped to 0..T)."""
    B, KVH, S, D, d = 2, 2, 6, 32, 8
    k_lr, k_rest, v, lengths = allocate_cache(B, KVH, S, D, d, dtype=torch.float32, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    for t in (k_lr, k_rest, v):
        t.zero_()
    lengths.copy_(torch.tensor([S, 2]))
    before = [t.clone() for t in (k_lr, k_rest, v)]
    kn = torch.randn(B, KVH, D, device=DEV)
    append_kv(kn, kn, P, k_lr, k_rest, v, lengths, strict=False)
    for t, b in zip((k_lr, k_rest, v), before):
        assert torch.equal(t[0], b[0])  # the full sequence is untouched
        assert not torch.equal(t[1, :, 2], b[1, :, 2])  # the other one was written at its length
    lengths.zero_()
    kx = torch.randn(B, KVH, 3, D, device=DEV)
    prefill_kv(kx, kx, P, k_lr, k_rest, v, lengths, n_new=torch.tensor([-2, 5], dtype=torch.int32, device=DEV),
               strict=False, advance=True)
    assert lengths.tolist() == [0, 3]


def test_sparse_attention_index_contract():
    """Indices: -1 is padding anywhere in a row (the selection's order is unspecified)."""
    torch.manual_seed(4)
    B, KVH, S, D, d = 2, 2, 20, 32, 8
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV)
    q = torch.randn(B, 4, D, device=DEV)
    idx = torch.tensor([[[3, -1, 7, 1], [-1, -1, 0, 19]]] * B, dtype=torch.int32, device=DEV)
    packed = torch.tensor([[[1, 3, 7, -1], [0, 19, -1, -1]]] * B, dtype=torch.int32, device=DEV)
    assert rel_err(sparse_decode_attention(q, k_lr, k_rest, v, idx),
                   sparse_decode_attention(q, k_lr, k_rest, v, packed).double()) <= 1e-6
