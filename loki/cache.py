"""Loki in real generation: a preallocated KV cache in PCA coordinates and the method that decodes from it.

Layout (one :class:`LokiLayer` per decoder layer, the layout the Triton kernels in ``kernels/`` read)::

    k_lr    (B, KVH, S_max, d)      first d rotated key dims, K' = K @ P[kvh]   (the slab Loki scores on)
    k_rest  (B, KVH, S_max, D - d)  the other rotated dims (k_lr and k_rest share one allocation)
    v       (B, KVH, S_max, D)      values, as usual
    lengths (B,) int32              valid tokens of each sequence (ragged batches: per-sequence lengths)

Keys cost exactly what a dense cache costs (the split adds no bytes); the only overhead is the basis
P (L, KVH, D, D) fp32 and ``lengths``.

``layout="rows"`` (``LokiCache(..., layout="rows")``): whole rotated key rows (B, KVH, S_max, D), k_lr and k_rest
their views, plus ``slab``, a contiguous copy of k_lr that the scoring pass reads (``kernels.allocate_cache_rows``
with kv=False).  It costs d / (2D) more cache memory and makes the sparse attention gather one K row per token
instead of two: on the H200 the kernel step at batch 16 / 64K is 1-5% faster so (kernels/README.md, sessions 13-14).
With the method's ``slab_dtype: fp8`` (opt-in, not the paper's method) that copy is held in e4m3 (half its bytes for
the scoring pass, 16-bit caches; kernels/README.md, session 19): both decode paths then score against it, the writers
round the fp32 rotated keys to it, saturating at +-448.  It needs ``layout="rows"`` (the default layout then).

Everything is allocated once, so a decode step has static shapes and can be captured in a CUDA graph
(:class:`loki.generation.GraphDecoder`).

How a forward runs (no model class is patched):

* ``cache.update`` (called by the attention layer) writes the new keys rotated and the values;
  on the prefill it returns the prompt's own (unrotated) keys and values, on a decode step only
  the new token's.
* the attention implementation ``"loki"`` (``loki/attention.py``) calls ``module._loki_method``,
  here a :class:`CachedLoki`. Prefill: dense attention over the prompt (as the evaluation-time
  ``loki`` with ``sparse_prefill: false``), then the cache drops left padding (per-sequence lengths).
  Decode: the Loki step reads the layer's cache -- the Triton kernels on CUDA (``kernels.loki_decode``
  and friends), the torch reference (:func:`reference_decode`) on the CPU.

Same options and the same selection semantics as :class:`loki.methods.loki.Loki` (d, k, k_mode,
selection head|group, group_reduce, sink_tokens, local_window, dense_layers, rope), so that
greedy outputs match the evaluation-time method. Not cacheable, hence refused: ``basis: online``
(the basis would change every step) and ``d_variance`` (a per-head d).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from loki.common import fail
from loki.methods.base import forced_mask, group_reduce, masked_attention, exact_scores, select_topk
from loki.methods.loki import Loki

BACKENDS = ("auto", "kernels", "reference")
LAYOUTS = ("split", "rows")


def _kernels_utils():
    from kernels import _utils  # noqa: PLC0415  (ceil_fraction: the budgets the kernels compute)

    return _utils


def _kernels():
    import kernels  # noqa: PLC0415  (imports triton; only on the kernel path)

    return kernels


# ------------------------------------------------------------------------------------------- budgets


def decode_budget(lengths: torch.Tensor, k, k_mode: str) -> torch.Tensor:
    """Tokens kept per sequence at a decode step, (B,) int64 in [1, n_b] (0 where n_b = 0).

    prefix / window: ceil(k * n_b) -- at a decode step the query sees its whole sequence, so the
    evaluation-time ``prefix`` and ``window`` budgets coincide (for an unpadded sequence); with
    ragged batches each sequence uses its own length n_b. tokens: min(k, n_b).
    """
    n = lengths.long()
    if k_mode == "tokens":
        want = torch.full_like(n, int(k))
    else:
        want = _kernels_utils().ceil_fraction(n, float(k))
    return torch.minimum(want.clamp(min=1), n)


def max_budget(S_max: int, k, k_mode: str, sink: int, local: int) -> int:
    """Static upper bound of a step's selection size (index buffers have this width under CUDA graphs)."""
    base = int(k) if k_mode == "tokens" else _kernels_utils().ceil_fraction(S_max, float(k))
    return max(1, min(S_max, base + int(sink) + int(local)))


# ------------------------------------------------------------------------------------------- layers


def _check_attention(method, config: dict, layer_idx: int) -> None:
    """Refuse to run unless the cache's method is the one the model's attention will call."""
    mod = method.modules[layer_idx]
    impl = getattr(getattr(mod, "config", None), "_attn_implementation", "loki")
    attached = getattr(mod, "_loki_method", None)
    if impl != "loki" or attached is not method:
        now = attached.describe() if attached is not None and impl == "loki" else {"attention": impl}
        raise fail(f"this LokiCache was made for {config}, but the model now runs {now}; a cache is "
                   "tied to the configuration and the method object it was made for.",
                   "make a new LokiCache(model, ...) after attaching the method you want "
                   "(and keep the model on the 'loki' attention implementation).")


class LokiLayer(CacheLayerMixin):
    """One layer of a :class:`LokiCache` (preallocated; see the module docstring for the layout)."""

    is_compileable = False  # keeps `generate` from auto-compiling; decode steps run under CUDA graphs instead
    is_croppable = False
    is_sliding = False
    supports_early_init = False  # allocated eagerly

    def __init__(self, cache: "LokiCache", layer_idx: int, P: torch.Tensor, d: int, batch_size: int,
                 max_cache_len: int, dtype: torch.dtype, device, use_kernels: bool, layout: str = "split",
                 slab_dtype: torch.dtype | None = None):
        super().__init__()
        KVH, D = P.shape[0], P.shape[-1]
        self.method, self.layer_idx = cache.method, layer_idx  # no reference to the cache itself (no cycle)
        self.cache_config, self.k_max = cache.config, cache.k_max
        self.batch_size, self.kv_heads, self.head_dim, self.d = batch_size, KVH, D, d
        self.max_cache_len, self.dtype, self.device = max_cache_len, dtype, torch.device(device)
        self.use_kernels = use_kernels
        self.P = P.to(device=device, dtype=torch.float32).contiguous()  # (KVH, D, D), columns = directions
        n = batch_size * KVH * max_cache_len
        self.kbuf = torch.zeros(n * D, dtype=dtype, device=device)
        self.slab = None  # (rows layout) the contiguous copy of k_lr that the scoring pass reads
        if layout == "rows":  # whole rotated key rows, k_lr / k_rest views (kernels.allocate_cache_rows, kv=False)
            rows = self.kbuf.view(batch_size, KVH, max_cache_len, D)
            self.k_lr, self.k_rest = rows[..., :d], rows[..., d:]
            self.slab = torch.zeros(batch_size, KVH, max_cache_len, d, dtype=slab_dtype or dtype, device=device)
        else:  # k_lr | k_rest, back to back (kernels.allocate_cache)
            self.k_lr = self.kbuf[: n * d].view(batch_size, KVH, max_cache_len, d)
            self.k_rest = self.kbuf[n * d:].view(batch_size, KVH, max_cache_len, D - d)
        self.layout = layout
        self.v = torch.zeros(batch_size, KVH, max_cache_len, D, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.seen = 0  # positions fed so far, padding included (host side; what generate calls the cache length)
        self.state = "empty"  # empty -> pending (prefill written, padding not yet dropped) -> ready (decoding)
        self.is_initialized = True

    # -- the CacheLayerMixin interface
    def lazy_initialization(self, key_states, value_states) -> None:  # allocated in __init__
        pass

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The attention sees what `update` returns: the prompt itself on the prefill, the new token on a
        # decode step (the Loki step reads the cache and the per-sequence lengths, not the mask).
        return query_length, (self.seen if self.state != "empty" else 0)

    def reset(self) -> None:
        self.lengths.zero_()
        self.seen = 0
        self.state = "empty"

    def nbytes(self) -> int:
        held = (self.kbuf, self.v, self.lengths, self.P) + ((self.slab,) if self.slab is not None else ())
        return sum(t.numel() * t.element_size() for t in held)

    def _unsupported(self, what: str):
        raise fail(f"LokiCache does not support {what}.",
                   "use greedy or sampling decoding (one prefill, then one token per step), one sequence per row.")

    def reorder_cache(self, beam_idx):
        self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int):
        self._unsupported("cropping (assisted / speculative decoding)")

    def batch_repeat_interleave(self, repeats: int):
        self._unsupported("expanding the batch (num_return_sequences / beams)")

    def batch_select_indices(self, indices):
        self._unsupported("selecting batch rows")

    def offload(self):
        self._unsupported("offloading")

    # -- writes
    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, KVH, T, D = key_states.shape
        if (B, KVH, D) != (self.batch_size, self.kv_heads, self.head_dim) or value_states.shape != key_states.shape:
            raise fail(f"LokiCache layer {self.layer_idx} holds batch={self.batch_size}, kv_heads={self.kv_heads}, "
                       f"head_dim={self.head_dim}, but got keys {tuple(key_states.shape)} / values "
                       f"{tuple(value_states.shape)}.",
                       "make one LokiCache per model and batch size (LokiCache(model, batch_size=..., max_cache_len=...)).")
        if key_states.device != self.device:
            raise fail(f"LokiCache is on {self.device}, the model's keys on {key_states.device}.",
                       "build the cache after moving the model (LokiCache(model, ...) takes the model's device).")

    def _rotate(self, k: torch.Tensor) -> torch.Tensor:
        """K' = K @ P in fp32, as loki.methods.loki.Loki.approx_scores computes it (torch reference path).

        A single row is rotated inside an 8-row GEMM: CPU BLAS takes another kernel (gemv) for one row,
        whose last-bit rounding differs from the rows of the evaluation-time method's one big product;
        with the same kernel a key scores bitwise as it does there, so fewer near-ties at the top-k
        boundary break differently (decoded keys can still differ in the last bit: docs/generation.md)."""
        if k.shape[2] == 1:
            return torch.matmul(k.float().expand(-1, -1, 8, -1), self.P[None])[:, :, :1]
        return torch.matmul(k.float(), self.P[None])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check_states(key_states, value_states)
        _check_attention(self.method, self.cache_config, self.layer_idx)
        T = key_states.shape[2]
        if self.state == "empty":  # prefill: write the whole (possibly left-padded) prompt
            if T > self.max_cache_len:
                raise fail(f"the prompt has {T} tokens but the LokiCache holds {self.max_cache_len}.",
                           "build the cache with max_cache_len >= prompt length + max_new_tokens.")
            if self.use_kernels:
                K = _kernels()
                K.prefill_kv(key_states, value_states, self.P, self.k_lr, self.k_rest, self.v, self.lengths,
                             advance=True, strict=False, slab=self.slab)
            else:
                kr = self._rotate(key_states)
                self.k_lr[:, :, :T] = kr[..., : self.d].to(self.dtype)
                self.k_rest[:, :, :T] = kr[..., self.d:].to(self.dtype)
                if self.slab is not None:  # (from fp32, as the kernels' writers: one rounding, also to e4m3)
                    self.slab[:, :, :T] = kr[..., : self.d]
                self.v[:, :, :T] = value_states.to(self.dtype)
                self.lengths.fill_(T)
            self.seen = T
            self.state = "pending"
        elif self.state == "pending":
            raise fail(f"LokiCache layer {self.layer_idx}: the prefill was written but never attended by the Loki "
                       "method (the model ran another attention implementation on it).",
                       "attach the method with loki.generation.attach_cached_loki(model, ...) and make the cache "
                       "with LokiCache(model, ...).")
        else:  # decode: one token per sequence, appended at lengths[b]
            if T != 1:
                raise fail(f"LokiCache got a {T}-token forward after its prefill; it supports one prefill, then one "
                           "token per step.", "call cache.reset() (or make a new cache) before a new prompt.")
            if self.seen + 1 > self.max_cache_len:
                raise fail(f"the LokiCache is full ({self.max_cache_len} positions: prompt + generated tokens).",
                           "build the cache with max_cache_len >= prompt length + max_new_tokens.")
            if self.use_kernels:
                K = _kernels()
                K.append_kv(key_states[:, :, 0], value_states[:, :, 0], self.P, self.k_lr, self.k_rest, self.v,
                            self.lengths, advance=True, strict=False, slab=self.slab)
            else:
                rows = torch.arange(self.batch_size, device=self.device)
                pos = self.lengths.long()
                kr = self._rotate(key_states)[:, :, 0]  # (B, KVH, D)
                self.k_lr[rows, :, pos] = kr[..., : self.d].to(self.dtype)
                self.k_rest[rows, :, pos] = kr[..., self.d:].to(self.dtype)
                if self.slab is not None:
                    self.slab[rows, :, pos] = kr[..., : self.d].to(self.slab.dtype)
                self.v[rows, :, pos] = value_states[:, :, 0].to(self.dtype)
                self.lengths += 1
            self.seen += 1
        self.method._fresh[self.layer_idx] = self
        return key_states, value_states

    def commit_prefill(self, valid: torch.Tensor) -> None:
        """After the prefill's attention: drop padded positions (``valid`` (B, T) bool), keep each row's tokens
        in order at the front, set per-sequence lengths."""
        if self.state != "pending":
            raise fail(f"LokiCache layer {self.layer_idx}: no prefill to commit (state {self.state}).",
                       "this is a bug: report it.")
        B, T = self.batch_size, self.seen
        valid = valid.to(self.device).expand(B, -1)
        if valid.shape[-1] != T:
            raise fail(f"LokiCache layer {self.layer_idx}: the prefill mask covers {valid.shape[-1]} keys, the cache "
                       f"holds {T}.", "this is a bug: report it.")
        if not bool(valid.all()):
            order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # valid first, in order
            for buf in (self.k_lr, self.k_rest, self.v) + ((self.slab,) if self.slab is not None else ()):
                w = buf.shape[-1]
                if w == 0:
                    continue
                if buf.element_size() == 1:  # (an e4m3 slab: torch's gather has no float8 kernels; move the bytes)
                    buf = buf.view(torch.uint8)
                buf[:, :, :T] = buf[:, :, :T].gather(2, order[:, None, :, None].expand(B, self.kv_heads, T, w))
            self.lengths.copy_(valid.sum(-1).to(torch.int32))
        self.state = "ready"

    def fill_random(self, n_tokens: int, generator: torch.Generator | None = None) -> None:
        """Benchmarks: pretend a prefill of ``n_tokens`` random (rotated) keys and values per sequence."""
        if n_tokens > self.max_cache_len:
            raise fail(f"fill_random: {n_tokens} tokens do not fit in {self.max_cache_len}.", "lower n_tokens.")
        for buf in (self.k_lr, self.k_rest, self.v):
            if buf.shape[-1]:
                buf[:, :, :n_tokens].normal_(generator=generator)
        if self.slab is not None:
            self.slab[:, :, :n_tokens] = self.k_lr[:, :, :n_tokens]
        self.lengths.fill_(n_tokens)
        self.seen = n_tokens
        self.state = "ready"


class LokiCache(Cache):
    """Preallocated Loki KV cache for ``model`` (with a :class:`CachedLoki` attached).

    ``LokiCache(model, batch_size=B, max_cache_len=S)``; pass it to ``model.generate`` (``cache=`` in
    transformers >= 5.18, ``past_key_values=`` before; :func:`loki.generation.generate` picks the name).
    ``max_cache_len`` must cover the padded prompt plus the generated tokens.  ``layout``: "split" (k_lr and k_rest
    in slabs of their own: no memory beyond a dense cache) or "rows" (whole key rows plus a copy of k_lr: d / (2D)
    more; see the module docstring); None: "rows" where the method scores an fp8 slab (``slab_dtype: fp8``, whose
    e4m3 copy lives beside the key rows), else "split".
    """

    def __init__(self, model, batch_size: int, max_cache_len: int, dtype: torch.dtype | None = None,
                 device=None, layout: str | None = None):
        from loki.modeling import attention_modules

        mods = attention_modules(model)
        method = getattr(mods[0], "_loki_method", None) if mods else None
        if getattr(model.config, "_attn_implementation", None) != "loki":
            method = None
        if not isinstance(method, CachedLoki):
            got = type(method).__name__ if method is not None else "none"
            raise fail(f"LokiCache needs the model to run the cached Loki method (attached: {got}).",
                       "attach it first: loki.generation.attach_cached_loki(model, {'d': ..., 'k': ...}, basis=...).")
        fp8 = getattr(method, "slab_dtype", None) == "fp8"
        if layout is None:
            layout = "rows" if fp8 else "split"
        if layout not in LAYOUTS:
            raise fail(f"LokiCache: unknown layout {layout!r}.", f"use one of {list(LAYOUTS)}.")
        if int(batch_size) < 1 or int(max_cache_len) < 1:
            raise fail(f"LokiCache: batch_size={batch_size} and max_cache_len={max_cache_len} must be >= 1.",
                       "pass positive sizes.")
        param = next(model.parameters())
        self.method = method
        self.config = dict(method.describe())
        self.fingerprint = dict(method.model_info)
        self.dtype = dtype or param.dtype
        self.device = torch.device(device) if device is not None else param.device
        self.use_kernels = method.use_kernels(self.device)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise fail(f"LokiCache: dtype {self.dtype} is not a cache dtype (float32, float16 or bfloat16).",
                       "pass dtype=None (the model's) or one of those.")
        self.batch_size_, self.max_len = int(batch_size), int(max_cache_len)
        self.k_max = max_budget(self.max_len, method.k, method.k_mode, method.sink_tokens, method.local_window)
        self.layout = layout
        slab_dtype = None
        if fp8:
            if layout != "rows":
                raise fail("slab_dtype=fp8 keeps an e4m3 copy of the scored key dims beside the key rows: it needs "
                           f"LokiCache(..., layout='rows'), got layout={layout!r}.",
                           "build the cache with layout='rows', or set method.slab_dtype=null.")
            if self.dtype not in (torch.float16, torch.bfloat16):
                raise fail(f"slab_dtype=fp8 is for 16-bit caches (bfloat16 / float16), the cache is {self.dtype}.",
                           "run the model in bfloat16 or float16, or set method.slab_dtype=null.")
            slab_dtype = torch.float8_e4m3fn
        layers = [LokiLayer(self, i, method.P[i], method.dims, self.batch_size_, self.max_len, self.dtype,
                            self.device, self.use_kernels, layout, slab_dtype)
                  for i in range(method.model_info["num_layers"])]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held: keys (both slabs), values, lengths and the per-layer bases."""
        return sum(layer.nbytes() for layer in self.layers)

    def fill_random(self, n_tokens: int, seed: int = 0) -> None:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        for layer in self.layers:
            layer.fill_random(n_tokens, g)

    def advance_host(self, n: int) -> None:
        """After ``n`` CUDA-graph replays of a decode step: catch the host-side position counters up."""
        for layer in self.layers:
            layer.seen += int(n)

    @property
    def lengths(self) -> torch.Tensor:
        return self.layers[0].lengths


# ------------------------------------------------------------------------------------------- decode steps


def reference_decode(method: "CachedLoki", layer: LokiLayer, q: torch.Tensor, scaling: float, dense: bool):
    """One decode step in torch, with the evaluation-time method's own helpers: q (B, H, D) -> (B, H, D).

    Scores q'[:d] . K'[:d] (q' = q @ P as in Loki.approx_scores), the same budget / forced / top-k /
    group logic, exact softmax over the selected keys (q' . K' over all D dims = q . K).
    """
    B, H, D = q.shape
    KVH, d = layer.kv_heads, layer.d
    g = H // KVH
    n = layer.lengths.long()
    S = max(1, int(n.max()))
    qr = torch.matmul(q.float().view(B, KVH, g, 1, D), layer.P[None].unsqueeze(2))  # (B, KVH, g, 1, D)
    kr = torch.cat([layer.k_lr[:, :, :S], layer.k_rest[:, :, :S]], dim=-1).float()  # (B, KVH, S, D)
    vv = layer.v[:, :, :S]
    visible = (torch.arange(S, device=q.device)[None, :] < n[:, None]).view(B, 1, 1, S)
    scores = (torch.matmul(qr, kr.unsqueeze(2).transpose(-1, -2)) * scaling).view(B, H, 1, S)
    if dense:
        keep = visible.expand(B, H, 1, S)
    else:
        kd = kr[..., :d] if layer.slab is None else layer.slab[:, :, :S].float()  # (what the scoring pass reads)
        approx = (torch.matmul(qr[..., :d], kd.unsqueeze(2).transpose(-1, -2)) * scaling).view(B, H, 1, S)
        budget = decode_budget(n, method.k, method.k_mode).view(B, 1, 1)
        forced = forced_mask(visible, method.sink_tokens, method.local_window)
        if method.selection == "group" and g > 1:
            keep = select_topk(group_reduce(approx, g, method.group_reduce), visible, budget, forced)
            keep = keep.repeat_interleave(g, dim=1)
        else:
            keep = select_topk(approx, visible, budget, forced)
    if method.record_selections and not dense:
        method.selections.setdefault(layer.layer_idx, []).append(keep[:, :, 0].cpu())
    return masked_attention(scores, keep, vv)[:, :, 0]


def kernel_decode(method: "CachedLoki", layer: LokiLayer, q: torch.Tensor, scaling: float, dense: bool):
    """One decode step with the Triton kernels (no host sync: CUDA-graph safe): q (B, H, D) -> (B, H, D)."""
    K = _kernels()
    q = q.to(layer.k_lr.dtype).contiguous()  # the kernels take q in the cache's dtype
    if dense:
        q_rot = K.rotate_q(q, layer.P)
        return K.dense_decode_attention(q_rot, layer.k_lr, layer.k_rest, layer.v, layer.lengths, scaling=scaling,
                                        strict=False)
    B, H, _ = q.shape
    g = H // layer.kv_heads
    mode = "group" if method.selection == "group" and g > 1 else "head"
    reduce = "max" if method.group_reduce == "max" else "sum"  # mean ranks as sum
    k_max = layer.k_max
    sink, local = int(method.sink_tokens), int(method.local_window)
    if method.k_mode != "tokens":  # ceil(k * n_b), raised to the forced count: computed inside the kernels
        budget = float(method.k)
    elif not (sink or local):
        budget = int(method.k)  # min(k, n_b): the kernels clip
    else:  # forced positions count towards the budget, as select_topk does
        budget = decode_budget(layer.lengths, method.k, method.k_mode)
        budget = torch.maximum(budget, K.forced_count(layer.lengths, sink, local)).to(torch.int32)
    out, idx = K.loki_decode(q, layer.P, layer.k_lr, layer.k_rest, layer.v, layer.lengths, budget,
                             mode=mode, reduce=reduce, scaling=scaling, strict=False, k_max=k_max,
                             return_indices=True, sink_tokens=sink, local_window=local, slab=layer.slab)
    if method.record_selections:
        keep = torch.zeros(B, idx.shape[1], layer.max_cache_len + 1, dtype=torch.bool, device=q.device)
        keep.scatter_(2, torch.where(idx < 0, layer.max_cache_len, idx).long(), True)
        keep = keep[..., :-1]
        if mode == "group":
            keep = keep.repeat_interleave(g, dim=1)
        method.selections.setdefault(layer.layer_idx, []).append(keep.cpu())
    return out


# ------------------------------------------------------------------------------------------- the method


class CachedLoki(Loki):
    """The Loki method for generation with a :class:`LokiCache` (same options as ``loki``, plus ``backend``).

    backend: auto (Triton kernels on CUDA, torch reference on the CPU) | kernels | reference.
    Prefill is always dense (``sparse_prefill`` is accepted for config compatibility and ignored).
    """

    name = "loki_cache"
    options = {**Loki.options, "backend": "auto"}
    all_layers_dense_ok = True  # dense_layers = every layer: the decode benchmark's dense_flash baseline

    def __init__(self, opts: dict | None = None, **resources):
        super().__init__(opts, **resources)
        self.prefill_calls = 0  # python counters (they prove which path ran; CUDA-graph replays do not count)
        self.decode_calls = 0
        self.kernel_calls = 0
        self.record_selections = False  # tests: keep each decode step's boolean selection per layer
        self.selections: dict[int, list] = {}
        self._fresh: dict[int, LokiLayer] = {}  # layers whose update ran in this forward, not yet attended

    def validate(self):
        super().validate()
        if self.basis != "offline":
            raise fail("generation with a LokiCache needs an offline basis (basis: online changes every step and "
                       "cannot be cached).", "set method.basis=offline and give a PCA basis (pca_path).")
        if self.d_variance is not None:
            raise fail("generation with a LokiCache needs one d per layer; d_variance (a d per head) is not "
                       "supported.", "set method.d_variance=null and method.d.")
        if self.backend not in BACKENDS:
            raise fail(f"loki_cache: unknown backend {self.backend!r}.", f"use one of {BACKENDS}.")

    def bind(self, model):
        from loki.modeling import attention_modules

        super().bind(model)
        self.modules = attention_modules(model)

    def use_kernels(self, device) -> bool:
        device = torch.device(device)
        if self.backend == "reference":
            return False
        if self.backend == "kernels":
            import os

            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise fail("loki_cache backend=kernels on the CPU needs the Triton interpreter.",
                           "set TRITON_INTERPRET=1 (slow; for tests) or use backend=reference / auto.")
            return True
        return device.type == "cuda"

    def describe(self) -> dict:
        return {**super().describe(), "dims": getattr(self, "dims", None)}

    def attend(self, module, q, k, v, visible, scaling):
        layer = self._fresh.pop(module.layer_idx, None)
        if layer is None:
            raise fail("the cached Loki method ran without a LokiCache (no cache, or another cache class).",
                       "pass cache=LokiCache(model, batch_size=..., max_cache_len=...) to generate / forward, or "
                       "use the evaluation-time method 'loki' for cache-free forwards.")
        if layer.state == "pending":  # prefill: dense over the prompt, then drop the padding from the cache
            out = self._dense_prefill(q, k, v, visible, scaling, layer.use_kernels)
            layer.commit_prefill(visible[:, 0, -1, :])
            self.prefill_calls += 1
            return out
        dense = module.layer_idx < int(self.dense_layers)
        step = kernel_decode if layer.use_kernels else reference_decode
        out = step(self, layer, q[:, :, 0], float(scaling), dense)
        self.decode_calls += 1
        self.kernel_calls += int(layer.use_kernels)
        return out.unsqueeze(2).to(q.dtype)  # a cache of another dtype (LokiCache(dtype=)): the model's dtype back

    @staticmethod
    def _dense_prefill(q, k, v, visible, scaling, fast: bool):
        if not fast:  # exactly the evaluation-time dense rows (sparse_prefill: false)
            scores = exact_scores(q, k, scaling)
            return masked_attention(scores, visible.expand_as(scores), v)
        import torch.nn.functional as F

        T, S = q.shape[2], k.shape[2]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if bool((visible == causal).all()):  # no padding: flash attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        # padded prompt: rows that see nothing (left padding) attend everywhere instead of giving NaN; their
        # outputs only ever reach other padded positions, which no real token attends to
        visible = visible | ~visible.any(-1, keepdim=True)
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              attn_mask=visible, scale=scaling)
