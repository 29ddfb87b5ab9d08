"""Sparse-attention methods inside transformers, through its attention registry.

``import loki.attention`` registers one implementation, ``"loki"``, in ``AttentionInterface`` (and its
mask function in ``AttentionMaskInterface``). The method that runs is the object attached to each
attention module with :func:`attach`; the registered function dispatches to it. No model class is
patched. ``method.calls`` counts invocations, so tests can prove a method really ran.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loki.common import fail

IMPL = "loki"


def _loki_mask(*args, **kwargs):
    # Always materialise the boolean mask (True = may attend), never the is_causal shortcut.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def visible_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, T, S) mask of the keys each query may attend to."""
    if attention_mask is None:
        # causal with the queries at the end of the key sequence (prefill or decode with a cache)
        qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        return (torch.arange(kv_len, device=device)[None, :] <= qpos)[None, None]
    m = attention_mask
    if m.dtype != torch.bool:  # additive float mask
        m = m == 0
    return m[..., -q_len:, :kv_len] if m.shape[-1] >= kv_len else m[..., -q_len:, :]


def loki_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as ``"loki"``: query (B, H, T, D), key/value (B, KVH, S, D) -> ((B, T, H, D), None)."""
    method = getattr(module, "_loki_method", None)
    if method is None:
        raise fail("attention implementation 'loki' ran on a module with no method attached.",
                   "call loki.attention.attach(model, method) after loading the model.")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    visible = visible_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    out = method.attend(module, query, key, value, visible, float(scaling))
    method.calls += 1
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPL, loki_attention)
AttentionMaskInterface.register(IMPL, _loki_mask)


def attach(model, method) -> None:
    """Make every attention layer of ``model`` run ``method`` (and switch the model to ``"loki"``)."""
    from loki.modeling import attention_modules

    mods = attention_modules(model)
    if not mods:
        raise fail(f"found no attention modules in {type(model).__name__}.",
                   "the model must use transformers' standard attention (q_proj/k_proj/v_proj + layer_idx).")
    for m in mods:
        m._loki_method = method
    model.set_attn_implementation(IMPL)
    method.bind(model)
