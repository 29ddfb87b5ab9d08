import pytest
import torch

from kernels import LokiInputError, dense_decode_attention, sparse_decode_attention
from kernels.attention import dense_attention_ref, sparse_attention_ref
from kernels.testing import random_cache, rel_err, rows_copy
from kernels.topk import topk_select_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def _random_idx(B, R, S, lengths, k, generator_seed):
    torch.manual_seed(generator_seed)
    sc = torch.randn(B, R, S)
    sc = sc.masked_fill(torch.arange(S)[None, None] >= lengths.cpu()[:, None, None], float("-inf"))
    return topk_select_ref(sc, lengths.cpu(), k)


@pytest.mark.parametrize("D,d,g,mode", [(64, 8, 3, "group"), (64, 16, 1, "group"), (128, 32, 4, "group"),
                                        (128, 32, 4, "head"), (64, 64, 2, "group")])
@pytest.mark.parametrize("splits", [1, 3])
# the loop with int32 indices one tile ahead (the default), the loop of sessions 1-7, and int64 indices (which take
# the loop of sessions 1-7 even when ahead is asked for)
@pytest.mark.parametrize("ahead,index_dtype", [(True, torch.int32), (False, torch.int32), (True, torch.int64)],
                         ids=["ahead", "s7_loop", "int64"])
def test_sparse_attention(dtype, D, d, g, mode, splits, ahead, index_dtype):
    torch.manual_seed(D + d + g)
    B, KVH, S = 3, 2, 60
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[60, 25, 1])
    H = KVH * g
    q = torch.randn(B, H, D, device=DEV)
    R = KVH if mode == "group" else H
    idx = _random_idx(B, R, S, lengths, 21, D * g).to(index_dtype).to(DEV)  # ragged: -1 padded rows
    out = torch.full((B, H, D), float("nan"), dtype=dtype, device=DEV)  # poisoned
    o = sparse_decode_attention(q, k_lr, k_rest, v, idx, num_splits=splits, out=out, config=dict(ahead=ahead))
    assert o is out
    ref = sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert o.dtype == dtype
    assert rel_err(o, ref) <= TOL[dtype]


def test_sparse_attention_single_dots(dtype):
    """hilo=False (the sparse default since session 10): q' and the probabilities rounded to the cache dtype, one dot
    each, as SDPA does (1-3% faster per step on the H200, kernels/NOTES.md v10 / v12), within the dtype's tolerance;
    hilo=True (two 16-bit halves each, ~fp32 dots) is at least as close to the float64 reference."""
    torch.manual_seed(5)
    B, KVH, S, D, d, g = 2, 2, 70, 128, 32, 4
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[70, 40])
    q = torch.randn(B, KVH * g, D, device=DEV)
    idx = _random_idx(B, KVH, S, lengths, 30, 11).to(torch.int32).to(DEV)
    ref = sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    exact = sparse_decode_attention(q, k_lr, k_rest, v, idx, num_splits=2, config=dict(hilo=True))
    single = sparse_decode_attention(q, k_lr, k_rest, v, idx, num_splits=2)
    assert torch.equal(single, sparse_decode_attention(q, k_lr, k_rest, v, idx, num_splits=2, config=dict(hilo=False)))
    assert rel_err(single, ref) <= TOL[dtype]
    assert rel_err(exact, ref) <= rel_err(single, ref) or dtype == torch.float32  # (fp32 caches: IEEE dots either way)


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("pdl", [False, True])
def test_sparse_attention_ready_split(dtype, splits, pdl):
    """`ready=` (session 11): program sp takes tiles sp, sp + NSPLIT, ... and attends first to those among the row's
    first #above indices (where the row's bracket held: #above <= budget <= #above + #band), then to the rest.  The
    tiles and their order do not depend on where that split falls (before, inside or after a program's tiles, on a
    tile boundary or not, or nowhere: bracket missed), so those outputs are bitwise equal; with one split they equal
    the kernel without `ready`.  With nothing running concurrently, pdl only adds the wait (GPU)."""
    torch.manual_seed(7)
    B, KVH, S, D, d, g, k = 2, 3, 120, 64, 16, 2, 70
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[120, 90])
    q = torch.randn(B, KVH * g, D, device=DEV)
    idx = _random_idx(B, KVH, S, lengths, k, 3).to(torch.int32).to(DEV)
    base = sparse_decode_attention(q, k_lr, k_rest, v, idx, num_splits=splits)
    ref = sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    # per row (b, kvh): #above, #band, budget: hits with 0 / 16 / 37 / 64 / 70 above, a miss (#above > budget)
    recs = [(0, 70, 70), (16, 60, 70), (37, 40, 70), (64, 6, 70), (70, 0, 70), (80, 5, 70)]
    outs = []
    for shift in range(len(recs)):  # every row meets every split point
        ready = torch.zeros(B * KVH, 8, dtype=torch.int32)
        for row in range(B * KVH):
            ready[row, 2:5] = torch.tensor(recs[(row + shift) % len(recs)])
        outs.append(sparse_decode_attention(q, k_lr, k_rest, v, idx, num_splits=splits, ready=ready.to(DEV),
                                            pdl=pdl))
    for o in outs:
        assert torch.equal(o, outs[0])
    assert rel_err(outs[0], ref) <= TOL[dtype]
    if splits == 1:
        assert torch.equal(outs[0], base)
    with pytest.raises(LokiInputError, match="ready must be a contiguous int32 tensor"):
        sparse_decode_attention(q, k_lr, k_rest, v, idx, ready=ready[:2].to(DEV))


@pytest.mark.parametrize("D,d,g", [(64, 8, 3), (128, 32, 4), (64, 16, 1), (32, 32, 4)])
@pytest.mark.parametrize("splits", [1, 4])
def test_dense_attention(dtype, D, d, g, splits):
    torch.manual_seed(D + g)
    B, KVH, S = 3, 2, 70
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[70, 31, 0])
    q = torch.randn(B, KVH * g, D, device=DEV)
    out = torch.full((B, KVH * g, D), float("nan"), dtype=dtype, device=DEV)
    o = dense_decode_attention(q, k_lr, k_rest, v, lengths, num_splits=splits, out=out)
    assert o is out
    ref = dense_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu())
    assert rel_err(o, ref) <= TOL[dtype]
    assert (o[2].float() == 0).all()  # empty sequence -> zeros


_GPU_ONLY = pytest.mark.skipif(DEV == "cpu", reason="the H200's boundary (64 / 128 rows); the CPU's is 2 / 4 rows")


@pytest.mark.parametrize("B,KVH", [(1, 2), (2, 2), pytest.param(8, 8, marks=_GPU_ONLY),
                                   pytest.param(16, 8, marks=_GPU_ONLY)])
def test_attention_few_rows_rule(dtype, B, KVH, monkeypatch):
    """attention.FEW_ROWS_* (session 15): launches of at most FEW_ROWS_FRACTION x SMs rows without a config take
    FEW_ROWS_DENSE / FEW_ROWS_SPARSE (more split-K programs; single 16-bit dots in the dense kernel), others the
    defaults, and an explicit config always wins; the outputs match the float64 references either way."""
    import kernels.attention as A
    from kernels._utils import num_sms
    launches = []
    real = A._flash_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, kw["HILO"], kw["BLOCK_N"]))
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(A, "_flash_decode_kernel", Spy())
    torch.manual_seed(B + KVH)
    g, D, d, S = 2, 64, 16, 300
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[S] + [S - 37] * (B - 1))
    q = torch.randn(B, KVH * g, D, device=DEV)
    few = B * KVH <= A.FEW_ROWS_FRACTION * num_sms(k_lr.device)

    def splits(n_items, block_n, waves):  # (_launch's split-K grid)
        n_tiles = -(-n_items // (16 if DEV == "cpu" else block_n))
        tps = -(-n_tiles // min(n_tiles, max(1, -(-waves * num_sms(k_lr.device) // (B * KVH)))))
        return -(-n_tiles // tps)
    o = dense_decode_attention(q, k_lr, k_rest, v, lengths)
    assert rel_err(o, dense_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu())) <= TOL[dtype]
    cfg = dict(A.DENSE_CONFIG, **(A.FEW_ROWS_DENSE if few else {}))
    grid, hilo, _ = launches.pop()
    assert hilo == cfg["hilo"]
    assert grid[1] == splits(S, cfg["block_n"], cfg["waves"])
    idx = topk_select_ref(torch.randn(B, KVH, S), lengths.cpu(), 40).to(torch.int32).to(DEV)
    o = sparse_decode_attention(q, k_lr, k_rest, v, idx)
    assert rel_err(o, sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())) <= TOL[dtype]
    waves = dict(A.SPARSE_CONFIG, **(A.FEW_ROWS_SPARSE if few else {}))["waves"]
    assert launches.pop()[0][1] == splits(40, A.SPARSE_CONFIG["block_n"], waves)
    dense_decode_attention(q, k_lr, k_rest, v, lengths, config=dict(hilo=True))  # a given config: no rule
    assert launches.pop()[1] is True
    ready = torch.zeros(B * KVH * A.BRACKET_RECORD.value, dtype=torch.int32, device=DEV)  # the early start: no rule
    o = sparse_decode_attention(q, k_lr, k_rest, v, idx, ready=ready)
    assert rel_err(o, sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())) <= TOL[dtype]
    assert launches.pop()[0][1] == splits(40, A.SPARSE_CONFIG["block_n"], A.SPARSE_CONFIG["waves"])


def test_attention_bad_inputs():
    B, KVH, S, D, d = 2, 2, 16, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV)
    q = torch.randn(B, 4, D, device=DEV)
    idx = torch.zeros(B, KVH, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(LokiInputError, match="idx must be"):
        sparse_decode_attention(q, k_lr, k_rest, v, idx[:, :1].float())
    with pytest.raises(LokiInputError, match="idx must be"):
        sparse_decode_attention(q, k_lr, k_rest, v, torch.zeros(B, 3, 4, dtype=torch.int32, device=DEV))
    with pytest.raises(LokiInputError, match="q_rot"):
        sparse_decode_attention(q[..., :32], k_lr, k_rest, v, idx)
    with pytest.raises(LokiInputError, match="share a dtype"):
        dense_decode_attention(q, k_lr, k_rest, v.half(), lengths)
    with pytest.raises(LokiInputError, match="v shape"):
        dense_decode_attention(q, k_lr, k_rest, v[:, :, :8], lengths)
    with pytest.raises(LokiInputError, match="contiguous"):
        dense_decode_attention(q, k_lr, k_rest, torch.randn(B, KVH, S, 2 * D, device=DEV)[..., ::2], lengths)


@pytest.mark.parametrize("kv", [True, False])
def test_attention_whole_rows(dtype, kv, monkeypatch):
    """Session 13 (attention.WIDEN_ROWS): where k_rest continues k_lr's rows (a row layout, `allocate_cache_rows`) the
    kernels read whole K rows as one d = D tile; the same attention as over the split slabs holding the same values,
    sparse and dense, with and without the widening.  `rows_continue` holds for the row layouts only."""
    import kernels.attention as attention
    from kernels import allocate_cache
    torch.manual_seed(21)
    B, KVH, S, D, d, g = 2, 2, 70, 64, 16, 3
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[70, 33])
    r_lr, r_rest, r_v, _, _ = rows_copy(k_lr, k_rest, v, lengths, kv=kv)
    assert attention.rows_continue(r_lr, r_rest)
    assert not attention.rows_continue(k_lr, k_rest)
    assert not attention.rows_continue(*allocate_cache(B, KVH, S, D, d, dtype=dtype, device=DEV)[:2])
    q = torch.randn(B, KVH * g, D, device=DEV)
    idx = _random_idx(B, KVH, S, lengths, 20, 5).to(DEV)
    want_s = sparse_decode_attention(q, k_lr, k_rest, v, idx)
    want_d = dense_decode_attention(q, k_lr, k_rest, v, lengths)
    for widen in (True, False):
        monkeypatch.setattr(attention, "WIDEN_ROWS", widen)
        assert rel_err(sparse_decode_attention(q, r_lr, r_rest, r_v, idx), want_s) <= TOL[dtype]
        assert rel_err(dense_decode_attention(q, r_lr, r_rest, r_v, lengths), want_d) <= TOL[dtype]


def test_sparse_attention_refuses_positions_outside_the_cache_or_repeated():
    """strict=True (the default) reads a caller's idx on the host: a position >= S_max (a read outside the cache) and
    a position repeated in a row (attended to twice) are refused with the entry named; strict=False (for CUDA graphs
    and decode loops) does not look, and a repeat then counts twice, as documented."""
    B, KVH, S, D, d, g = 2, 2, 16, 64, 16, 2
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV)
    q = torch.randn(B, KVH * g, D, device=DEV)
    idx = torch.tensor([[[0, 3, 5, -1], [1, 2, -1, -1]], [[15, 0, 7, 8], [4, -1, -1, -1]]], dtype=torch.int32,
                       device=DEV)
    ok = sparse_decode_attention(q, k_lr, k_rest, v, idx)  # padding (-1) repeated is fine
    ref_ok = sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert rel_err(ok, ref_ok) <= TOL[torch.float32]
    far = idx.clone()
    far[1, 0, 2] = S
    with pytest.raises(LokiInputError, match=r"idx\[1, 0, 2\] = 16 is not a cache position: positions must be < "
                                             r"S_max=16"):
        sparse_decode_attention(q, k_lr, k_rest, v, far)
    rep = idx.clone()
    rep[0, 1, 2] = 2
    with pytest.raises(LokiInputError, match=r"idx\[0, 1\] selects position 2 more than once"):
        sparse_decode_attention(q, k_lr, k_rest, v, rep.long())
    twice = sparse_decode_attention(q, k_lr, k_rest, v, rep, strict=False)
    ref = sparse_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), rep.cpu())  # (the reference counts it twice)
    assert rel_err(twice, ref) <= TOL[torch.float32]
    assert rel_err(twice, ok) > 1e-3  # the repeat really changed the output


def test_dense_attention_refuses_lengths_outside_the_cache():
    """strict=True (the default) reads lengths on the host and refuses one above S_max or below 0; strict=False (CUDA
    graphs, decode loops) clips a length to S_max on the device: the same output as the full cache."""
    B, KVH, S, D, d = 2, 2, 16, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[16, 9])
    q = torch.randn(B, 4, D, device=DEV)
    for bad in ([17, 9], [16, -1]):
        with pytest.raises(LokiInputError, match="lengths"):
            dense_decode_attention(q, k_lr, k_rest, v, torch.tensor(bad, dtype=lengths.dtype, device=DEV))
    over = torch.tensor([40, 9], dtype=lengths.dtype, device=DEV)
    assert torch.equal(dense_decode_attention(q, k_lr, k_rest, v, over, strict=False),
                       dense_decode_attention(q, k_lr, k_rest, v, lengths))
