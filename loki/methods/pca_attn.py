"""PCA-Attn: attention computed from the d-dim approximate scores alone, over every visible key (no top-k,
no exact re-scoring) -- the negative baseline of the Loki paper (Singhania et al., 2024, Sec. 5).

output = softmax(scaling * (q P_d)(k P_d)^T) V, with P_d the first d directions of the same basis Loki uses
(same options: d / d_variance, rope side, offline / online basis).
"""

from __future__ import annotations

from loki.methods.base import dense_attention, masked_attention
from loki.methods.exact_topk import is_dense_here
from loki.methods.loki import Loki


class PcaAttn(Loki):
    name = "pca_attn"
    options = {
        "d": 16,               # int >= 1: dims; float in (0, 1): fraction of the head dim
        "d_variance": None,    # float in (0, 1]: per (layer, KV head) d reaching this explained variance
        "rope": "post",        # basis fitted on post- (default) or pre-RoPE keys
        "basis": "offline",    # offline (pca_path) | online (PCA of the keys each row sees)
        "online_every": 16,    # basis=online: refit every N keys (1: every row its own fit)
        "dense_layers": 0,     # the first N layers attend densely
        "sparse_prefill": True,  # False: rows of a multi-token forward attend densely (decode-only approximation)
    }

    def validate(self):
        self.validate_basis()

    def attend(self, module, q, k, v, visible, scaling):
        self.last_selection = None  # every visible key (nothing is selected)
        self.record(None, visible, q.shape[1], kv_heads=k.shape[1])
        if is_dense_here(self, module, q):
            return dense_attention(q, k, v, visible, scaling)
        scores = self.approx_scores(module, q, k, scaling, visible)
        return masked_attention(scores, visible.expand(q.shape[0], q.shape[1], *visible.shape[2:]), v)
