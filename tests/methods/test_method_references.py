"""Each new method against a direct float64 loop implementation of its definition, on a few random tokens."""

from __future__ import annotations

import pytest
import torch

from method_refs import (B, G, H, KVH, MOD, SCALE, causal, loki_rank, make, qkv, ref_h2o, ref_pca_attn, ref_quest,
                         ref_sparq)

TOL = dict(rtol=1e-10, atol=1e-10)


def run_method(name, opts, seed, T):
    """Method ``name`` (``opts``) on ``T`` random causal tokens drawn with ``seed`` -> (q, k, v, method, basis, out)."""
    q, k, v = qkv(seed, T=T)
    m, basis = make(name, **opts)
    return q, k, v, m, basis, m.attend(MOD, q, k, v, causal(T), SCALE)


def test_pca_attn_matches_definition():
    q, k, v, m, basis, out = run_method("pca_attn", dict(d=5), 11, T=10)
    P = basis.components("post")[0].double()  # the basis as the method holds it (stored fp32)
    ref = ref_pca_attn(q, k, v, P, 5)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("opts", [dict(r=4, k=0.3), dict(r=4, k=0.3, reallocation=False),
                                  dict(r=0.5, k=0.25, sink_tokens=1, local_window=2)])
def test_sparq_matches_definition(opts):
    q, k, v, m, _, out = run_method("sparq", opts, 12, T=14)
    r = opts["r"] if isinstance(opts["r"], int) else int(opts["r"] * q.shape[-1])
    ref, keep = ref_sparq(q, k, v, r, opts["k"], opts.get("reallocation", True), opts.get("sink_tokens", 0),
                          opts.get("local_window", 0))
    assert torch.equal(m.last_selection, keep)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("opts", [dict(k=0.3, page_size=4), dict(k=0.5, page_size=3, sink_tokens=1, local_window=2),
                                  dict(k=0.2, page_size=16)])
def test_quest_matches_definition(opts):
    q, k, v, m, _, out = run_method("quest", opts, 13, T=21)
    ref, keep = ref_quest(q, k, v, opts["k"], opts["page_size"], opts.get("sink_tokens", 0), opts.get("local_window", 0))
    assert torch.equal(m.last_selection, keep)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("opts", [dict(k=0.4, recent=0.5), dict(k=0.3, recent=0.0, selection="group"),
                                  dict(k=0.5, recent=0.25, sink_tokens=1, local_window=1)])
def test_h2o_matches_definition(opts):
    T = 16
    q, k, v, m, _, out = run_method("h2o", opts, 14, T=T)
    ref, keep, held = ref_h2o(q, k, v, opts["k"], opts["recent"], opts.get("selection") == "group",
                              opts.get("sink_tokens", 0), opts.get("local_window", 0))
    assert torch.equal(m.last_selection, keep)
    torch.testing.assert_close(out, ref, **TOL)
    st = m.stats()
    assert st["cache_fraction"] == pytest.approx(sum(len(c) for b, u, i, c in held if i == T - 1) / (len({(b, u) for b, u, _, _ in held}) * T))


@pytest.mark.parametrize("opts", [dict(d=4, k=0.25, cache=0.5), dict(d=6, k=0.3, cache=0.6, selection="head", sink_tokens=1, local_window=2)])
def test_loki_h2o_matches_definition(opts):
    T = 18
    q, k, v, m, basis, out = run_method("loki_h2o", dict(recent=0.5, **opts), 15, T=T)
    rank = loki_rank(q, k, basis.components("post")[0].double(), opts["d"])
    ref, keep, held = ref_h2o(q, k, v, opts["cache"], 0.5, True, opts.get("sink_tokens", 0), opts.get("local_window", 0),
                              rank=rank, sel_frac=opts["k"])
    assert torch.equal(m.last_selection, keep)
    torch.testing.assert_close(out, ref, **TOL)
    # the cache really is bounded: at the last row each KV head holds ceil(cache * T) keys
    final = [len(c) for b, u, i, c in held if i == T - 1]
    assert final == [int(torch.ceil(torch.tensor(opts["cache"] * T)))] * (B * KVH)
    assert m.stats()["cache_saved"] == pytest.approx(1 - final[0] / T)


@pytest.mark.parametrize("name,opts", [("h2o", dict(k=0.4)), ("h2o", dict(k=0.3, selection="group", sink_tokens=1)),
                                       ("loki_h2o", dict(d=4, k=0.25, cache=0.5, local_window=2))])
def test_evicting_methods_decode_one_token_at_a_time_like_prefill(name, opts):
    """The cache state carried between decode calls gives exactly the rows of one causal prefill."""
    T = 15
    q, k, v = qkv(16, T=T)
    full, basis = make(name, **opts)
    ref = full.attend(MOD, q, k, v, causal(T), SCALE)
    step, _ = make(name, basis_obj=basis, **opts)
    p = 5  # a sparse prefill of 5 tokens, then one token per call
    outs = [step.attend(MOD, q[:, :, :p], k[:, :, :p], v[:, :, :p], causal(p), SCALE)]
    for i in range(p, T):
        outs.append(step.attend(MOD, q[:, :, i: i + 1], k[:, :, : i + 1], v[:, :, : i + 1], causal(1, i + 1), SCALE))
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, **TOL)


def test_h2o_dense_prefill_then_sparse_decode():
    """sparse_prefill=false: dense prompt; the cache is then cut by the prompt's accumulated attention."""
    T, S = 12, 13
    q, k, v = qkv(17, T=S)
    m, _ = make("h2o", k=0.5, recent=0.5, sparse_prefill=False)
    dense, _ = make("dense")
    out = m.attend(MOD, q[:, :, :T], k[:, :, :T], v[:, :, :T], causal(T), SCALE)
    torch.testing.assert_close(out, dense.attend(MOD, q[:, :, :T], k[:, :, :T], v[:, :, :T], causal(T), SCALE), **TOL)
    st = m._state[0]
    # reference: accumulated dense attention of the prompt; keep 3 recent + the 3 most attended others
    s = torch.einsum("bhtd,bhsd->bhts", q[:, :, :T], k[:, :, :T].repeat_interleave(G, 1)) * SCALE
    p = torch.softmax(s.masked_fill(~causal(T), float("-inf")), -1)
    acc = p.sum(2)  # (B, H, T)
    for b in range(B):
        for h in range(H):
            rest = sorted(range(T - 3), key=lambda j: -float(acc[b, h, j]))[:3]
            assert sorted(st["cache"][b, h].nonzero().flatten().tolist()) == sorted(rest + [9, 10, 11])
    # the next token: its key enters, one key is evicted, the row attends to ceil(0.5 * 13) = 7 keys
    m.attend(MOD, q[:, :, T:], k, v, causal(1, S), SCALE)
    assert (m.last_selection.sum(-1) == 7).all()


def test_loki_fp8_slab_matches_definition():
    """method.slab_dtype=fp8 (session 19: the kernels' opt-in fp8 scoring slab): Loki's approximate scores with the
    rotated keys' first d dims rounded to e4m3 (q' exact), so the selection is the top-k of those scores."""
    d, T = 4, 12
    q, k, v, m, basis, out = run_method("loki", dict(d=d, k=0.5, slab_dtype="fp8"), 16, T=T)
    P = basis.components("post")[0].double()
    want = torch.zeros(B, H, T, T, dtype=torch.float64)
    for h in range(H):
        Ph = P[h // G][:, :d]
        kr = (k[:, h // G].double() @ Ph).float().to(torch.float8_e4m3fn).double()
        want[:, h] = (q[:, h].double() @ Ph) @ kr.transpose(-1, -2) * SCALE
    got = m.approx_scores(MOD, q, k, SCALE).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ... and it differs from the 16-bit / fp32 scores (the rounding is real)
    assert not torch.allclose(got, loki_rank(q, k, P, d), rtol=1e-4, atol=1e-5)
