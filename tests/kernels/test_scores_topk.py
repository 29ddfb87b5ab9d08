import pytest
import torch

from kernels import LokiInputError, loki_scores, loki_select, rotate_q, topk_select
from kernels.scores import loki_scores_ref, rotate_q_ref
from kernels.testing import check_selection, random_cache, random_orthonormal
from kernels.topk import budgets_ref, topk_select_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_score_tol(ref):
    fin = torch.isfinite(ref)
    return 2e-5 * ref[fin].abs().max().item()


# (D, d, g): odd shapes, group sizes 1, 3, 4
SHAPES = [(64, 8, 3), (64, 16, 1), (128, 32, 4)]


@pytest.mark.parametrize("D,d,g", SHAPES)
@pytest.mark.parametrize("mode,reduce", [("group", "max"), ("group", "sum"), ("head", "sum")])
def test_scores(dtype, D, d, g, mode, reduce):
    torch.manual_seed(D + d + g)
    B, KVH, S = 3, 2, 77
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[77, 40, 1])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    q_rot = rotate_q(q, P)
    q_rot_ref = rotate_q_ref(q.cpu(), P.cpu())
    assert (q_rot.double().cpu() - q_rot_ref).abs().max().item() < 1e-4
    R = KVH if mode == "group" else KVH * g
    out = torch.full((B, R, S), float("nan"), device=DEV)  # poisoned
    s = loki_scores(q_rot, k_lr, lengths, d=d, mode=mode, reduce=reduce, out=out)
    assert s is out  # written into the caller's (poisoned) buffer
    ref = loki_scores_ref(q_rot_ref, k_lr.cpu(), lengths.cpu(), mode=mode, reduce=reduce)
    s = s.cpu()
    assert torch.equal(torch.isinf(s), torch.isinf(ref)), "-inf tail beyond lengths"
    fin = torch.isfinite(ref)
    assert (s.double()[fin] - ref[fin]).abs().max().item() <= _rel_score_tol(ref)


@pytest.mark.parametrize("D,g", [(64, 3), (128, 4), (96, 1)])
@pytest.mark.parametrize("warps", [2, 8])
def test_rotate_q_warps(D, g, warps, monkeypatch):
    """scores.ROTATE_WARPS (session 15: 2, was 4; the interpreter always runs 4): q @ P[kvh] as the float64
    reference gives it, to fp32 rounding, for D not a power of 2 too."""
    import kernels.scores as sc
    monkeypatch.setattr(sc, "ROTATE_WARPS", warps)
    torch.manual_seed(D + g + warps)
    B, KVH = 3, 2
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    err = (rotate_q(q, P).double().cpu() - rotate_q_ref(q.cpu(), P.cpu())).abs().max().item()
    assert err < 1e-5 * q.abs().max().item() * D ** 0.5


@pytest.mark.parametrize("k", [1, 13, 77])
def test_topk_select(k):
    torch.manual_seed(k)
    B, G, S = 3, 2, 77
    lengths = torch.tensor([77, 30, 1], dtype=torch.int32, device=DEV)
    scores = torch.randn(B, G, S, device=DEV) * 3
    scores[0, 0] = scores[0, 0].abs()  # all positive
    scores[0, 1] = -scores[0, 1].abs()  # all negative
    out = torch.full((B, G, k), 12345, dtype=torch.int32, device=DEV)  # poisoned
    idx = topk_select(scores, lengths, k, strict=False, out=out)
    assert idx is out
    n, exact = check_selection(idx, scores.cpu(), lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=0.0)
    assert exact == n
    assert torch.equal(idx.long().cpu().sort(-1).values, topk_select_ref(scores.cpu(), lengths.cpu(), k).sort(-1).values)


def test_topk_hard_keys():
    """Values that share 3 of 4 radix digits (forces every pass), ties, and per-sequence budgets (int64 out)."""
    torch.manual_seed(7)
    B, G, S = 3, 2, 300
    base = torch.tensor(1.5).view(torch.int32).item()
    bits = base + torch.randint(0, 64, (B, G, S), dtype=torch.int32)
    scores = bits.view(torch.float32).to(DEV)
    scores[2, :, ::3] = 0.25  # many exact ties in the last sequence
    lengths = torch.tensor([300, 211, 150], dtype=torch.int32, device=DEV)
    k = torch.tensor([100, 1, 149], dtype=torch.int32, device=DEV)
    idx = topk_select(scores, lengths, k, index_dtype=torch.int64)
    assert idx.dtype == torch.int64 and idx.shape == (B, G, 149)
    check_selection(idx, scores.cpu(), lengths.cpu(), budgets_ref(k.cpu(), lengths.cpu()), tol=0.0)


def test_topk_large_row():
    """A long row (many tiles per pass) with k = 1/8 of it."""
    torch.manual_seed(3)
    B, G, S = 1, 1, 3000
    scores = torch.randn(B, G, S, device=DEV)
    lengths = torch.tensor([2999], dtype=torch.int32, device=DEV)
    ref = topk_select_ref(scores.cpu(), lengths.cpu(), 375)
    for sample in (None, 0):  # sampled bracket + band, and the direct full-row radix select
        idx = topk_select(scores, lengths, 375, sample=sample)
        assert torch.equal(idx.long().cpu().sort(-1).values, ref)


@pytest.mark.parametrize("nsig", [0.0, 4.0])
def test_topk_bracket_paths(nsig):
    """Sample-bracket path (band select) and its exact fallback when the bracket misses (nsig=0 misses often)."""
    torch.manual_seed(11)
    B, G, S = 2, 3, 400
    pos = torch.arange(S, dtype=torch.float32)
    scores = torch.randn(B, G, S)
    scores[0, 1] += pos / 50  # positional trend
    scores[1, 2] = torch.sin(pos) * 2 + 0.01 * torch.randn(S)  # periodic structure
    scores = scores.to(DEV)
    lengths = torch.tensor([400, 333], dtype=torch.int32, device=DEV)
    for k in (1, 50):
        idx = topk_select(scores, lengths, k, sample=32, nsig=nsig)
        n, exact = check_selection(idx, scores.cpu(), lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=0.0)
        assert exact == n


@pytest.mark.parametrize("D,d,g,mode,reduce", [(64, 8, 3, "group", "max"), (64, 16, 1, "group", "sum"),
                                               (128, 32, 4, "group", "sum"), (128, 32, 4, "head", "max"),
                                               (64, 8, 3, "head", "sum")])
def test_loki_select_fused(dtype, D, d, g, mode, reduce):
    torch.manual_seed(D * g + d)
    B, KVH, S = 3, 2, 50
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=[50, 33, 2])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    k = 9
    idx, q_rot = loki_select(q, k_lr, lengths, k, P=P, mode=mode, reduce=reduce, strict=False)
    q_rot_ref = rotate_q_ref(q.cpu(), P.cpu())
    assert (q_rot.double().cpu() - q_rot_ref).abs().max().item() < 1e-4
    ref = loki_scores_ref(q_rot_ref, k_lr.cpu(), lengths.cpu(), mode=mode, reduce=reduce)
    n, exact = check_selection(idx, ref, lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=_rel_score_tol(ref))
    assert exact >= n - 1  # random inputs: (almost) never tied within the tolerance
    # same as scores + topk_select on the split path
    s = loki_scores(q_rot, k_lr, lengths, mode=mode, reduce=reduce)
    n, exact = check_selection(topk_select(s, lengths, k, strict=False), ref, lengths.cpu(),
                               budgets_ref(k, lengths.cpu()), tol=_rel_score_tol(ref))
    assert exact >= n - 1


def test_select_bad_inputs():
    B, KVH, S, D, d = 2, 2, 16, 64, 16
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[16, 5])
    q = torch.randn(B, 4, D, device=DEV)
    scores = torch.randn(B, KVH, S, device=DEV)
    with pytest.raises(LokiInputError, match="larger than the length"):
        topk_select(scores, lengths, 6)
    with pytest.raises(LokiInputError, match="larger than the sequence length"):
        topk_select(scores, lengths, torch.tensor([3, 6], device=DEV))
    with pytest.raises(LokiInputError, match="float32"):
        topk_select(scores.half(), lengths, 2)
    with pytest.raises(LokiInputError, match="k must be >= 1"):
        topk_select(scores, lengths, 0)
    with pytest.raises(LokiInputError, match="contiguous"):
        topk_select(torch.randn(B, KVH, 2 * S, device=DEV)[..., ::2], lengths, 2)
    with pytest.raises(LokiInputError, match="does not match the low-rank slab"):
        loki_scores(q, k_lr, lengths, d=32)
    with pytest.raises(LokiInputError, match="multiple"):
        loki_scores(torch.randn(B, 3, D, device=DEV), k_lr, lengths)
    with pytest.raises(LokiInputError, match="mode"):
        loki_scores(q, k_lr, lengths, mode="token")
    with pytest.raises(LokiInputError, match="reduce"):
        loki_scores(q, k_lr, lengths, reduce="mean")
    with pytest.raises(LokiInputError, match="lengths"):
        loki_scores(q, k_lr, lengths[:1])
    with pytest.raises(LokiInputError, match=f"lengths exceed S_max={S}"):  # strict=True, the default
        loki_scores(q, k_lr, lengths + S)
    clipped = loki_scores(q, k_lr, torch.full_like(lengths, S + 7), strict=False)  # clipped to S_max on the device
    assert torch.equal(clipped, loki_scores(q, k_lr, torch.full_like(lengths, S)))
    with pytest.raises(LokiInputError, match="P must have shape"):
        loki_select(q, k_lr, lengths, 2, P=random_orthonormal(KVH, 32, DEV))
