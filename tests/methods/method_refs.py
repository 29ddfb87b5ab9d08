"""Direct float64 implementations of each method's definition, with plain loops (one query row, one head at a
time), and small helpers shared by the method tests."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from loki.methods import build_method
from loki.pca import Basis

B, H, KVH, D = 2, 6, 2, 16
G = H // KVH
SCALE = D ** -0.5
MOD = SimpleNamespace(layer_idx=0)


def fake_model(layers=1):
    cfg = SimpleNamespace(model_type="llama", num_hidden_layers=layers, num_attention_heads=H, num_key_value_heads=KVH,
                          head_dim=D, hidden_size=H * D, vocab_size=100, _name_or_path="fake")
    return SimpleNamespace(config=cfg)


def random_basis(layers=1, seed=0):
    from loki.modeling import fingerprint

    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(layers, KVH, D, D, generator=g, dtype=torch.float64))[0]
    evr = torch.softmax(torch.randn(layers, KVH, D, generator=g, dtype=torch.float64), -1).sort(-1, descending=True).values
    return Basis({"post.components": P, "post.explained_variance_ratio": evr},
                 {"fingerprint": fingerprint(fake_model(layers), "fake")})


def make(name, basis_obj=None, **opts):
    basis = basis_obj or random_basis()
    m = build_method({"name": name, **opts}, basis=basis)
    m.bind(fake_model())
    return m, basis


def qkv(seed=1, T=12, S=None):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, KVH, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, KVH, S, D, generator=g, dtype=torch.float64)
    return q, k, v


def causal(T, S=None):
    S = S or T
    return (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None, None]


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
    return max(1, min(n, math.ceil(k * n)))


def top_with_forced(score, cand, b, forced):
    """The ``b`` best of ``cand`` by ``score`` (dict), forced ones first (all forced kept even beyond b)."""
    f = [j for j in cand if j in forced]
    rest = sorted((j for j in cand if j not in forced), key=lambda j: -score[j])
    return set(f) | set(rest[: max(0, b - len(f))])


# ------------------------------------------------------------------------------------------ references


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
    Bq, Hq, T, Dq = q.shape
    out = torch.zeros_like(q)
    keep = torch.zeros(Bq, Hq, T, T, dtype=torch.bool)
    for b in range(Bq):
        for h in range(Hq):
            ks, vs = k[b, h // G].tolist(), v[b, h // G].tolist()
            for i in range(T):
                qv = q[b, h, i].tolist()
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
    Bq, Hq, T, Dq = q.shape
    out = torch.zeros_like(q)
    keep = torch.zeros(Bq, Hq, T, T, dtype=torch.bool)
    for b in range(Bq):
        for h in range(Hq):
            ks, vs = k[b, h // G].tolist(), v[b, h // G].tolist()
            for i in range(T):
                qv = q[b, h, i].tolist()
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
