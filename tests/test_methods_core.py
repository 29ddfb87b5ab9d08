"""Core invariants of dense / exact_topk / loki on random float64 inputs, against naive references."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from loki.common import LokiError
from loki.methods import build_method
from loki_testutils import causal, make_method, random_qkv
from loki_testutils import fake_model as _fake_model
from loki_testutils import random_basis as _random_basis

B, H, KVH, T, D = 2, 6, 2, 12, 16
G = H // KVH


# the shared helpers (tests/loki_testutils.py) at this file's shapes
fake_model = partial(_fake_model, heads=H, kv_heads=KVH, head_dim=D)
random_basis = partial(_random_basis, heads=H, kv_heads=KVH, head_dim=D)
qkv = partial(random_qkv, batch=B, heads=H, kv_heads=KVH, head_dim=D, T=T)


def make(name, basis_obj=None, **opts):
    """The method ``name`` with ``opts`` on ``basis_obj`` (default: a fresh random basis), bound to ``fake_model()``
    -> (method, basis)."""
    return make_method(name, basis_obj or random_basis(), fake_model(), **opts)


MOD = SimpleNamespace(layer_idx=0)
SCALE = D ** -0.5


def naive_attention(q, k, v, keep):
    """Loop-based float64 reference: softmax over kept keys of each (b, h, i)."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                idx = keep[b, h, i].nonzero().flatten()
                s = torch.stack([q[b, h, i] @ k[b, h // G, j] * SCALE for j in idx])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, h // G, j] for n, j in enumerate(idx))
    return out


def naive_topk_keep(scores, k_frac, vis):
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i in range(scores.shape[2]):
                idx = vis[0, 0, i].nonzero().flatten()
                n = math.ceil(k_frac * len(idx))
                top = sorted(idx.tolist(), key=lambda j: -float(scores[b, h, i, j]))[:n]
                keep[b, h, i, top] = True
    return keep


def test_dense_matches_naive():
    q, k, v = qkv()
    m, _ = make("dense")
    vis = causal(T)
    out = m.attend(MOD, q, k, v, vis, SCALE)
    ref = naive_attention(q, k, v, vis.expand(B, H, T, T))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_exact_topk_matches_naive_definition():
    q, k, v = qkv(2)
    m, _ = make("exact_topk", k=0.25)
    vis = causal(T)
    out = m.attend(MOD, q, k, v, vis, SCALE)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(G, 1)) * SCALE
    keep = naive_topk_keep(scores, 0.25, vis)
    assert torch.equal(m.last_selection, keep)
    torch.testing.assert_close(out, naive_attention(q, k, v, keep), rtol=1e-10, atol=1e-10)


def test_loki_matches_naive_definition():
    q, k, v = qkv(3)
    m, basis = make("loki", d=4, k=0.25)
    vis = causal(T)
    out = m.attend(MOD, q, k, v, vis, SCALE)
    P = basis.t["post.components"][0]  # (KVH, D, D)
    approx = torch.zeros(B, H, T, T, dtype=torch.float64)
    for h in range(H):
        qr = q[:, h] @ P[h // G]
        kr = k[:, h // G] @ P[h // G]
        approx[:, h] = qr[..., :4] @ kr[..., :4].transpose(-1, -2) * SCALE
    keep = naive_topk_keep(approx, 0.25, vis)
    assert torch.equal(m.last_selection, keep)
    torch.testing.assert_close(out, naive_attention(q, k, v, keep), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_loki_full_dim_selects_exactly_exact_topk(seed):
    q, k, v = qkv(10 + seed, T=20)
    vis = causal(20)
    ex, _ = make("exact_topk", k=0.3)
    lk, _ = make("loki", d=D, k=0.3)
    o1, o2 = ex.attend(MOD, q, k, v, vis, SCALE), lk.attend(MOD, q, k, v, vis, SCALE)
    assert torch.equal(ex.last_selection, lk.last_selection)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,opts", [("exact_topk", {"k": 1.0}), ("loki", {"d": 4, "k": 1.0}),
                                       ("loki", {"d": 4, "k": 1.0, "selection": "group"}),
                                       ("exact_topk", {"k": T, "k_mode": "tokens"})])
def test_full_budget_equals_dense(name, opts):
    q, k, v = qkv(4)
    vis = causal(T)
    dense, _ = make("dense")
    m, _ = make(name, **opts)
    torch.testing.assert_close(m.attend(MOD, q, k, v, vis, SCALE), dense.attend(MOD, q, k, v, vis, SCALE),
                               rtol=1e-10, atol=1e-10)


def test_loki_small_k_differs_from_dense():
    q, k, v = qkv(5, T=32)
    vis = causal(32)
    dense, _ = make("dense")
    m, _ = make("loki", d=2, k=0.1)
    diff = (m.attend(MOD, q, k, v, vis, SCALE) - dense.attend(MOD, q, k, v, vis, SCALE)).abs().max()
    assert diff > 1e-2


def test_budget_modes_count_selected():
    q, k, v = qkv(6, T=16)
    vis = causal(16)
    for mode, kk, expect in [("prefix", 0.25, lambda n: math.ceil(0.25 * n)),
                             ("window", 0.25, lambda n: min(n, 4)), ("tokens", 3, lambda n: min(n, 3))]:
        m, _ = make("exact_topk", k=kk, k_mode=mode)
        m.attend(MOD, q, k, v, vis, SCALE)
        counts = m.last_selection.sum(-1)
        want = torch.tensor([expect(i + 1) for i in range(16)])
        assert torch.equal(counts, want.expand_as(counts)), mode


def test_group_selection_shared_and_forced_tokens_kept():
    q, k, v = qkv(7, T=24)
    vis = causal(24)
    m, _ = make("loki", d=4, k=0.2, selection="group", sink_tokens=2, local_window=3)
    m.attend(MOD, q, k, v, vis, SCALE)
    sel = m.last_selection.view(B, KVH, G, 24, 24)
    assert (sel == sel[:, :, :1]).all(), "heads of a group must share one selection"
    for i in range(24):
        assert sel[..., i, : min(2, i + 1)].all(), "sinks always kept"
        assert sel[..., i, max(0, i - 2): i + 1].all(), "local window always kept"
    assert not (m.last_selection & ~vis).any(), "never selects the future"


def test_decode_step_with_cache_offset():
    """One query at the end of a longer key sequence (decode): visible = all keys."""
    q, k, v = qkv(8, T=1, S=10)
    vis = causal(1, 10)
    assert vis.all()
    m, _ = make("loki", d=D, k=0.5)
    ex, _ = make("exact_topk", k=0.5)
    torch.testing.assert_close(m.attend(MOD, q, k, v, vis, SCALE), ex.attend(MOD, q, k, v, vis, SCALE))
    assert int(m.last_selection[0, 0, 0].sum()) == 5


@pytest.mark.parametrize("opts,msg", [
    ({"name": "nope"}, "unknown attention method"),
    ({"name": "loki", "k": 0}, "k must be > 0"),
    ({"name": "loki", "k": -0.5}, "k must be > 0"),
    ({"name": "loki", "k": 2.0}, "must be <= 1"),
    ({"name": "exact_topk", "d": 8}, "do not apply"),
    ({"name": "loki", "rope": "sideways"}, "rope must be"),
])
def test_bad_options_are_clear_errors(opts, msg):
    with pytest.raises(LokiError, match=msg):
        build_method(opts, basis=random_basis())


def test_d_larger_than_head_dim_is_an_error():
    m = build_method({"name": "loki", "d": D + 1}, basis=random_basis())
    with pytest.raises(LokiError, match="larger than the head dim"):
        m.bind(fake_model())


def test_budget_larger_than_context_is_an_error():
    q, k, v = qkv(9, T=8)
    m, _ = make("exact_topk", k=9, k_mode="tokens")
    with pytest.raises(LokiError, match="larger than the context"):
        m.attend(MOD, q, k, v, causal(8), SCALE)


def test_d_variance_picks_per_head_dims():
    basis = random_basis()
    m = build_method({"name": "loki", "d_variance": 0.5, "k": 0.5}, basis=basis)
    m.bind(fake_model())
    evr = basis.t["post.explained_variance_ratio"][0]
    for h in range(KVH):
        d = int(m.dim_counts[0, h])
        assert evr[h, :d].sum() >= 0.5 - 1e-12 and (d == 1 or evr[h, : d - 1].sum() < 0.5)


def test_results_record_the_dims_scored():
    """metrics.json's d (loki.evaluate.scored_dims) is what was scored: with d_variance the mean of the per-(layer,
    head) dims, not the unused d option; a fraction resolved to dims; a method without a d option records none."""
    from loki.evaluate import scored_dims

    basis = random_basis()
    m = build_method({"name": "loki", "d_variance": 0.5, "k": 0.5}, basis=basis)
    m.bind(fake_model())
    assert scored_dims(m, 16) == pytest.approx(float(m.dim_counts.float().mean()), abs=0.005)
    m = build_method({"name": "loki", "d": 0.25, "k": 0.5}, basis=basis)
    m.bind(fake_model())
    assert scored_dims(m, 0.25) == round(0.25 * D)
    m = build_method({"name": "sparq", "r": 4, "k": 0.5})
    m.bind(fake_model())
    assert scored_dims(m, None) is None


def test_fractional_budgets_are_exact():
    """ceil(k n) of the decimal k: 0.56 of 25 keys is 14 (float64's 0.56 * 25 = 14.000000000000002 rounds up to 15),
    in the evaluation-time methods (prefix and window budgets), the LokiCache decode budget and the kernels' one."""
    from kernels import fraction_budget
    from loki.cache import decode_budget, max_budget
    from loki.methods.base import token_budget

    vis = causal(25)
    assert token_budget(vis, 0.56, "prefix")[0, 0, -1] == 14 and token_budget(vis, 0.56, "window")[0, 0, -1] == 14
    assert token_budget(vis, 0.56, "prefix")[0, 0, 9] == 6  # 5.6 -> 6 where the product is not whole
    n = torch.tensor([25, 300, 10, 1])
    assert decode_budget(n, 0.56, "prefix").tolist() == [14, 168, 6, 1]
    assert fraction_budget(0.56, n.int()).tolist() == [14, 168, 6, 1]
    assert max_budget(300, 0.56, "prefix", 0, 0) == 168
    assert token_budget(causal(300), 1 / 3, "prefix")[0, 0, -1] == 100
