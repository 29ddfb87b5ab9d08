"""The bracket path (kernels/bracket.py): scores with the selection pass fused in, band select, exact fallback."""
import pytest
import torch

from kernels import forced_count, loki_decode, loki_select_bracket
from kernels.scores import loki_scores_ref, rotate_q_ref
from kernels.testing import check_selection, random_cache, random_orthonormal
from kernels.topk import budgets_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ref(q, P, k_lr, lengths, mode, reduce, sink=0, local=0):
    s = loki_scores_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), lengths.cpu(), mode=mode, reduce=reduce)
    S = s.shape[-1]
    pos = torch.arange(S)[None, :]
    n = lengths.cpu().long()[:, None]
    forced = (pos < n) & ((pos < sink) | (pos >= n - local))
    return s.masked_fill(forced[:, None, :], float("inf"))


def _tol(ref, dtype=torch.float32):
    """Score tolerance: IEEE fp32 dots for fp32 caches, split 16-bit tensor-core dots otherwise (scores.py)."""
    fin = torch.isfinite(ref)
    return (2e-6 if dtype == torch.float32 else 2e-5) * ref[fin].abs().max().item()


SHORT, LONG = (50, [50, 33, 2]), (300, [300, 257, 255])  # rows below / above 4 x SAMPLE (64 under the interpreter)


@pytest.mark.parametrize("D,d,g,mode,reduce,S,lens", [
    (64, 8, 3, "group", "max", *SHORT), (64, 16, 1, "group", "sum", *SHORT), (128, 32, 4, "group", "max", *SHORT),
    (128, 32, 4, "head", "sum", *SHORT), (64, 8, 3, "group", "max", *LONG), (64, 16, 4, "group", "max", *LONG)])
def test_bracket_select(dtype, D, d, g, mode, reduce, S, lens, variant=None):
    """Against the float64 reference: odd shapes, group sizes 1/3/4, rows below and above 4 x SAMPLE (64 here)."""
    variant = variant or {}
    torch.manual_seed(D * g + d + S)
    B, KVH = 3, 2
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, dtype, DEV, lengths=lens)
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    ref = _ref(q, P, k_lr, lengths, mode, reduce)
    for k in (1, S // 8, S):
        idx, q_rot = loki_select_bracket(q, k_lr, lengths, k, P=P, mode=mode, reduce=reduce, strict=False, **variant)
        assert (q_rot.double().cpu() - rotate_q_ref(q.cpu(), P.cpu())).abs().max().item() < 1e-4
        n, exact = check_selection(idx, ref, lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=_tol(ref, dtype))
        assert exact >= n // 2  # exact set equality is asserted wherever the boundary gap exceeds 2 * tol


# the default is classify="split" with bands selected in registers; the other two: the v4 classification inside
# the scoring kernel, and the radix select for bands larger than band_reg
VARIANTS = {"fused": dict(classify="fused"), "radix_band": dict(band_reg=16)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("D,d,g,S,lens", [(64, 8, 3, *LONG), (64, 16, 4, *LONG)])
def test_bracket_select_variants(D, d, g, S, lens, variant):
    test_bracket_select(torch.float32, D, d, g, "group", "max", S, lens, VARIANTS[variant])


@pytest.mark.parametrize("nsig,variant", [(0.0, None), (4.0, None), (0.0, "fused"), (0.0, "radix_band")])
def test_bracket_fallback_and_structure(nsig, variant):
    """nsig=0 makes the bracket miss often (the recompute + whole-row fallback runs); rows with a positional trend
    and with periodic structure defeat an evenly spaced sample; per-sequence budgets."""
    torch.manual_seed(11)
    B, KVH, g, S, D, d = 2, 2, 2, 400, 64, 16
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[400, 333])
    pos = torch.arange(S, dtype=torch.float32, device=DEV)
    k_lr[0, 1, :, 0] += pos / 100  # trend
    k_lr[1, 0, :, 0] = torch.sin(pos) * 3  # periodic
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = torch.eye(D, device=DEV).expand(KVH, D, D).contiguous()
    ref = _ref(q, P, k_lr, lengths, "group", "max")
    kt = torch.tensor([50, 5], dtype=torch.int32, device=DEV)
    for k in (1, 50, kt):
        idx, _ = loki_select_bracket(q, k_lr, lengths, k, P=P, strict=False, nsig=nsig, **VARIANTS.get(variant, {}))
        kk = k.cpu() if isinstance(k, torch.Tensor) else k
        n, exact = check_selection(idx, ref, lengths.cpu(), budgets_ref(kk, lengths.cpu()), tol=_tol(ref))
        assert exact >= n // 2


@pytest.mark.parametrize("sink,local,classify", [(4, 16, "split"), (0, 7, "split"), (40, 200, "split"),
                                                  (4, 16, "fused")])
def test_bracket_sinks_and_local_window(sink, local, classify):
    """Sink tokens and the local window are always selected and count towards the budget (as select_topk)."""
    torch.manual_seed(sink + local)
    B, KVH, g, S, D, d = 3, 2, 3, 300, 64, 8
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[300, 260, 20])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    budget = torch.maximum(torch.full((B,), 60, device=DEV), forced_count(lengths, sink, local)).to(torch.int32)
    budget = torch.minimum(budget, lengths)
    idx, _ = loki_select_bracket(q, k_lr, lengths, budget, P=P, strict=False, sink_tokens=sink, local_window=local,
                                 classify=classify)
    ref = _ref(q, P, k_lr, lengths, "group", "max", sink, local)
    kbs = budgets_ref(budget.cpu(), lengths.cpu())
    check_selection(idx, ref.clamp(max=1e30), lengths.cpu(), kbs, tol=_tol(ref))
    for b in range(B):
        n = int(lengths[b])
        must = set(range(min(sink, n))) | set(range(max(n - local, 0), n))
        for r in range(KVH):
            assert must <= set(idx[b, r, :kbs[b]].tolist())
    out = loki_decode(q, P, k_lr, k_rest, v, lengths, budget, strict=False, sink_tokens=sink, local_window=local)
    assert out.shape == (B, KVH * g, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", [None, "fused", "radix_band"])
def test_bracket_heavy_ties(variant):
    """Keys with few distinct scores: many ties at the k-th value.  Exactly k distinct positions are selected, none
    scoring below the k-th value and none left out above it (the register select takes the first ties it meets)."""
    torch.manual_seed(5)
    B, KVH, g, S, D, d = 2, 2, 2, 300, 64, 8
    k_lr = torch.randint(-2, 3, (B, KVH, S, d)).float().to(DEV)
    lengths = torch.tensor([300, 280], dtype=torch.int32, device=DEV)
    q = torch.zeros(B, KVH * g, D, device=DEV)
    q[..., :d] = torch.randint(-1, 2, (B, KVH * g, d)).float()
    P = torch.eye(D, device=DEV).expand(KVH, D, D).contiguous()
    ref = _ref(q, P, k_lr, lengths, "group", "max")
    for k in (1, 37, 150):
        idx, _ = loki_select_bracket(q, k_lr, lengths, k, P=P, strict=False, **VARIANTS.get(variant, {}))
        check_selection(idx, ref, lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=1e-6)
