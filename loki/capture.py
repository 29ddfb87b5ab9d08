"""Capturing keys per layer and KV head, before and after RoPE, from any standard transformers LM.

Post-RoPE keys are what the attention function receives (our registered ``"loki"`` implementation
with the :class:`KeyCapture` method attached, which then runs dense SDPA). Pre-RoPE keys are the output
of the key projection (``k_norm`` after it where the model has one, as in Qwen3), read with forward
hooks. No model class is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loki.methods.base import Method


class KeyCapture(Method):
    name = "capture"
    options = {}

    def __init__(self, sides=("pre", "post")):
        super().__init__({})
        self.sides = tuple(sides)
        self.keys: dict[str, dict[int, torch.Tensor]] = {s: {} for s in self.sides}
        self._hooks = []

    def bind(self, model):
        from loki.modeling import attention_modules

        super().bind(model)
        if "pre" in self.sides:
            for m in attention_modules(model):
                src = getattr(m, "k_norm", None) or m.k_proj
                self._hooks.append(src.register_forward_hook(self._pre_hook(m.layer_idx, self.model_info["head_dim"])))

    def _pre_hook(self, layer: int, head_dim: int):
        def hook(_mod, _inp, out):
            B, T = out.shape[0], out.shape[1]
            self.keys["pre"][layer] = out.reshape(B, T, -1, head_dim).transpose(1, 2).detach()
        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def attend(self, module, q, k, v, visible, scaling):
        if "post" in self.sides:
            self.keys["post"][module.layer_idx] = k.detach()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def pop(self, side: str, num_layers: int) -> torch.Tensor:
        """Stacked keys of the last forward, (L, B, KVH, T, D)."""
        out = torch.stack([self.keys[side][i] for i in range(num_layers)])
        self.keys[side].clear()
        return out
