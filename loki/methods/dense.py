"""Dense attention: every visible key (the baseline)."""

from __future__ import annotations

import torch.nn.functional as F

from loki.methods.base import Method


class Dense(Method):
    name = "dense"
    options = {}

    def attend(self, module, q, k, v, visible, scaling):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])
