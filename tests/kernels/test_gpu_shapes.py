"""GPU-only: production tile sizes (several tiles per pass, splits), Llama-3-8B head shapes, bf16."""
import pytest
import torch

from kernels import dense_decode_attention, fraction_budget, loki_decode, topk_select
from kernels.attention import dense_attention_ref, sparse_attention_ref
from kernels.reference import loki_decode_ref
from kernels.scores import rotate_q_ref
from kernels.testing import check_selection, random_cache, random_orthonormal, rel_err, rows_copy
from kernels.topk import budgets_ref, topk_select_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("path", ["bracket", "fused", "split"])
@pytest.mark.parametrize("d,frac,mode", [(32, 8, "group"), (16, 16, "group"), (32, 4, "head")])
def test_loki_decode_gpu(path, d, frac, mode):
    torch.manual_seed(d + frac)
    B, KVH, g, S, D = 2, 8, 4, 12000, 128
    lens = [12000, 4321]  # the long row takes the sampled-bracket path, the short one the direct radix select
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.bfloat16, "cuda", lengths=lens)
    q = torch.randn(B, KVH * g, D, device="cuda", dtype=torch.bfloat16)
    P = random_orthonormal(KVH, D, "cuda")
    k = S // frac
    out, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, k, mode=mode, path=path, strict=False,
                           return_indices=True)
    torch.cuda.synchronize()
    check_step(out, idx, q, P, k_lr, k_rest, v, lengths, k, mode)


def check_step(out, idx, q, P, k_lr, k_rest, v, lengths, k, mode="group"):
    """A whole step against the float64 reference: the selection exact wherever the boundary gap exceeds 2 * tol
    (top-k up to tol elsewhere: long rows have near-ties), the output within bf16 tolerance of attention over its
    own selection and over the reference's."""
    ref_out, _, ref_scores = loki_decode_ref(q.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(), k,
                                             mode=mode)
    fin = torch.isfinite(ref_scores)
    tol = 2e-5 * ref_scores[fin].abs().max().item()
    check_selection(idx, ref_scores, lengths.cpu(), budgets_ref(k, lengths.cpu()), tol)
    ref_own = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert rel_err(out, ref_own) <= 1e-2
    assert rel_err(out, ref_out) <= 1e-2


@pytest.mark.parametrize("config", [None, dict(hilo=True), dict(hilo=True, num_stages=2, waves=2),
                                    dict(evict=True, maxnreg=128, num_stages=2, waves=3)],
                         ids=["default", "hilo", "session8", "evict_maxnreg128"])
@pytest.mark.parametrize("cache_hints", [True, False])
def test_loki_decode_gpu_options(config, cache_hints, monkeypatch):
    """Session 10's options at a production shape: the sparse attention's dots (hilo), stages and waves, L2 hints on
    its gathers (evict) and a register cap (maxnreg), and the bracket path's L2 hints on and off: exact selection,
    output within bf16 tolerance of the float64 reference."""
    import kernels.attention as attention
    import kernels.bracket as bracket
    monkeypatch.setattr(attention, "SPARSE_CONFIG", dict(attention.SPARSE_CONFIG, **(config or {})))
    monkeypatch.setattr(bracket, "BRACKET_CACHE_HINTS", cache_hints)
    _step_16k(11, 32, 7001, 8)


def _step_16k(seed: int, d: int, short: int, k_div: int):
    """One step at S_max = 16K (Llama-3-8B heads, two sequences: 16384 and `short` tokens, budget S // k_div) against
    the float64 reference (`check_step`)."""
    torch.manual_seed(seed)
    B, KVH, g, S, D = 2, 8, 4, 16384, 128
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.bfloat16, "cuda", lengths=[16384, short])
    q = torch.randn(B, KVH * g, D, device="cuda", dtype=torch.bfloat16)
    P = random_orthonormal(KVH, D, "cuda")
    k = S // k_div
    out, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, k, strict=False, return_indices=True)
    torch.cuda.synchronize()
    check_step(out, idx, q, P, k_lr, k_rest, v, lengths, k)


@pytest.mark.parametrize("d,maxnreg", [(16, 0), (16, 112), (32, 96)])
def test_loki_decode_gpu_session12_options(d, maxnreg, monkeypatch):
    """Session 12's options at a production shape (S_max 16K): the scoring kernel launched during the rotation and
    two waves of attention programs where d <= 16 (BRACKET_ROTATE_PDL with _MAX_D / _MIN_S, kernels.loki
    ATTN_LOWRANK_D: the defaults), and the band select under a register cap (BRACKET_FINISH_MAXNREG, an option):
    exact selection, output within bf16 tolerance of the float64 reference."""
    import kernels.bracket as bracket
    import kernels.loki as loki
    monkeypatch.setattr(bracket, "BRACKET_ROTATE_PDL", 1)
    monkeypatch.setattr(bracket, "BRACKET_ROTATE_PDL_MAX_D", 16)
    monkeypatch.setattr(bracket, "BRACKET_ROTATE_PDL_MIN_S", 16384)
    monkeypatch.setattr(bracket, "BRACKET_FINISH_MAXNREG", maxnreg)
    monkeypatch.setattr(loki, "ATTN_LOWRANK_D", 16)
    monkeypatch.setattr(loki, "ATTN_LOWRANK_MIN_ROWS", 16)  # (2 sequences x 8 KV heads here)
    _step_16k(13 + d, d, 9001, 16)


@pytest.mark.parametrize("d,flow,rows", [(32, True, False), (32, "auto", True), (16, True, True), (16, "auto", False)])
def test_loki_decode_gpu_session13(d, flow, rows, monkeypatch):
    """Session 13 at a production shape (S_max 16K): the classify kernel started during the scoring pass, waiting on
    each row's count (BRACKET_FLOW; True also where the rotation PDL is on, d = 16), 128-token attention tiles at
    d = 32 (kernels.loki.ATTN_WIDE_*, the row threshold lowered to this test's 16 rows), and the "rows" layout (whole
    K rows + a slab copy, `allocate_cache_rows`): exact selection, output within bf16 tolerance of the reference."""
    import kernels.bracket as bracket
    import kernels.loki as loki
    monkeypatch.setattr(bracket, "BRACKET_FLOW", flow)
    monkeypatch.setattr(loki, "ATTN_WIDE_MIN_ROWS", 16)
    monkeypatch.setattr(loki, "ATTN_LOWRANK_MIN_ROWS", 16)
    torch.manual_seed(31 + d)
    B, KVH, g, S, D = 2, 8, 4, 16384, 128
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.bfloat16, "cuda", lengths=[16384, 8191])
    q = torch.randn(B, KVH * g, D, device="cuda", dtype=torch.bfloat16)
    P = random_orthonormal(KVH, D, "cuda")
    k = S // 8
    *cache, slab = rows_copy(k_lr, k_rest, v, lengths) if rows else (k_lr, k_rest, v, lengths, None)
    for _ in range(2):  # (the second step reuses the counters the first one left)
        out, idx = loki_decode(q, P, *cache, k, strict=False, return_indices=True, slab=slab)
    torch.cuda.synchronize()
    check_step(out, idx, q, P, k_lr, k_rest, v, lengths, k)


def test_topk_gpu_long_rows():
    torch.manual_seed(0)
    B, G, S = 3, 8, 70000
    scores = torch.randn(B, G, S, device="cuda")
    scores[2, :, ::5] = 1.0  # ties
    lengths = torch.tensor([70000, 65536, 33333], dtype=torch.int32, device="cuda")
    for k in (1, 4096, 8750, 33333):
        idx = topk_select(scores, lengths, k, strict=False)
        n, exact = check_selection(idx, scores.cpu(), lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=0.0)
        ref = topk_select_ref(scores[:2].cpu(), lengths[:2].cpu(), k)
        assert torch.equal(idx[:2].long().cpu().sort(-1).values, ref.sort(-1).values)


def test_dense_gpu():
    torch.manual_seed(1)
    B, KVH, g, S, D, d = 2, 8, 4, 9000, 128, 32
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.bfloat16, "cuda", lengths=[9000, 5001])
    q = torch.randn(B, KVH * g, D, device="cuda")
    o = dense_decode_attention(q, k_lr, k_rest, v, lengths)
    ref = dense_attention_ref(q.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu())
    assert rel_err(o, ref) <= 1e-2


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "s7_loop"])
def test_loki_decode_gpu_graph(ahead, monkeypatch):
    """The whole step at a production shape with the sparse loop of session 8 (indices one tile ahead, the default)
    and of sessions 1-7, eagerly and replayed from a CUDA graph, against the float64 reference."""
    import kernels.attention as attention
    monkeypatch.setattr(attention, "SPARSE_CONFIG", dict(attention.SPARSE_CONFIG, ahead=ahead,
                                                         **({} if ahead else dict(num_stages=3))))
    torch.manual_seed(7)
    B, KVH, g, S, D, d = 3, 8, 4, 20000, 128, 32
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.bfloat16, "cuda", lengths=[20000, 9999, 3])
    q = torch.randn(B, KVH * g, D, device="cuda", dtype=torch.bfloat16)
    P = random_orthonormal(KVH, D, "cuda")
    k = 0.125
    out, idx = loki_decode(q, P, k_lr, k_rest, v, lengths, k, strict=False, return_indices=True)
    graph_out = torch.empty_like(out)
    loki_decode(q, P, k_lr, k_rest, v, lengths, k, strict=False, out=graph_out)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    graph_out.zero_()
    with torch.cuda.graph(graph):
        loki_decode(q, P, k_lr, k_rest, v, lengths, k, strict=False, out=graph_out)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    budgets = fraction_budget(k, lengths).long().cpu()
    ref_out, _, ref_scores = loki_decode_ref(q.cpu(), P.cpu(), k_lr.cpu(), k_rest.cpu(), v.cpu(), lengths.cpu(),
                                             budgets, mode="group")
    fin = torch.isfinite(ref_scores)
    tol = 2e-5 * ref_scores[fin].abs().max().item()
    check_selection(idx, ref_scores, lengths.cpu(), budgets, tol)
    ref_own = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx.cpu())
    assert rel_err(out, ref_own) <= 1e-2
    assert rel_err(out, ref_out) <= 1e-2
    assert rel_err(graph_out, ref_out) <= 1e-2
