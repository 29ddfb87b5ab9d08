"""Shared helpers: a tiny random Llama, evaluation-time generation (the reference), selection recording."""
import torch

from loki.attention import attach
from loki.methods.loki import Loki

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
            intermediate_size=128, vocab_size=300, max_position_embeddings=512)


def tiny_llama(seed: int = 0, **over):
    """A tiny random-weight Llama (fp32, eval mode) from a LlamaConfig."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, **over}), attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def cast_copy(model, dtype, device=None):
    """A copy of ``model`` in ``dtype`` (on ``device``), leaving the shared fixture as it is (16-bit runs)."""
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype)


def eval_time_generate(model, opts: dict, basis, ids, attention_mask=None, n: int = 16, record: bool = False):
    """Greedy generation with the evaluation-time loki method (sparse_prefill: false) and a DynamicCache.

    Returns (new tokens (B, n), method, selections {layer: [keep (B, H, S) per decode step]})."""
    method = Loki({**opts, "sparse_prefill": False}, basis=basis)
    attach(model, method)
    sels: dict[int, list] = {}
    if record:
        orig = method.attend

        def attend(module, q, k, v, visible, scaling):
            out = orig(module, q, k, v, visible, scaling)
            if q.shape[2] == 1 and module.layer_idx >= int(method.dense_layers):
                sels.setdefault(module.layer_idx, []).append(method.last_selection[:, :, 0].clone())
            return out

        method.attend = attend
    am = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=0)
    return out[:, ids.shape[1]:], method, sels


def dense_generate(model, ids, attention_mask=None, n: int = 16):
    model.set_attn_implementation("sdpa")
    am = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=0)
    return out[:, ids.shape[1]:]


def selection_mismatch(a: dict, b: dict) -> tuple[int, int]:
    """(differing entries, compared entries) between two {layer: [keep (B, H, S_i)]} recordings."""
    bad = tot = 0
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for layer in a:
        assert len(a[layer]) == len(b[layer])
        for x, y in zip(a[layer], b[layer]):
            S = min(x.shape[-1], y.shape[-1])
            assert not y[..., S:].any() and not x[..., S:].any()
            bad += int((x[..., :S] != y[..., :S]).sum())
            tot += x[..., :S].numel()
    return bad, tot


def left_pad(seqs: list[torch.Tensor], pad: int = 0):
    T = max(s.numel() for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    am = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - s.numel():] = s
        am[i, T - s.numel():] = 1
    return ids, am
