"""SparQ Attention (Ribar et al., ICML 2024; Graphcore), Algorithm 1, per query head:

1. i1 = the ``r`` components of q with the largest |q|;
2. approximate scores s_hat = softmax(q[i1] . K[:, i1] / tau), tau = sqrt(D * sum|q[i1]| / sum|q|)
   (in terms of the layer's ``scaling``: logits scaled by scaling / sqrt(sum|q[i1]| / sum|q|));
3. i2 = the top-k keys of s_hat (the shared budget ``k`` / ``k_mode``; sinks and local window forced first);
4. y = exact attention over K[i2], V[i2];
5. with ``reallocation`` (the paper's mean-value reallocation): out = alpha * y + (1 - alpha) * v_mean, where
   alpha = sum of s_hat over i2 and v_mean the mean of V over the row's visible keys; without it, out = y.

``r`` is an int (components) or a fraction of the head dim. Implemented faithfully, including the temperature
and the reallocation (on by default); the reallocation changes the output but not the selection.
"""

from __future__ import annotations

import torch

from loki.common import fail
from loki.methods.base import (Method, acc, dense_attention, exact_scores, expand_kv, forced_mask, masked_attention,
                               select_topk, token_budget, validate_budget)
from loki.methods.exact_topk import SELECTION_OPTIONS, is_dense_here


def sparq_approx_scores(q: torch.Tensor, k: torch.Tensor, r: int, scaling: float) -> torch.Tensor:
    """(B, H, T, S) fp32 logits of step 2 (before the softmax): q[i1].K[:, i1] * scaling / sqrt(ratio)."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    qf = acc(q)
    idx = qf.abs().topk(r, dim=-1).indices  # (B, H, T, r)
    q_r = torch.zeros_like(qf).scatter_(-1, idx, qf.gather(-1, idx))  # q with all but its r components zeroed
    ratio = q_r.abs().sum(-1, keepdim=True) / qf.abs().sum(-1, keepdim=True).clamp_min(1e-30)  # (B, H, T, 1)
    s = torch.matmul(q_r, acc(expand_kv(k, g)).to(qf.dtype).transpose(-1, -2))
    return s * (scaling / ratio.clamp_min(1e-30).sqrt())


class SparQ(Method):
    name = "sparq"
    options = {
        "r": 16,               # query components for the approximate scores: int >= 1, or a float in (0, 1) of the head dim
        **SELECTION_OPTIONS,
        "reallocation": True,  # mean-value reallocation: alpha * y + (1 - alpha) * mean(V)
    }

    def validate(self):
        validate_budget(self.name, self.k, self.k_mode)
        r = self.r
        # as loki's d: an int counts components, a float is a fraction of the head dim; a float >= 1 is refused
        # (1.0 could mean one component or all of them)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 or (isinstance(r, float) and r >= 1):
            raise fail(f"sparq: r must be an int >= 1 (query components) or a float in (0, 1) (a fraction of the head "
                       f"dim), got {r!r}.", "e.g. method.r=16 or method.r=0.25 (all components: method.r=<head dim>).")
        if not isinstance(self.reallocation, bool):
            raise fail(f"sparq: reallocation must be true or false, got {self.reallocation!r}.", "set method.reallocation.")

    def bind(self, model):
        super().bind(model)
        D = self.model_info["head_dim"]
        r = self.r
        dims = int(round(r * D)) if isinstance(r, float) else r
        if dims > D:
            raise fail(f"sparq: r={dims} is larger than the head dim {D} of this model.", f"set method.r to at most {D}.")
        if dims < 1:
            raise fail(f"sparq: r={r} is {r * D:.2f} of this model's {D} head dims, which rounds to 0 components.",
                       f"set method.r to at least {1 / D:.4g} (one component), or an int.")
        self.dims = dims

    def attend(self, module, q, k, v, visible, scaling):
        if is_dense_here(self, module, q):
            self.record(None, visible, q.shape[1], kv_heads=k.shape[1])
            return dense_attention(q, k, v, visible, scaling)
        scores = exact_scores(q, k, scaling)
        approx = sparq_approx_scores(q, k, self.dims, scaling)
        budget = token_budget(visible, self.k, self.k_mode)
        keep = select_topk(approx, visible, budget, forced_mask(visible, self.sink_tokens, self.local_window))
        self.last_selection = keep
        self.record(keep, visible, q.shape[1], kv_heads=k.shape[1])
        y = masked_attention(scores, keep, v)
        if not self.reallocation:
            return y
        vis = visible.expand(q.shape[0], 1, *visible.shape[2:])
        s_hat = torch.softmax(approx.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
        alpha = (s_hat * keep).sum(-1, keepdim=True)  # (B, H, T, 1)
        visf = vis.to(y.dtype if y.dtype == torch.float64 else torch.float32)
        v_mean = torch.matmul(visf, acc(v).to(visf.dtype)) / visf.sum(-1, keepdim=True).clamp_min(1)  # (B, KVH, T, D)
        v_mean = expand_kv(v_mean, q.shape[1] // k.shape[1]) if v_mean.shape[1] != q.shape[1] else v_mean
        return (alpha * y.to(alpha.dtype) + (1 - alpha) * v_mean.to(alpha.dtype)).to(v.dtype)
