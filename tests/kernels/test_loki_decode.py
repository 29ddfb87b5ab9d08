import pytest
import torch

from kernels import LokiInputError, loki_decode, loki_select_bracket
from kernels.attention import sparse_attention_ref
from kernels.bracket import bracket_ready, bracket_workspace_size
from kernels.reference import loki_decode_ref, naive_loki_torch
from kernels.scores import rotate_q_ref
from kernels.testing import check_selection, random_cache, random_orthonormal, rel_err, rows_copy
from kernels.topk import budgets_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("D,d,g,mode,reduce,path,k", [
    (64, 16, 3, "group", "max", "fused", 12),
    (64, 16, 3, "group", "max", "fused", 1),
    (64, 16, 3, "group", "max", "fused", "whole"),
    (64, 8, 1, "group", "sum", "split", 12),
    (64, 8, 1, "group", "sum", "split", "whole"),
    (128, 32, 4, "group", "max", "split", 12),
    (128, 32, 4, "group", "max", "split", 1),
    (128, 32, 4, "head", "max", "fused", 12),
    (64, 16, 4, "group", "sum", "torch_topk", 12),
    (64, 16, 3, "group", "max", "bracket", 12),
    (64, 16, 3, "group", "max", "bracket", 1),
    (64, 16, 1, "group", "max", "fused", 12),
    (128, 32, 4, "head", "sum", "bracket", "whole"),
])
def test_loki_decode(dtype, D, d, g, mode, reduce, path, k):
    torch.manual_seed(D + d + g)
    B, KVH, S = 3, 2, 45
    lens = [45, 20, 12]
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=lens)
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    if k == "whole":  # per-sequence budget = the whole context
        k = lengths.clone() if path != "torch_topk" else 12
    strict = path != "torch_topk" and isinstance(k, torch.Tensor)
    out_buf = torch.full((B, KVH * g, D), float("nan"), dtype=dtype, device=DEV)
    out, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, k, mode=mode, reduce=reduce, path=path,
                           strict=strict, return_indices=True, out=out_buf)
    assert out is out_buf
    ref_out, ref_idx, ref_scores = loki_decode_ref(q.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(),
                                                   lengths.cpu(), k.cpu() if isinstance(k, torch.Tensor) else k,
                                                   mode=mode, reduce=reduce)
    kbs = budgets_ref(k.cpu() if isinstance(k, torch.Tensor) else k, lengths.cpu())
    fin = torch.isfinite(ref_scores)
    tol = 2e-5 * ref_scores[fin].abs().max().item()
    if path == "torch_topk":  # unsorted, -1 where torch.topk fell into the -inf tail
        big = torch.iinfo(idx.dtype).max
        idx = torch.where(idx < 0, big, idx).sort(dim=-1).values
        idx = torch.where(idx == big, -1, idx)
    n, exact = check_selection(idx, ref_scores, lengths.cpu(), kbs, tol)
    assert exact >= n - 1
    # compare the output against the reference attention over *our* selection (exact up to ties)
    ref_own = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert rel_err(out, ref_own) <= TOL[dtype]
    if exact == n:
        assert rel_err(out, ref_out) <= TOL[dtype]


@pytest.mark.parametrize("mode,g,num_splits,vec", [("group", 4, 3, True), ("group", 4, 3, False), ("head", 2, 2, True),
                                                   ("group", 3, 1, True), ("group", 1, 5, True), ("group", 3, 4, False)])
def test_loki_decode_fold_combine(mode, g, num_splits, vec, monkeypatch):
    """The bracket path's split-K partials combined inside the attention kernel (the last program of each row, on
    counters the bracket programs zero) give what the separate combine kernel gives, call after call, and match
    the float64 attention over the same selection."""
    import kernels.attention as A
    from kernels.attention import sparse_attention_ref
    from kernels.scores import rotate_q_ref
    launches, real = [], A._combine_kernel

    class Spy:  # counts launches of the separate combine kernel
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(A, "_combine_kernel", Spy())
    if not vec:  # the per-head loop the fold takes when a row's partials do not fit one tile
        monkeypatch.setattr(A, "FOLD_VECTOR_MAX", 0)
    torch.manual_seed(num_splits + g)
    # rows long enough for num_splits tiles of the attention kernel (16 tokens under the interpreter, 64 on the GPU)
    S, lens = (200, [200, 131, 7]) if DEV == "cpu" else (1600, [1600, 1048, 7])
    B, KVH, D, d = 3, 2, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=lens)
    P = random_orthonormal(KVH, D, DEV)
    for step in range(2):
        q = torch.randn(B, KVH * g, D, device=DEV)
        o_f, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, 0.25, mode=mode, num_splits=num_splits,
                               return_indices=True, fold_combine=True)
        assert not launches  # folded (or a single split: nothing to combine)
        o_s = loki_decode(q, P, k_lr, k_rest, v, lengths, 0.25, mode=mode, num_splits=num_splits, fold_combine=False)
        # (on the GPU the two calls' selections may come in another index order: another summation order)
        assert (o_f - o_s).abs().max().item() <= (1e-6 if DEV == "cpu" else 1e-5)
        ref = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
        assert rel_err(o_f, ref) <= TOL[torch.float32]
        assert len(launches) == (num_splits > 1)
        launches.clear()


def test_naive_torch_matches_reference(dtype):
    torch.manual_seed(5)
    B, KVH, g, S, D, d = 2, 2, 4, 40, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV)
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    for mode in ("group", "head"):
        ref_out, _, _ = loki_decode_ref(q.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(), 10,
                                        mode=mode)
        o = naive_loki_torch(q.to(dtype) if dtype != torch.float32 else q, P, k_lr, k_rest, v, 10, mode=mode)
        # the naive pipeline rounds q' to the cache dtype: looser tolerance
        assert rel_err(o, ref_out) <= (1e-5 if dtype == torch.float32 else 5e-2)


def test_loki_decode_bad_inputs():
    B, KVH, S, D, d = 2, 2, 16, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[16, 5])
    q = torch.randn(B, 4, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    with pytest.raises(LokiInputError, match="larger than the length"):
        loki_decode(q, P, k_lr, k_rest, v, lengths, 6)
    with pytest.raises(LokiInputError, match="q must be"):
        loki_decode(q[:, :, :32], P, k_lr, k_rest, v, lengths, 2)
    with pytest.raises(LokiInputError, match="share a dtype"):
        loki_decode(q, P, k_lr.half(), k_rest, v, lengths, 2)
    with pytest.raises(LokiInputError, match="mode"):
        loki_decode(q, P, k_lr, k_rest, v, lengths, 2, mode="x")
    with pytest.raises(LokiInputError, match="P must"):
        loki_decode(q, P[:1], k_lr, k_rest, v, lengths, 2, path="fused")
    with pytest.raises(LokiInputError, match="lengths must be int32"):
        loki_decode(q, P, k_lr, k_rest, v, lengths.float(), 2)
    # the bracket path's own arguments
    with pytest.raises(LokiInputError, match="larger than the length"):
        loki_select_bracket(q, k_lr, lengths, 6, P=P)
    with pytest.raises(LokiInputError, match="sample must be a power of 2"):
        loki_select_bracket(q, k_lr, lengths, 2, P=P, sample=100)
    with pytest.raises(LokiInputError, match="sink_tokens"):
        loki_select_bracket(q, k_lr, lengths, 2, P=P, sink_tokens=-1)
    with pytest.raises(LokiInputError, match="need path='bracket'"):
        loki_decode(q, P, k_lr, k_rest, v, lengths, 2, path="fused", sink_tokens=4)
    with pytest.raises(LokiInputError, match="workspace"):
        loki_select_bracket(q, k_lr, lengths, 2, P=P, workspace=torch.zeros(3, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("mode,k", [("group", 0.5), ("group", 0.4), ("head", 0.4)])
def test_loki_decode_attention_early_start(dtype, mode, k, monkeypatch):
    """kernels.loki.ATTN_EARLY (session 11, the default): the attention reads the bracket records and attends first
    to each row's keys above its bracket, then (on the GPU, after a programmatic-dependent-launch wait for the band
    select, which runs at the same time) to the rest.  Rows long enough for a real bracket (>= 4 x the sample: 64
    keys in the interpreter, 512 on the GPU) and one that is not; the same selection as without the early start, and
    the output within the dtype's tolerance of the float64 attention over it."""
    import kernels.loki as loki
    torch.manual_seed(21)
    S = 300 if DEV == "cpu" else 2400
    B, KVH, g, D, d = 3, 2, 2, 64, 16
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[S, S - 20, 90])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    outs = {}
    for early in (False, True):
        monkeypatch.setattr(loki, "ATTN_EARLY", early)
        outs[early] = loki_decode(q, P, k_lr, k_rest, v, lengths, k, mode=mode, strict=False, path="bracket",
                                  return_indices=True)
    # the split is real: rows whose first #above indices fill at least a whole tile (16 here, 64 on the GPU)
    R = KVH if mode == "group" else KVH * g
    ws = torch.empty(bracket_workspace_size(B, R, S), dtype=torch.int32, device=DEV)
    loki_select_bracket(q, k_lr, lengths, k, P=P, mode=mode, strict=False, workspace=ws)
    rec = bracket_ready(ws, B, R)
    tile = 16 if DEV == "cpu" else 64
    assert ((rec[:, 2] >= tile) & (rec[:, 2] <= rec[:, 4]) & (rec[:, 4] <= rec[:, 2] + rec[:, 3])).any()
    big = torch.iinfo(torch.int32).max
    sel = {e: torch.where(o[1] < 0, big, o[1]).sort(dim=-1).values for e, o in outs.items()}
    assert torch.equal(sel[True], sel[False])  # the same selection (its order within a row is unspecified)
    idx = outs[True][1].cpu()
    ref = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx)
    for e in (False, True):
        assert rel_err(outs[e][0], ref) <= TOL[dtype]


def test_loki_decode_lowrank_waves_rule(monkeypatch):
    """kernels.loki.ATTN_LOWRANK_* (session 12): two waves of attention programs exactly where d <= ATTN_LOWRANK_D
    (ATTN_LOWRANK_ROWS_D where the attention reads whole K rows, session 17),
    S_max >= ATTN_LOWRANK_MIN_S and there are >= ATTN_LOWRANK_MIN_ROWS score rows; ATTN_WIDE_* (session 13): 128-token
    tiles at 2 stages where d >= ATTN_WIDE_MIN_D and there are >= ATTN_WIDE_MIN_ROWS score rows (thresholds lowered
    here to fit the interpreter); the output is the same attention either way."""
    import kernels.loki as loki
    torch.manual_seed(5)
    B, KVH, g, S, D = 2, 2, 2, 200, 64
    configs = []
    run = loki.sparse_decode_attention
    monkeypatch.setattr(loki, "sparse_decode_attention",
                        lambda *a, **kw: configs.append(kw.get("config")) or run(*a, **kw))
    monkeypatch.setattr(loki, "ATTN_LOWRANK_MIN_S", 128)
    wide = dict(loki.ATTN_WIDE_CONFIG)
    assert loki.ATTN_WIDE_MIN_D == 17 and wide == dict(block_n=128, num_stages=2)
    for d, min_rows, want in ((8, 4, dict(waves=loki.ATTN_LOWRANK_WAVES)), (8, 5, None), (32, 4, wide),
                              (32, 5, None), (16, 4, dict(waves=loki.ATTN_LOWRANK_WAVES))):
        monkeypatch.setattr(loki, "ATTN_LOWRANK_MIN_ROWS", min_rows)
        monkeypatch.setattr(loki, "ATTN_WIDE_MIN_ROWS", min_rows)
        k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[S, 150])
        q = torch.randn(B, KVH * g, D, device=DEV)
        P = random_orthonormal(KVH, D, DEV)
        out, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, 0.25, strict=False, path="bracket", return_indices=True)
        assert configs[-1] == want
        ref = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
        assert rel_err(out, ref) <= TOL[torch.float32]
    # a row layout whose attention reads whole K rows (attention.WIDEN_ROWS) keeps SPARSE_CONFIG's tiles at d = 32,
    # in two waves up to d = ATTN_LOWRANK_ROWS_D (session 17), in one beyond it
    monkeypatch.setattr(loki, "ATTN_WIDE_MIN_ROWS", 4)
    assert loki.ATTN_LOWRANK_ROWS_D == 32
    r_lr, r_rest, r_v, r_len, slab = rows_copy(*random_cache(B, KVH, S, D, 32, torch.float32, DEV, lengths=[S, 150]))
    out, idx = loki_decode(q, P, r_lr, r_rest, r_v, r_len, 0.25, strict=False, path="bracket", slab=slab,
                           return_indices=True)
    assert configs[-1] == dict(waves=loki.ATTN_LOWRANK_WAVES)
    ref = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), r_lr.cpu(), r_rest.cpu(), r_v.cpu(), idx.cpu())
    assert rel_err(out, ref) <= TOL[torch.float32]
    monkeypatch.setattr(loki, "ATTN_LOWRANK_ROWS_D", 16)
    loki_decode(q, P, r_lr, r_rest, r_v, r_len, 0.25, strict=False, path="bracket", slab=slab)
    assert configs[-1] is None
    # ... unless ATTN_WIDE_ROWS (session 14, an option measured no faster in the whole step) asks for the wide tiles there
    monkeypatch.setattr(loki, "ATTN_WIDE_ROWS", True)
    out, idx = loki_decode(q, P, r_lr, r_rest, r_v, r_len, 0.25, strict=False, path="bracket", slab=slab,
                           return_indices=True)
    assert configs[-1] == wide
    ref = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), r_lr.cpu(), r_rest.cpu(), r_v.cpu(), idx.cpu())
    assert rel_err(out, ref) <= TOL[torch.float32]
    monkeypatch.setattr(loki, "ATTN_WIDE_ROWS", False)
    monkeypatch.setattr(loki.attn_mod, "WIDEN_ROWS", False)
    loki_decode(q, P, r_lr, r_rest, r_v, r_len, 0.25, strict=False, path="bracket", slab=slab)
    assert configs[-1] == wide


@pytest.mark.parametrize("path", ["bracket", "fused", "split"])
@pytest.mark.parametrize("kv", [True, False])
def test_loki_decode_row_layout(path, kv):
    """A row layout (`allocate_cache_rows`, session 13): the scoring pass reads the slab copy (slab=), the attention
    whole rows through the k_lr / k_rest / v views; the same output and selection as the slab layout holding the
    same values.  A slab that does not match k_lr is refused before any launch."""
    torch.manual_seed(7)
    B, KVH, S, D, d, g = 3, 2, 300, 64, 16, 3
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[300, 257, 9])
    r_lr, r_rest, r_v, r_len, slab = rows_copy(k_lr, k_rest, v, lengths, kv=kv)
    assert not r_lr.is_contiguous()  # (a view of whole rows)
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    for k in (40, 0.25):
        kw = dict(path=path, strict=False, return_indices=True)
        if isinstance(k, float) and path != "bracket":
            kw["k_max"] = S
        o_s, i_s = loki_decode(q, P, k_lr, k_rest, v, lengths, k, **kw)
        o_r, i_r = loki_decode(q, P, r_lr, r_rest, r_v, r_len, k, slab=slab, **kw)
        assert torch.equal(i_s.sort(-1).values, i_r.sort(-1).values)
        assert rel_err(o_r, o_s) <= 1e-6
    with pytest.raises(LokiInputError, match="slab must match k_lr"):
        loki_decode(q, P, r_lr, r_rest, r_v, r_len, 40, slab=slab.to(torch.float16))


@pytest.mark.parametrize("g,path", [(8, "bracket"), (8, "split"), (16, "bracket"), (16, "split")])
def test_score_operand_packing_boundaries(g, path):
    """Session 19 (`scores.SCORES_PACK`): the hi / lo halves of q' share one MMA operand where 2 x heads per score row
    fits its 16 columns.  g = 8 fills them exactly (packed); g = 16 does not (two dots).  Both select exactly."""
    torch.manual_seed(40 + g)
    B, KVH, S, D, d, k = 2, 2, 300, 64, 16, 37
    k_lr, k_rest, v, L = random_cache(B, KVH, S, D, d, torch.float16, DEV, lengths=[300, 171])
    q = torch.randn(B, KVH * g, D, device=DEV).half()
    P = random_orthonormal(KVH, D, DEV)
    for mode in ("group", "head"):
        out, idx = loki_decode(q, P, k_lr, k_rest, v, L, k, mode=mode, path=path, strict=False, return_indices=True)
        ref_out, _, ref_scores = loki_decode_ref(q.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), L.cpu(), k,
                                                 mode=mode)
        tol = 1e-5 * ref_scores[torch.isfinite(ref_scores)].abs().max().item()
        n, exact = check_selection(idx, ref_scores, L.cpu(), budgets_ref(k, L.cpu()), tol=tol)
        assert exact >= n // 2  # (the rest: the k-th gap within 2 tol, where check_selection allows either key)
        assert rel_err(out, ref_out) <= TOL[torch.float16]
