"""The bracket path (kernels/bracket.py): scores with the selection pass fused in, band select, exact fallback."""

import math

import pytest
import torch
import triton
import triton.language as tl

from kernels import LokiInputError, forced_count, fraction_budget, loki_decode, loki_select_bracket
from kernels._utils import is_interpreter
from kernels.bracket import _kth_key, _select_in_registers, _select_in_registers3
from kernels.attention import sparse_attention_ref
from kernels.scores import loki_scores_ref, rotate_q_ref
from kernels.testing import check_selection, random_cache, random_orthonormal, rel_err
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


# the default is classify="split" with the brackets written alongside the scoring pass (overlap) and bands selected
# in registers; the others: the bracket kernel before the scoring kernel (session 4), the v4 classification inside
# the scoring kernel, the radix select for bands larger than band_reg, and the one-program-per-row scan (v8), with
# its band in registers and with the band radix select; and the scoring kernel's tile loop, software-pipelined over
# several tiles per program (the default since session 7 has one per program here; this: 2 programs per row, 5 tiles
# each) or unrolled (stages=0, the default until session 6)
VARIANTS = {"no_overlap": dict(overlap=False), "fused": dict(classify="fused"), "radix_band": dict(band_reg=16),
            "band3": dict(band_reg=128, band_parts=3), "band3_small": dict(band_reg=64, band_parts=3),
            "scan": dict(classify="scan"), "scan_radix_band": dict(classify="scan", band_reg=16),
            "pipelined": dict(config=dict(stages=3, programs=8)), "unrolled": dict(config=dict(stages=0)),
            "vec": dict(config=dict(classify_vec=4)), "vec2": dict(config=dict(classify_vec=2)),
            "flow": dict(flow=True), "flow_pipelined": dict(flow=True, config=dict(stages=3, programs=8))}


# each variant on one of the two long-row shapes (group sizes 3 and 4, d = 8 and 16), alternating: the default path
# runs both (test_bracket_select), and CI time goes to the variants' own code, not to a second shape of it
_VARIANT_SHAPES = [(64, 8, 3, *LONG), (64, 16, 4, *LONG)]


@pytest.mark.parametrize("variant,D,d,g,S,lens", [(v, *_VARIANT_SHAPES[i % 2]) for i, v in enumerate(VARIANTS)],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_bracket_select_variants(D, d, g, S, lens, variant):
    test_bracket_select(torch.float32, D, d, g, "group", "max", S, lens, VARIANTS[variant])


@pytest.mark.parametrize("nsig,variant", [(0.0, None), (4.0, None), (0.0, "no_overlap"), (0.0, "fused"),
                                          (0.0, "radix_band"), (0.0, "scan"), (0.0, "vec"), (4.0, "vec"),
                                          (0.0, "flow")])
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


@pytest.mark.parametrize("sink,local,classify,overlap", [(4, 16, "split", True), (0, 7, "split", True),
                                                          (40, 200, "split", True), (4, 16, "split", False),
                                                          (4, 16, "fused", False), (40, 200, "scan", True)])
def test_bracket_sinks_and_local_window(sink, local, classify, overlap):
    """Sink tokens and the local window are always selected and count towards the budget (as select_topk)."""
    torch.manual_seed(sink + local)
    B, KVH, g, S, D, d = 3, 2, 3, 300, 64, 8
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[300, 260, 20])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    budget = torch.maximum(torch.full((B,), 60, device=DEV), forced_count(lengths, sink, local)).to(torch.int32)
    budget = torch.minimum(budget, lengths)
    idx, _ = loki_select_bracket(q, k_lr, lengths, budget, P=P, strict=False, sink_tokens=sink, local_window=local,
                                 classify=classify, overlap=overlap)
    ref = _ref(q, P, k_lr, lengths, "group", "max", sink, local)
    kbs = budgets_ref(budget.cpu(), lengths.cpu())

    def check_forced_kept(idx):  # a valid selection that holds every sink and every local-window position
        check_selection(idx, ref.clamp(max=1e30), lengths.cpu(), kbs, tol=_tol(ref))
        for b in range(B):
            n = int(lengths[b])
            must = set(range(min(sink, n))) | set(range(max(n - local, 0), n))
            for r in range(KVH):
                assert must <= set(idx[b, r, :kbs[b]].tolist())

    check_forced_kept(idx)
    # the whole step with sinks and a local window: its own selection keeps them too, and its output is exact
    # attention over that selection (float64)
    out, idx2 = loki_decode(q, P, k_lr, k_rest, v, lengths, budget, strict=False, sink_tokens=sink,
                            local_window=local, return_indices=True)
    assert out.shape == (B, KVH * g, D)
    check_forced_kept(idx2)
    idx_ref = idx2.cpu().clone()
    for b in range(B):
        idx_ref[b, :, kbs[b]:] = -1
    want = sparse_attention_ref(rotate_q_ref(q.cpu(), P.cpu()), k_lr.cpu(), k_rest.cpu(), v.cpu(), idx_ref)
    assert rel_err(out.cpu(), want) <= 1e-4


def _tied_case(seed, lens):
    """Integer keys and queries on an identity basis: few distinct scores, heavy ties.  (q, k_lr, lengths, P, ref)"""
    torch.manual_seed(seed)
    B, KVH, g, S, D, d = len(lens), 2, 2, 300, 64, 8
    k_lr = torch.randint(-2, 3, (B, KVH, S, d)).float().to(DEV)
    lengths = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.zeros(B, KVH * g, D, device=DEV)
    q[..., :d] = torch.randint(-1, 2, (B, KVH * g, d)).float()
    P = torch.eye(D, device=DEV).expand(KVH, D, D).contiguous()
    return q, k_lr, lengths, P, _ref(q, P, k_lr, lengths, "group", "max")


@pytest.mark.parametrize("variant", [None, "fused", "radix_band", "band3", "vec", "flow"])  # (classify="scan": test_bracket_scan_deterministic)
def test_bracket_heavy_ties(variant):
    """Keys with few distinct scores: many ties at the k-th value.  Exactly k distinct positions are selected, none
    scoring below the k-th value and none left out above it (the register select takes the first ties it meets)."""
    q, k_lr, lengths, P, ref = _tied_case(5, [300, 280])
    for k in (1, 37, 150):
        idx, _ = loki_select_bracket(q, k_lr, lengths, k, P=P, strict=False, **VARIANTS.get(variant, {}))
        check_selection(idx, ref, lengths.cpu(), budgets_ref(k, lengths.cpu()), tol=1e-6)


@pytest.mark.parametrize("frac,sink,local,classify", [(0.1, 0, 0, None), (0.125, 0, 0, None), (1 / 3, 4, 16, None),
                                                     (1.0, 0, 0, None), (0.01, 40, 200, None), (1 / 3, 4, 16, "scan"),
                                                     (0.56, 0, 0, None)])
def test_bracket_fraction_budget(frac, sink, local, classify):
    """A float budget is ceil(frac * n_b) per sequence, exact (0.56 of 25 is 14 where float64 says 15; 1/3 of 300 is
    100), raised to the forced count, computed inside the kernels: the same selections as the int tensor
    `fraction_budget` gives, on ragged lengths (incl. 1 and 0)."""
    from fractions import Fraction

    torch.manual_seed(int(frac * 1000) + sink)
    B, KVH, g, S, D, d = 6, 2, 2, 300, 64, 8
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[300, 257, 25, 10, 1, 0])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    kb = fraction_budget(frac, lengths, sink, local)
    exact = Fraction(frac).limit_denominator(10**6)  # the decimal (or third) the float stands for
    want = [min(max(math.ceil(exact * n), min(n, sink + local), 1), n) for n in lengths.tolist()]
    assert kb.cpu().long().tolist() == want
    if frac == 0.56:
        assert want[:3] == [168, 144, 14]  # float64 ceil(0.56 * n): 169, 144, 15
    k_max = int(kb.max())
    i_f, _ = loki_select_bracket(q, k_lr, lengths, frac, P=P, strict=False, sink_tokens=sink, local_window=local,
                                 k_max=k_max, classify=classify)
    i_t, _ = loki_select_bracket(q, k_lr, lengths, kb, P=P, strict=False, sink_tokens=sink, local_window=local,
                                 k_max=k_max, classify=classify)
    assert i_f.shape == i_t.shape == (B, KVH, k_max)
    assert torch.equal(i_f.sort(dim=-1).values, i_t.sort(dim=-1).values)
    for b in range(B):
        assert int((i_f[b] >= 0).sum(-1).max()) == int(kb[b]) and int((i_f[b] >= 0).sum(-1).min()) == int(kb[b])
    # loki_decode: the float budget on the bracket path (in-kernel) and on the split path (converted in torch)
    o_b = loki_decode(q, P, k_lr, k_rest, v, lengths, frac, strict=True, sink_tokens=sink, local_window=local)
    if not (sink or local):
        o_s = loki_decode(q, P, k_lr, k_rest, v, lengths, frac, path="split")
        assert (o_b - o_s).abs().max().item() < 1e-4
    # the default k_max of a float budget covers the largest possible budget
    i_d, _ = loki_select_bracket(q, k_lr, lengths, frac, P=P, strict=False, sink_tokens=sink, local_window=local,
                                 classify=classify)
    assert i_d.shape[-1] >= k_max and torch.equal(i_d[..., :k_max].sort(-1).values, i_f.sort(-1).values)


@pytest.mark.parametrize("variant,nsig", [("scan", 4.0), ("scan_radix_band", 0.0)])
def test_bracket_scan_deterministic(variant, nsig):
    """classify="scan" selects in position order, the same on every call, and breaks ties at the k-th value by
    position: exactly the stable top-k (score descending, then position ascending) of the reference, on keys with
    heavy ties, through every branch (band in registers, band radix select, missed bracket with nsig = 0)."""
    q, k_lr, lengths, P, ref = _tied_case(17, [300, 270])
    B, KVH = k_lr.shape[:2]
    # "scan": registers wide enough for any band here (the interpreter's default, 128, would send wide bands to the
    # radix select, which appends the band's part after the keys above the bracket)
    opts = dict(VARIANTS[variant], **({"band_reg": 512} if variant == "scan" else {}))
    for k in (1, 37, 150, 270):
        idx, _ = loki_select_bracket(q, k_lr, lengths, k, P=P, strict=False, nsig=nsig, **opts)
        again, _ = loki_select_bracket(q, k_lr, lengths, k, P=P, strict=False, nsig=nsig, **opts)
        assert torch.equal(idx, again)
        idx = idx.cpu()
        for b in range(B):
            n, kb = int(lengths[b]), min(k, int(lengths[b]))
            for r in range(KVH):
                sel = idx[b, r, :kb].tolist()
                # stable top-k: sort positions by score descending (a stable sort keeps ties in position order)
                order = torch.sort(-ref[b, r, :n], stable=True).indices[:kb]
                assert set(sel) == set(order.tolist()), (b, r, k)
                if variant == "scan":  # one position-ordered pass (or the whole-row radix select) writes it all
                    assert sel == sorted(sel)
                assert (idx[b, r, kb:] == -1).all()


@pytest.mark.parametrize("variant", [None, "scan"])
def test_bracket_odd_workspace(variant):
    """B x rows x S_max odd (one sequence, 3 KV heads, 301 positions): the 64-bit counters stay 8-byte aligned in
    the workspace (they came after the odd-sized key region until session 6: a misaligned atomic on the GPU)."""
    torch.manual_seed(3)
    B, KVH, g, S, D, d = 1, 3, 3, 301, 64, 8
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[301])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    ref = _ref(q, P, k_lr, lengths, "group", "max")
    for k in (1, 40, 0.25):
        idx, _ = loki_select_bracket(q, k_lr, lengths, k, P=P, strict=False, **VARIANTS.get(variant, {}))
        kb = budgets_ref(k if isinstance(k, int) else int(fraction_budget(k, lengths)[0]), lengths.cpu())
        n, exact = check_selection(idx, ref, lengths.cpu(), kb, tol=_tol(ref))
        assert exact >= n // 2


def test_bracket_fraction_budget_errors():
    k_lr, _, _, lengths = random_cache(1, 1, 64, 16, 4, torch.float32, DEV, lengths=[64])
    q = torch.randn(1, 1, 16, device=DEV)
    P = random_orthonormal(1, 16, DEV)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(LokiInputError, match="fraction"):
            loki_select_bracket(q, k_lr, lengths, bad, P=P)


@triton.jit
def _kth_key_probe(key_ptr, m, r, out_ptr, HB: tl.constexpr, BAND: tl.constexpr, EARLY: tl.constexpr):
    i = tl.arange(0, BAND)
    valid = i < m
    key = tl.load(key_ptr + i, mask=valid, other=0).to(tl.uint32, bitcast=True)
    prefix = tl.full([], 0x2D, tl.uint32)
    tl.store(out_ptr, _kth_key(key, valid, r, HB, prefix, EARLY).to(tl.int32, bitcast=True))


@triton.jit
def _select_probe(key_ptr, idx_ptr, m, r, out_ptr, HB: tl.constexpr, BAND: tl.constexpr, THREE: tl.constexpr):
    prefix = tl.full([], 0x2D, tl.uint32)
    if THREE:
        _select_in_registers3(key_ptr, idx_ptr, m, r, out_ptr, HB, prefix, BAND // 4, True)
    else:
        _select_in_registers(key_ptr, idx_ptr, m, r, out_ptr, HB, prefix, BAND, True)


@pytest.mark.parametrize("three", [False, True], ids=["one_block", "three_blocks"])
@pytest.mark.parametrize("distinct", [False, True])
@pytest.mark.parametrize("m", [40, 100, 150, 192])  # within the first, second and third quarter block, and full
def test_select_in_registers_blocks(three, distinct, m):
    """The band select's placement (one BAND block, or since session 10 three BAND / 4 blocks): exactly r distinct
    band positions, all keys above the r-th largest and ties up to r, for bands that end in any of the blocks."""
    gen = torch.Generator().manual_seed(m + 2 * distinct + three)
    HB, BAND = 24, 256
    pool = torch.randperm(1 << HB, generator=gen)[:m if distinct else 9]
    low = pool if distinct else pool[torch.randint(len(pool), (m,), generator=gen)]
    keys = (0x2D << HB) | low
    buf = (keys - (keys >= 2 ** 31).long() * 2 ** 32).to(torch.int32).to(DEV)
    pos = torch.randperm(5000, generator=gen)[:m].to(torch.int32)  # the band's token positions
    for r in sorted({1, m // 3, m // 2, m - 1, m}):
        out = torch.full((m,), -7, dtype=torch.int32, device=DEV)
        _select_probe[(1,)](buf, pos.to(DEV), m, r, out, HB=HB, BAND=BAND, THREE=three)
        got = out.cpu()[:r]
        assert (out.cpu()[r:] == -7).all() and len(set(got.tolist())) == r
        sel = keys[(pos[:, None] == got[None, :]).any(1)]  # the keys of the selected positions
        kth = int(torch.sort(keys, descending=True).values[r - 1])
        assert int(sel.min()) == kth and int((keys > kth).sum()) <= r
        assert int((sel > kth).sum()) == int((keys > kth).sum())


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("distinct", [False, True])
def test_kth_key_threshold(early, distinct):
    """`_kth_key`'s contract on random 32-bit keys sharing a prefix (distinct, or drawn from 20 values: ties):
    T is a threshold for the r largest, #(> T) <= r <= #(>= T): the r-th largest key, or a value below it with
    exactly r keys above (no tie to take), which the early exit returns as soon as it finds one."""
    gen = torch.Generator().manual_seed(7 + distinct)
    HB, m, BAND = 24, 200, 256
    pool = torch.randperm(1 << HB, generator=gen)[:m if distinct else 20]
    low = pool[torch.randint(len(pool), (m,), generator=gen)] if not distinct else pool
    keys = (0x2D << HB) | low  # int64 holding the uint32 keys
    buf = (keys - (keys >= 2 ** 31).long() * 2 ** 32).to(torch.int32).to(DEV)  # the same bits as int32
    out = torch.zeros(1, dtype=torch.int32, device=DEV)
    hit = 0
    for r in (1, 2, 50, 100, 199, 200):
        _kth_key_probe[(1,)](buf, m, r, out, HB=HB, BAND=BAND, EARLY=early)
        T = int(out.cpu().item()) & 0xFFFFFFFF
        n_gt, n_ge = int((keys > T).sum()), int((keys >= T).sum())
        assert n_gt <= r <= n_ge, (r, T, n_gt, n_ge)
        kth = int(torch.sort(keys, descending=True).values[r - 1])
        if n_gt == r:  # a threshold just below the r-th largest (always taken when the last pass counts r)
            hit += 1
            assert T < kth
        else:
            assert T == kth
    if early and distinct:
        assert hit > 0  # the early exit was taken


@pytest.mark.parametrize("vec", [0, 4])
@pytest.mark.parametrize("hints", [False, True])
def test_bracket_cache_hints(hints, vec, monkeypatch):
    """The scoring and classify kernels with and without their L2 eviction hints (session 10): the same exact
    selection (the hints change where bytes are cached, never what is computed); both classify kernels."""
    import kernels.bracket as bracket
    monkeypatch.setattr(bracket, "BRACKET_CACHE_HINTS", hints)
    monkeypatch.setattr(bracket, "BRACKET_CLASSIFY_VEC", vec)
    test_bracket_select(torch.float32, 64, 8, 3, "group", "max", *LONG)


def test_cache_hints_rule(monkeypatch):
    """"auto": hints where every row's keys together fit in BRACKET_HINTS_MAX_BYTES (16 MiB: batch 16 x 8 KV heads at
    16K, not at 64K, where they measured slower on the H200); True / False force them."""
    import kernels.bracket as bracket
    monkeypatch.setattr(bracket, "BRACKET_CACHE_HINTS", "auto")
    assert bracket.cache_hints(128, 16384) and bracket.cache_hints(8, 131072)
    assert not bracket.cache_hints(128, 65536)
    for forced in (True, False):
        monkeypatch.setattr(bracket, "BRACKET_CACHE_HINTS", forced)
        assert bracket.cache_hints(128, 65536) is forced and bracket.cache_hints(1, 16) is forced


def test_band_blocks_rule():
    """BRACKET_BAND3: three quarter blocks where the band sized by `band_registers` fits 3/4 of its block (64K rows at
    k = 1/4: 16384 -> 3 x 4096, measured 8 us faster on the H200), one block where it does not."""
    import kernels.bracket as bracket
    for S, f in ((65536, 0.25), (65536, 0.0625), (16384, 0.125)):
        s = bracket.default_sample(S)
        reg = bracket.band_registers(S, s, 4.0, f)
        assert bracket.band_blocks(S, s, 4.0, f, reg) == 3
        assert bracket._band_want(S, s, 4.0, f) <= 3 * reg // 4
    s = bracket.default_sample(65536)
    assert bracket.band_blocks(65536, s, 4.0, 0.125, bracket.band_registers(65536, s, 4.0, 0.125)) == 1


@pytest.mark.parametrize("idx_first,asm", [(0, False), (16384, False), (0, True), (16384, True)])
def test_bracket_band_options(idx_first, asm, monkeypatch):
    """The band select with its positions loaded together with the keys (BRACKET_BAND_IDX_FIRST) and with its stores
    in inline PTX (BRACKET_BAND_ASM, GPU only; the interpreter takes tl.store): the same exact selection, ties too."""
    import kernels.bracket as bracket
    if asm and is_interpreter():
        pytest.skip("the interpreter ignores BRACKET_BAND_ASM (bracket.py: ASM=... and not interp): the asm=False run")
    monkeypatch.setattr(bracket, "BRACKET_BAND_IDX_FIRST", idx_first)
    monkeypatch.setattr(bracket, "BRACKET_BAND_ASM", asm)
    test_bracket_select(torch.float32, 64, 8, 3, "group", "max", *LONG)
    test_bracket_select(torch.float32, 64, 16, 4, "group", "max", *LONG, variant=VARIANTS["band3"])
    test_bracket_heavy_ties(None)


def test_bracket_rotate_pdl(monkeypatch):
    """BRACKET_ROTATE_PDL (session 11, an option): on the GPU the scoring kernel is launched while the rotation runs,
    prefetches slab tiles into L2 and waits for q' before reading it; the selection stays exact.  (Without PDL, as
    under the interpreter, it is the default path.)"""
    import kernels.bracket as bracket
    if not torch.cuda.is_available():
        pytest.skip("no PDL without a GPU: the default path, which test_bracket_select runs on these shapes")
    monkeypatch.setattr(bracket, "BRACKET_ROTATE_PDL", 2)
    test_bracket_select(torch.float32, 64, 8, 3, "group", "max", *LONG)
    test_bracket_select(torch.float32, 128, 32, 4, "head", "sum", *SHORT)


@pytest.mark.parametrize("mode,g", [("group", 3), ("head", 3), ("head", 4)])
def test_bracket_flow(mode, g):
    """flow=True (session 13, BRACKET_FLOW): the scoring grid row after row, each of its programs counting itself in
    its row's record (slot FLOW_SLOT, zeroed by the rotation kernel), and the classify kernel waiting for each row's
    count (on the GPU it is launched while the scoring kernel runs).  The same selection as flow=False, on ragged
    rows (incl. 0 and 1 tokens) with sinks, a local window and a fraction budget; every row's count ends at its
    scoring grid's size (a program that did not count itself would leave its row's classification waiting)."""
    import kernels.bracket as bracket
    torch.manual_seed(g + len(mode))
    B, KVH, S, D, d = 4, 2, 300, 64, 8
    k_lr, _, _, lengths = random_cache(B, KVH, S, D, d, torch.float32, DEV, lengths=[300, 257, 1, 0])
    q = torch.randn(B, KVH * g, D, device=DEV)
    P = random_orthonormal(KVH, D, DEV)
    R = KVH * g if mode == "head" else KVH
    for k, sink, local in ((40, 0, 0), (0.25, 4, 16), (S, 0, 0)):
        ws = torch.full((bracket.bracket_workspace_size(B, R, S),), -7, dtype=torch.int32, device=DEV)
        kw = dict(P=P, mode=mode, strict=False, sink_tokens=sink, local_window=local, k_max=S)
        i_f, _ = loki_select_bracket(q, k_lr, lengths, k, workspace=ws, flow=True, **kw)
        i_n, _ = loki_select_bracket(q, k_lr, lengths, k, flow=False, **kw)
        assert torch.equal(i_f.sort(-1).values, i_n.sort(-1).values), (k, sink, local)
        ncol = int(ws.view(-1)[:B * R * bracket.BR_INTS].view(B * R, -1)[:, int(bracket.FLOW_SLOT)].unique().item())
        # (the interpreter's tiles: 32 tokens, one per program here; the GPU's at d = 8: 256 tokens, two per program)
        assert ncol == (triton.cdiv(S, 32) + 1 if is_interpreter() else triton.cdiv(S, 512) + 1)
    with pytest.raises(LokiInputError, match="flow=True needs"):
        loki_select_bracket(q, k_lr, lengths, 40, P=P, mode=mode, strict=False, flow=True, classify="scan")
