"""Direct float64 implementations of each method's definition, with plain loops (one query row, one head at a
time), and small helpers shared by the method tests."""

from __future__ import annotations

import math
from fractions import Fraction
from functools import partial
from types import SimpleNamespace

import torch

from loki_testutils import causal, make_method, random_qkv  # noqa: F401 (causal: for the tests)
from loki_testutils import fake_model as _fake_model
from loki_testutils import random_basis as _random_basis

B, H, KVH, D = 2, 6, 2, 16
G = H // KVH
SCALE = D ** -0.5
MOD = SimpleNamespace(layer_idx=0)


# the shared helpers (tests/loki_testutils.py) at this file's shapes
fake_model = partial(_fake_model, heads=H, kv_heads=KVH, head_dim=D)
random_basis = partial(_random_basis, heads=H, kv_heads=KVH, head_dim=D)
qkv = partial(random_qkv, batch=B, heads=H, kv_heads=KVH, head_dim=D)


def make(name, basis_obj=None, **opts):
    """The method ``name`` with ``opts`` on ``basis_obj`` (default: a fresh random basis), bound to ``fake_model()``
    -> (method, basis)."""
    return make_method(name, basis_obj or random_basis(), fake_model(), **opts)


# ------------------------------------------------------------------------------------------ row-level pieces


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def attend_row(qv, ks, vs, idx):
    """exact attention of one query over the keys ``idx`` -> (output list, {j: prob})."""
    s = [dot(qv, ks[j]) * SCALE for j in idx]
    p = softmax(s)
    out = [sum(p[n] * float(vs[j][c]) for n, j in enumerate(idx)) for c in range(len(qv))]
    return out, dict(zip(idx, p))


def forced_set(i, sinks, local):
    return {j for j in range(i + 1) if j < sinks or j > i - local}


def budget(k, n):
    return max(1, min(n, math.ceil(Fraction(k).limit_denominator(2**31 - 1) * n)))  # exact: 0.56 of 25 is 14


def top_with_forced(score, cand, b, forced):
    """The ``b`` best of ``cand`` by ``score`` (dict), forced ones first (all forced kept even beyond b)."""
    f = [j for j in cand if j in forced]
    rest = sorted((j for j in cand if j not in forced), key=lambda j: -score[j])
    return set(f) | set(rest[: max(0, b - len(f))])


# ------------------------------------------------------------------------------------------ references


def blank_outputs(q):
    """Zero outputs shaped like ``q`` (B, H, T, D) and an all-False keep mask (B, H, T, T)."""
    Bq, Hq, T, _ = q.shape
    return torch.zeros_like(q), torch.zeros(Bq, Hq, T, T, dtype=torch.bool)


def query_rows(q, k, v):
    """Every query row, batch by head by position: (b, h, i, the row, keys and values of its KV head), as lists."""
    Bq, Hq, T, _ = q.shape
    for b in range(Bq):
        for h in range(Hq):
            ks, vs = k[b, h // G].tolist(), v[b, h // G].tolist()
            for i in range(T):
                yield b, h, i, q[b, h, i].tolist(), ks, vs


def ref_pca_attn(q, k, v, P, d):
    """softmax over (q P_d).(k P_d) of every visible key (causal)."""
    Bq, Hq, T, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(Bq):
        for h in range(Hq):
            Ph = P[h // G][:, :d]
            kr = [(k[b, h // G, j] @ Ph).tolist() for j in range(T)]
            for i in range(T):
                qr = (q[b, h, i] @ Ph).tolist()
                p = softmax([dot(qr, kr[j]) * SCALE for j in range(i + 1)])
                out[b, h, i] = sum(p[j] * v[b, h // G, j] for j in range(i + 1))
    return out


def ref_sparq(q, k, v, r, kfrac, realloc=True, sinks=0, local=0):
    Dq = q.shape[-1]
    out, keep = blank_outputs(q)
    for b, h, i, qv, ks, vs in query_rows(q, k, v):
        i1 = sorted(range(Dq), key=lambda c: -abs(qv[c]))[:r]
        ratio = sum(abs(qv[c]) for c in i1) / sum(abs(x) for x in qv)
        logit = {j: sum(qv[c] * ks[j][c] for c in i1) * SCALE / math.sqrt(ratio) for j in range(i + 1)}
        sel = top_with_forced(logit, range(i + 1), budget(kfrac, i + 1), forced_set(i, sinks, local))
        keep[b, h, i, sorted(sel)] = True
        y, _ = attend_row(qv, ks, vs, sorted(sel))
        if realloc:
            p = softmax([logit[j] for j in range(i + 1)])
            alpha = sum(p[j] for j in sel)
            vbar = [sum(vs[j][c] for j in range(i + 1)) / (i + 1) for c in range(Dq)]
            y = [alpha * y[c] + (1 - alpha) * vbar[c] for c in range(Dq)]
        out[b, h, i] = torch.tensor(y, dtype=torch.float64)
    return out, keep


def ref_quest(q, k, v, kfrac, page, sinks=0, local=0):
    Dq = q.shape[-1]
    out, keep = blank_outputs(q)
    for b, h, i, qv, ks, vs in query_rows(q, k, v):
        pages = sorted({j // page for j in range(i + 1)})
        ub = {}
        for p in pages:
            members = [j for j in range(i + 1) if j // page == p]
            ub[p] = sum(max(qv[c] * max(ks[j][c] for j in members), qv[c] * min(ks[j][c] for j in members))
                        for c in range(Dq)) * SCALE
        forced = forced_set(i, sinks, local)
        n_pages = math.ceil(max(budget(kfrac, i + 1) - len(forced), 0) / page)
        best = sorted(pages, key=lambda p: -ub[p])[:n_pages]
        sel = {j for j in range(i + 1) if j // page in best} | forced
        keep[b, h, i, sorted(sel)] = True
        out[b, h, i] = torch.tensor(attend_row(qv, ks, vs, sorted(sel))[0], dtype=torch.float64)
    return out, keep


def ref_h2o(q, k, v, cache_frac, recent, group, sinks=0, local=0, rank=None, sel_frac=None):
    """H2O simulated row by row with Python lists. ``group``: one cache per KV head (attention of the group's heads
    summed), else one per query head. ``rank`` (B, H, T, S) + ``sel_frac``: loki_h2o -- each head attends to its
    ``sel_frac`` best-ranked cached keys."""
    Bq, Hq, T, Dq = q.shape
    out = torch.zeros_like(q)
    keep = torch.zeros(Bq, Hq, T, T, dtype=torch.bool)
    held = []
    units = [[u * G + g for g in range(G)] for u in range(KVH)] if group else [[h] for h in range(Hq)]
    for b in range(Bq):
        for heads in units:
            cache, acc = [], {}
            kv = heads[0] // G
            ks, vs = k[b, kv].tolist(), v[b, kv].tolist()
            for i in range(T):
                cache.append(i)
                acc[i] = 0.0
                bud = budget(cache_frac, i + 1)
                r = max(1, math.floor(recent * bud))
                protected = {j for j in range(i + 1) if j > i - r} | forced_set(i, sinks, local)
                while len(cache) > bud:
                    cand = [j for j in cache if j not in protected]
                    if not cand:
                        break
                    cache.remove(min(cand, key=lambda j: (acc[j], j)))
                held.append((b, units.index(heads), i, sorted(cache)))
                for h in heads:
                    qv = q[b, h, i].tolist()
                    if rank is None:
                        idx = sorted(cache)
                    else:
                        sc = {j: float(rank[b, h, i, j]) for j in cache}
                        idx = sorted(top_with_forced(sc, cache, budget(sel_frac, i + 1), forced_set(i, sinks, local)))
                    keep[b, h, i, idx] = True
                    o, p = attend_row(qv, ks, vs, idx)
                    out[b, h, i] = torch.tensor(o, dtype=torch.float64)
                    for j, pj in p.items():
                        acc[j] += pj
    return out, keep, held


def loki_rank(q, k, P, d):
    """(B, H, T, S) Loki's approximate scores, one head at a time."""
    Bq, Hq, T, _ = q.shape
    S = k.shape[2]
    out = torch.zeros(Bq, Hq, T, S, dtype=torch.float64)
    for h in range(Hq):
        Ph = P[h // G][:, :d]
        out[:, h] = (q[:, h] @ Ph) @ (k[:, h // G] @ Ph).transpose(-1, -2) * SCALE
    return out
