"""Torch references for the Loki decode pipeline.

* `loki_decode_ref`: float64, naive and loop-free where possible: rotate q, scores, topk, gather, softmax.
  This defines the semantics every kernel is tested against (and that an evaluation-side torch "loki" method
  must follow to select the same tokens):
    q'_h      = q_h @ P[h // g]                                   (g = H / KVH)
    s_h[j]    = scaling * q'_h[:d] . k_lr[h // g, j]               (j < lengths[b], else -inf)
    group:    s[kvh, j] = max_h s_h[j] (reduce="max") or sum_h s_h[j] (reduce="sum") over the g heads of kvh
    head:     s[h, j]   = s_h[j]
    budget    k_b = clip(k, 1, lengths[b]); selection = top-k_b of each row (ties: any)
    out_h     = softmax_j in sel(scaling * q'_h . [k_lr_j, k_rest_j]) @ v_j      (= softmax(q.k) v on the
                                                                                   selected original keys)
* `naive_loki_torch`: the benchmark baseline in the cache dtype: einsum scores, torch.topk, gather, SDPA.
* `dense_sdpa`: dense baseline (torch SDPA, enable_gqa=True).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import default_scaling
from .attention import dense_attention_ref, sparse_attention_ref  # noqa: F401  (re-exported)
from .kv_cache import append_kv_ref, prefill_kv_ref, rotate_keys_ref  # noqa: F401
from .scores import loki_scores_ref, rotate_q_ref
from .topk import budgets_ref, topk_select_ref  # noqa: F401


def loki_decode_ref(q, P, k_lr, k_rest, v, lengths, k, mode="group", reduce="max", scaling=None):
    """float64 reference of `loki_decode`; returns (out float64 (B, H, D), idx int64 (B, G, k_max), scores)."""
    D = q.shape[-1]
    scale = default_scaling(D, scaling)
    q_rot = rotate_q_ref(q, P)
    scores = loki_scores_ref(q_rot, k_lr, lengths, mode=mode, reduce=reduce, scaling=scale)
    idx = topk_select_ref(scores, lengths, k)
    out = sparse_attention_ref(q_rot, k_lr, k_rest, v, idx, scaling=scale)
    return out, idx, scores


def naive_loki_torch(q, P, k_lr, k_rest, v, k: int, mode="group", reduce="max", scaling=None, lengths=None):
    """Naive torch Loki (einsum scores, torch.topk, gather, SDPA) in the cache dtype; (B, H, D).

    Assumes every sequence holds at least k valid tokens (the benchmark's case)."""
    B, H, D = q.shape
    KVH, S, d = k_lr.shape[1], k_lr.shape[2], k_lr.shape[3]
    g = H // KVH
    dt = v.dtype
    scale = default_scaling(D, scaling)
    qr = torch.einsum("bkgd,kde->bkge", q.view(B, KVH, g, D).float(), P.float()).to(dt)  # (B, KVH, g, D)
    s = torch.einsum("bkgd,bksd->bkgs", qr[..., :d], k_lr).float() * scale  # (B, KVH, g, S)
    if lengths is not None:
        pos = torch.arange(S, device=q.device)
        s = s.masked_fill(pos >= lengths.view(B, 1, 1, 1), float("-inf"))
    if mode == "group":
        s = s.amax(2) if reduce == "max" else s.sum(2)  # (B, KVH, S)
        idx = s.topk(k, dim=-1).indices.unsqueeze(-1)  # (B, KVH, k, 1)
        kk = torch.cat([k_lr.gather(2, idx.expand(-1, -1, -1, d)), k_rest.gather(2, idx.expand(-1, -1, -1, D - d))], -1)
        vv = v.gather(2, idx.expand(-1, -1, -1, D))
        o = F.scaled_dot_product_attention(qr.reshape(B, H, 1, D), kk, vv, scale=scale, enable_gqa=True)
    else:
        idx = s.topk(k, dim=-1).indices.unsqueeze(-1)  # (B, KVH, g, k, 1)
        def gat(t, w):
            return t.unsqueeze(2).expand(B, KVH, g, S, w).gather(3, idx.expand(-1, -1, -1, -1, w))
        kk = torch.cat([gat(k_lr, d), gat(k_rest, D - d)], -1).reshape(B, H, k, D)
        vv = gat(v, D).reshape(B, H, k, D)
        o = F.scaled_dot_product_attention(qr.reshape(B, H, 1, D), kk, vv, scale=scale)
    return o.reshape(B, H, D)


def dense_sdpa(q, k, v, scaling=None):
    """Dense decode attention with torch SDPA (GQA); q (B, H, D), k/v (B, KVH, S, D) -> (B, H, D)."""
    B, H, D = q.shape
    o = F.scaled_dot_product_attention(q.view(B, H, 1, D), k, v, scale=default_scaling(D, scaling), enable_gqa=True)
    return o.view(B, H, D)
