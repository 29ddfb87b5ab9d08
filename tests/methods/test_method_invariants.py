"""Invariants shared by all methods: a full budget is dense, d = head dim is exact top-k, group selection is
shared by the heads of a group, sinks and the local window are always selected, the future never is."""

from __future__ import annotations

import math

import pytest
import torch

from loki_testutils import make_method
from method_refs import B, D, G, H, KVH, MOD, SCALE, causal, dot, fake_model, make, qkv, random_basis

TOL = dict(rtol=1e-10, atol=1e-10)
T = 20

FULL = [
    ("exact_topk", dict(k=1.0)),
    ("loki", dict(d=4, k=1.0)),
    ("loki", dict(d=4, k=1.0, selection="group", group_reduce="sum")),
    ("loki", dict(d=4, k=T, k_mode="tokens")),
    ("pca_attn", dict(d=D, basis="online")),  # float64 basis: exactly orthonormal
    ("h2o", dict(k=1.0)),
    ("h2o", dict(k=1.0, selection="group")),
    ("sparq", dict(r=3, k=1.0)),
    ("quest", dict(k=1.0, page_size=4)),
    ("loki_h2o", dict(d=4, k=1.0, cache=1.0)),
]


@pytest.mark.parametrize("name,opts", FULL, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FULL)])
def test_full_budget_equals_dense(name, opts):
    q, k, v = qkv(21, T=T)
    vis = causal(T)
    dense, _ = make("dense")
    m, _ = make(name, **opts)
    torch.testing.assert_close(m.attend(MOD, q, k, v, vis, SCALE), dense.attend(MOD, q, k, v, vis, SCALE), **TOL)
    if m.stats():
        assert m.stats()["kept_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["exact_topk", "loki", "h2o", "sparq", "quest", "loki_h2o"])
def test_full_budget_over_the_window_equals_dense(name):
    """k_mode=window with k=1: every row keeps its whole prefix."""
    q, k, v = qkv(22, T=T)
    vis = causal(T)
    dense, _ = make("dense")
    opts = dict(k=1.0, k_mode="window", **({"cache": 1.0} if name == "loki_h2o" else {}))
    m, _ = make(name, **opts)
    torch.testing.assert_close(m.attend(MOD, q, k, v, vis, SCALE), dense.attend(MOD, q, k, v, vis, SCALE), **TOL)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("selection", ["head", "group"])
def test_loki_with_full_head_dim_selects_what_exact_topk_selects(seed, selection):
    q, k, v = qkv(30 + seed, T=T)
    vis = causal(T)
    lk, _ = make("loki", d=D, k=0.3, selection=selection)
    o_lk = lk.attend(MOD, q, k, v, vis, SCALE)
    if selection == "head":
        ex, _ = make("exact_topk", k=0.3)
        o_ex = ex.attend(MOD, q, k, v, vis, SCALE)
        assert torch.equal(lk.last_selection, ex.last_selection)
        torch.testing.assert_close(o_lk, o_ex, **TOL)
    else:  # group: each query head's exact q.k, max over the heads h // G == g of KV head g; the top ceil(0.3 n)
        # of each row's n-token prefix. Written from scratch (loops), not with the method's own helpers.
        assert k.shape[1] == KVH and lk.last_selection.shape == (B, H, T, T)
        want = torch.zeros(B, H, T, T, dtype=torch.bool)
        for b in range(B):
            for g in range(KVH):
                heads = range(g * G, (g + 1) * G)
                for i in range(T):
                    n = i + 1
                    s = [max(dot(q[b, h, i], k[b, g, j]) for h in heads) for j in range(n)]
                    keep = sorted(range(n), key=lambda j: -s[j])[:math.ceil(0.3 * n)]
                    for h in heads:
                        want[b, h, i, keep] = True
        assert torch.equal(lk.last_selection.cpu(), want)


@pytest.mark.parametrize("name,opts", [("loki", dict(d=4, k=0.2, selection="group")),
                                       ("loki", dict(d=4, k=0.2, selection="group", group_reduce="mean")),
                                       ("h2o", dict(k=0.3, selection="group")),
                                       ("loki_h2o", dict(d=4, k=0.2, cache=0.4, selection="group"))])
def test_group_selection_is_shared_by_the_heads_of_a_group(name, opts):
    q, k, v = qkv(23, T=T)
    m, _ = make(name, **opts)
    m.attend(MOD, q, k, v, causal(T), SCALE)
    sel = m.last_selection.view(B, KVH, G, T, T)
    assert (sel == sel[:, :, :1]).all()
    assert not (sel[:, :, 0] == sel[:, :1, 0]).all(), "different KV groups should select differently"


SPARSE = [("exact_topk", dict(k=0.15)), ("loki", dict(d=2, k=0.15)), ("loki", dict(d=2, k=0.15, selection="group")),
          ("h2o", dict(k=0.2)), ("sparq", dict(r=2, k=0.15)), ("quest", dict(k=0.2, page_size=4)),
          ("loki_h2o", dict(d=2, k=0.15, cache=0.3))]


@pytest.mark.parametrize("name,opts", SPARSE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPARSE)])
def test_sinks_and_local_window_always_selected_and_no_future(name, opts):
    q, k, v = qkv(24, T=32)
    vis = causal(32)
    m, _ = make(name, sink_tokens=2, local_window=3, **opts)
    m.attend(MOD, q, k, v, vis, SCALE)
    sel = m.last_selection
    for i in range(32):
        assert sel[..., i, : min(2, i + 1)].all(), f"row {i}: sinks"
        assert sel[..., i, max(0, i - 2): i + 1].all(), f"row {i}: local window"
    assert not (sel & ~vis).any()
    # and the budget is really sparse: far fewer keys than the prefix at the end
    assert int(sel[..., -1, :].sum(-1).max()) < 16


@pytest.mark.parametrize("name,opts", SPARSE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SPARSE)])
def test_small_budget_differs_from_dense_and_keeps_the_budget(name, opts):
    q, k, v = qkv(25, T=32)
    vis = causal(32)
    dense, _ = make("dense")
    m, _ = make(name, **opts)
    out = m.attend(MOD, q, k, v, vis, SCALE)
    assert (out - dense.attend(MOD, q, k, v, vis, SCALE)).abs().max() > 1e-2
    n = torch.arange(1, 33)
    kept = m.last_selection.sum(-1)  # (B, H, T)
    bud = torch.ceil(n * opts["k"]).long()
    slack = opts.get("page_size", 1) - 1  # quest rounds up to whole pages
    assert (kept <= bud + slack).all() and (kept >= 1).all()


@pytest.mark.parametrize("name,opts", [("exact_topk", dict(k=0.2)), ("sparq", dict(r=2, k=0.2)),
                                       ("quest", dict(k=0.2, page_size=4)), ("h2o", dict(k=0.2)),
                                       ("loki_h2o", dict(d=2, k=0.2, cache=0.4)), ("pca_attn", dict(d=2))])
def test_dense_layers_are_dense(name, opts):
    q, k, v = qkv(26, T=T)
    vis = causal(T)
    dense, _ = make("dense")
    # (a 2-layer model: dense_layers may not cover every layer; MOD is layer 0)
    m, _ = make_method(name, random_basis(layers=2), fake_model(layers=2), dense_layers=1, **opts)
    torch.testing.assert_close(m.attend(MOD, q, k, v, vis, SCALE), dense.attend(MOD, q, k, v, vis, SCALE), **TOL)


def test_float32_inputs_match_float64_selection():
    """The fp32 path (what models run) selects what the fp64 path selects on well-separated scores."""
    q, k, v = qkv(27, T=T)
    vis = causal(T)
    for name, opts in [("sparq", dict(r=8, k=0.3)), ("quest", dict(k=0.3, page_size=4)), ("h2o", dict(k=0.3))]:
        a, _ = make(name, **opts)
        b, _ = make(name, **opts)
        oa = a.attend(MOD, q, k, v, vis, SCALE)
        ob = b.attend(MOD, q.float(), k.float(), v.float(), vis, SCALE)
        assert ob.dtype == torch.float32
        assert torch.equal(a.last_selection, b.last_selection), name
        torch.testing.assert_close(ob.double(), oa, rtol=1e-4, atol=1e-5)


SELECTING = [("exact_topk", dict(k=0.3)), ("loki", dict(d=4, k=0.3)), ("loki", dict(d=4, k=0.3, selection="group")),
             ("sparq", dict(r=3, k=0.3)), ("quest", dict(k=0.3, page_size=4)), ("h2o", dict(k=0.3)),
             ("h2o", dict(k=0.3, selection="group")), ("loki_h2o", dict(d=4, k=0.3, cache=0.6)),
             ("pca_attn", dict(d=4, basis="online"))]


@pytest.mark.parametrize("name,opts", SELECTING, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SELECTING)])
def test_kv_rows_fraction_is_the_union_of_each_groups_sets(name, opts):
    """kv_rows_fraction counts the K/V rows a KV head reads: the union over its G query heads of their kept keys
    (counted here from the last selection, per call), between kept_fraction and min(1, G x kept_fraction); with group
    selection it equals kept_fraction."""
    assert G > 1, "the fixture must be GQA for this to test anything"
    m, _ = make(name, **opts)
    vis = causal(T)
    rows = rows_vis = kept = 0.0
    for seed in (40, 41):
        q, k, v = qkv(seed, T=T)
        m.attend(MOD, q, k, v, vis, SCALE)
        keep = m.last_selection
        keep = vis.expand(B, H, T, T) if keep is None else keep
        union = keep.reshape(B, KVH, G, T, T).any(2)
        rows += float(union.sum())
        rows_vis += float(vis.sum()) * B * KVH
        kept += float(keep.sum())
    st = m.stats()
    assert st["kv_rows_fraction"] == pytest.approx(rows / rows_vis, rel=1e-12)
    assert st["kept_fraction"] == pytest.approx(kept / (rows_vis * G), rel=1e-12)
    assert st["kept_fraction"] - 1e-12 <= st["kv_rows_fraction"] <= min(1.0, G * st["kept_fraction"]) + 1e-12
    if opts.get("selection") == "group" or name == "pca_attn":
        assert st["kv_rows_fraction"] == pytest.approx(st["kept_fraction"], rel=1e-12)
    elif name != "quest":
        assert st["kv_rows_fraction"] > st["kept_fraction"] * 1.05, "per-head sets of a group should differ here"


# A left-padded sequence in a batch must select and attend exactly as it does alone: sinks are its own first keys,
# Quest's pages start at its first key, a window budget counts its keys, an online basis sees its keys only.
PADDED = [
    ("exact_topk", dict(k=0.3, sink_tokens=3, local_window=2)),
    ("loki", dict(d=4, k=0.3, sink_tokens=2, local_window=4)),
    ("loki", dict(d=4, k=0.3, k_mode="window")),
    ("loki", dict(d=4, k=0.3, basis="online")),
    ("loki", dict(d=4, k=0.3, basis="online", online_every=1, selection="group")),
    ("pca_attn", dict(d=4, basis="online", online_every=5)),
    ("h2o", dict(k=0.3, sink_tokens=3)),
    ("sparq", dict(r=4, k=0.3, sink_tokens=2)),
    ("quest", dict(k=0.3, page_size=4)),
    ("quest", dict(k=0.3, page_size=4, sink_tokens=2, local_window=3)),
    ("loki_h2o", dict(d=4, k=0.2, cache=0.4, sink_tokens=2, basis="online")),
]


@pytest.mark.parametrize("name,opts", PADDED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PADDED)])
def test_left_padding_changes_nothing(name, opts):
    T, pad = 24, 7  # 7: not a multiple of Quest's page
    q, k, v = qkv(40, T=T)
    qj, kj, vj = qkv(41, T=pad)  # whatever the model computes at padding positions
    qp, kp, vp = (torch.cat([a, b], 2) for a, b in ((qj, q), (kj, k), (vj, v)))
    vis_p = causal(T + pad).repeat(B, 1, 1, 1)
    vis_p[0, ..., :pad] = False  # sequence 0 is left-padded; sequence 1 is a full one of T + pad tokens
    alone, _ = make(name, **opts)
    want = alone.attend(MOD, q[:1], k[:1], v[:1], causal(T), SCALE)
    padded, _ = make(name, **opts)
    got = padded.attend(MOD, qp, kp, vp, vis_p, SCALE)[:1, :, pad:]
    torch.testing.assert_close(got, want, **TOL)
    if alone.last_selection is not None:
        assert torch.equal(padded.last_selection[:1, :, pad:, pad:], alone.last_selection)
        assert not padded.last_selection[:1, :, :, :pad].any()


@pytest.mark.parametrize("name", ["loki", "pca_attn"])
@pytest.mark.parametrize("every", [1, 3, 16])
def test_online_basis_is_causal_and_refitted_every_n_keys(name, every):
    """basis=online: row i's approximate scores use the uncentred PCA of the first m keys, m = n_i (its visible
    keys) while n_i <= online_every, else online_every * floor(n_i / online_every) (float64 reference); so keys
    after row i never change row i."""
    T, d = 20, 3
    q, k, v = qkv(42, T=T)
    m, _ = make(name, d=d, basis="online", online_every=every, **({"k": 0.3} if name == "loki" else {}))
    got = m.approx_scores(MOD, q, k, SCALE, causal(T)).double()
    for i in range(T):
        n = i + 1
        mk = n if n <= every else every * (n // every)
        for h in range(H):
            kk = k[:, h // G, :mk].double()  # (B, mk, D)
            _, vecs = torch.linalg.eigh(kk.transpose(-1, -2) @ kk)
            Pd = vecs.flip(-1)[..., :d]  # (B, D, d)
            want = ((q[:, h, i:i + 1].double() @ Pd) @ (k[:, h // G, :n].double() @ Pd).transpose(-1, -2))[:, 0]
            torch.testing.assert_close(got[:, h, i, :n], want * SCALE, rtol=1e-9, atol=1e-9)
    k2 = k.clone()
    k2[:, :, T // 2:] *= torch.linspace(1, 20, D, dtype=k.dtype)  # change only keys at rows >= T/2
    o1 = m.attend(MOD, q, k, v, causal(T), SCALE)
    o2 = m.attend(MOD, q, k2, v, causal(T), SCALE)
    torch.testing.assert_close(o1[:, :, : T // 2], o2[:, :, : T // 2], rtol=0, atol=0)
