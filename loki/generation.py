"""Generation with Loki: attach the cached method, make caches, greedy `generate`, CUDA-graph decoding.

    from loki.generation import attach_cached_loki, generate
    method = attach_cached_loki(model, {"d": 32, "k": 0.125, "selection": "group"}, pca_path=...)
    out = generate(model, input_ids, attention_mask, max_new_tokens=64)   # builds a LokiCache

Ragged batches: pass left-padded ``input_ids`` with their ``attention_mask`` (as for any HF model);
the cache drops the padding after the prefill and keeps per-sequence lengths. Works with transformers
5.17 (``past_key_values=``) and >= 5.18 (``cache=``): :func:`cache_kwarg` picks the name.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from loki.common import fail


def cache_kwarg(model) -> str:
    """The name under which this transformers version's forward / generate take a Cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def attach_cached_loki(model, opts: dict | None = None, basis=None, pca_path: str | None = None):
    """Attach a :class:`loki.cache.CachedLoki` (options as ``conf/method/loki.yaml``, ``name`` ignored)."""
    from loki.attention import attach
    from loki.cache import CachedLoki

    opts = {k: v for k, v in dict(opts or {}).items() if k != "name"}
    resources = {}
    if basis is not None:
        resources["basis"] = basis
    if pca_path:
        resources["pca_path"] = str(pca_path)
    method = CachedLoki(opts, **resources)
    attach(model, method)
    return method


def fit_basis(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, side: str = "post"):
    """A PCA basis (uncentered, like ``online_basis``) of the model's own keys on ``input_ids``, in memory.

    For benchmarks on random-weight models and for tests; real runs use the fit_pca stage's file.
    Leaves the model on the "sdpa" attention implementation.
    """
    from loki.attention import attach
    from loki.capture import KeyCapture
    from loki.modeling import fingerprint
    from loki.pca import Basis

    cap = KeyCapture(sides=(side,))
    attach(model, cap)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        info = fingerprint(model)
        keys = cap.pop(side, info["num_layers"]).double()  # (L, B, KVH, T, D)
    finally:
        cap.remove()
        model.set_attn_implementation("sdpa")
    if attention_mask is not None:
        keys = keys * attention_mask.to(keys.device, keys.dtype)[None, :, None, :, None]
    cov = torch.einsum("lbhtd,lbhte->lhde", keys, keys)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs.flip(-1).float().cpu().contiguous()
    ev = evals.flip(-1).clamp(min=0).cpu()
    tensors = {f"{side}.components": comps, f"{side}.explained_variance": ev,
               f"{side}.explained_variance_ratio": ev / ev.sum(-1, keepdim=True).clamp(min=1e-30)}
    return Basis(tensors, {"fingerprint": info, "fitted_on": "fit_basis (in memory)"}, "<fit_basis>")


def make_cache(model, batch_size: int, max_cache_len: int, layout: str | None = None):
    from loki.cache import LokiCache

    return LokiCache(model, batch_size=batch_size, max_cache_len=max_cache_len, layout=layout)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             cache=None, max_cache_len: int | None = None, **gen_kwargs) -> torch.Tensor:
    """Greedy ``model.generate`` with a LokiCache (made here unless given). Returns the new tokens (B, N)."""
    from loki.cache import CachedLoki
    from loki.modeling import attention_modules

    B, T = input_ids.shape
    method = getattr(attention_modules(model)[0], "_loki_method", None)
    if cache is None and isinstance(method, CachedLoki):
        cache = make_cache(model, B, max_cache_len or T + max_new_tokens)
    kw: dict[str, Any] = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              num_beams=1, pad_token_id=gen_kwargs.pop("pad_token_id", 0))
    kw.update(gen_kwargs)
    if cache is not None:
        kw[cache_kwarg(model)] = cache
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, T:]


def dense_static_cache(model, batch_size: int, max_cache_len: int):
    """transformers' StaticCache for ``model``, allocated now (the dense baseline's cache)."""
    from transformers import StaticCache

    from loki.modeling import fingerprint

    info = fingerprint(model)
    p = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.early_initialization(batch_size, info["num_kv_heads"], info["head_dim"], p.dtype, p.device)
    return cache


def cache_nbytes(cache) -> int:
    """Bytes a cache holds (LokiCache: keys, values, lengths and bases; StaticCache/DynamicCache: keys, values)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def fill_static_random(cache, n_tokens: int, seed: int = 0) -> None:
    """Benchmarks: pretend a prefill of ``n_tokens`` random keys/values in a StaticCache."""
    g = torch.Generator(device=cache.layers[0].keys.device)
    g.manual_seed(seed)
    for layer in cache.layers:
        layer.keys[:, :, :n_tokens].normal_(generator=g)
        layer.values[:, :, :n_tokens].normal_(generator=g)
        layer.cumulative_length.fill_(n_tokens)


class GraphDecoder:
    """Greedy decoding where one decode step (model forward + argmax) is a captured CUDA graph.

    The cache (LokiCache or StaticCache) is updated in place by the graph; ids and positions live in
    static buffers. ``step()`` replays once and returns the (static) logits buffer.
    """

    def __init__(self, model, cache, next_ids: torch.Tensor, positions: torch.Tensor, warmup: int = 2):
        self.model, self.cache = model, cache
        self.ids = next_ids.view(-1, 1).clone()
        self.pos = positions.view(-1, 1).clone().long()
        self.kw = {cache_kwarg(model): cache, "use_cache": True}
        self.graph = None
        self.replays = 0
        self.warmup = warmup
        self.capacity = cache.get_max_length() - int(cache.get_seq_length()) - warmup - 1

    def _forward(self):
        out = self.model(input_ids=self.ids, position_ids=self.pos, **self.kw)
        logits = out.logits[:, -1]
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def capture(self):
        if self.capacity < 1:
            raise fail("GraphDecoder: the cache has no room left for decode steps.", "use a larger max_cache_len.")
        with torch.no_grad():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(self.warmup):  # compiles kernels, sets up cuBLAS (advances the cache too)
                    self._forward()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
        self._host_advance = -1  # the capture ran update() once on the host without running the kernels
        return self

    def step(self):
        if self.replays >= self.capacity:
            raise fail(f"GraphDecoder: the cache is full after {self.replays} graph steps.",
                       "use a larger max_cache_len.")
        self.graph.replay()
        self.replays += 1
        return self.logits

    def close(self):
        """Bring host-side counters in line with the replays, free the graph."""
        from loki.cache import LokiCache

        if isinstance(self.cache, LokiCache):
            self.cache.advance_host(self.replays + self._host_advance)
        self.graph = None
