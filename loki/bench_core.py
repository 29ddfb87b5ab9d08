"""Decode latency of Loki in real generation, and the GPU acceptance check -- runnable without Hydra.

    python -m loki.bench_core --config conf/bench/h200.yaml --json docs/bench/decode_h200.json
    python -m loki.bench_core --accept --json docs/bench/accept_h200.json      # kernels vs torch reference

``loki.bench`` (the Hydra stage) calls :func:`run_bench` with the same config group (``conf/bench/``).

What is timed, per (method, batch, context):

* ``prefill_s``: one forward over the prompt (B x context random tokens) that fills the cache
  (skipped, null, when B * context > ``prefill_max_tokens``).
* ``ms_per_token``: one decode step (all layers + LM head + argmax) for the whole batch, median over
  ``new_tokens`` steps; on CUDA each step is a replayed CUDA graph. ``tokens_per_s`` = batch / step time.
* ``attention_ms``: the decode attention of all layers alone (same caches, same graphs), and
  ``attention_share`` = attention_ms / ms_per_token.
* ``cache_bytes``: what the cache holds (Loki: both key slabs, values, lengths, the bases).

Methods: ``dense`` (transformers' SDPA attention over its StaticCache: the baseline asked for),
``dense_flash`` (the LokiCache with every layer dense: Triton flash-decoding over the same layout,
a stronger dense baseline), ``loki`` (the configured (d, k)), ``loki_rows`` (the same in the LokiCache's "rows"
layout: whole key rows plus a copy of the low-rank slab, d / (2D) more cache memory, ``loki.cache``),
``loki_rows_fp8`` (the same with that copy in e4m3, the method's opt-in ``slab_dtype: fp8``: not the paper's
method, half the scoring pass's bytes; 16-bit models).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from loki.common import MEASURED_AT, fail

METHODS = ("dense", "dense_flash", "loki", "loki_rows", "loki_rows_fp8")


# ------------------------------------------------------------------------------------------- models


def random_llama(shape: dict, dtype: torch.dtype, device, attn: str = "sdpa", seed: int = 0):
    """A Llama with random weights from a LlamaConfig (built directly on ``device``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import loki.attention  # noqa: F401  -- registers "loki"

    torch.manual_seed(seed)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval().requires_grad_(False)
    return model


def compile_glue(model) -> None:
    """torch.compile the non-attention "glue" of a transformers Llama, for every method alike: each RMSNorm, each
    MLP, the final norm, and transformers' RoPE function (replaced in its llama module for the rest of the
    process).  Attention is left alone (dynamo fails on whole decoder layers: docs/bench/README.md)."""
    import transformers.models.llama.modeling_llama as llama

    torch._dynamo.config.cache_size_limit = 512
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    if not hasattr(llama.apply_rotary_pos_emb, "_torchdynamo_orig_callable"):
        llama.apply_rotary_pos_emb = torch.compile(llama.apply_rotary_pos_emb, dynamic=False)
    for layer in model.model.layers:
        for mod in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            mod.compile(dynamic=False)
    model.model.norm.compile(dynamic=False)


class _FusedLinear(torch.nn.Module):
    """One GEMM for several bias-free projections of the same input (see ``fuse_qkv``)."""

    def __init__(self, linears):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        self.splits = [m.weight.shape[0] for m in linears]
        self._x, self._out = None, None

    def outputs(self, x):
        if self._x is not x:  # the first projection of this input runs the GEMM, the others take their slice
            self._x, self._out = x, torch.nn.functional.linear(x, self.weight).split(self.splits, dim=-1)
        return self._out


class _Slice(torch.nn.Module):
    def __init__(self, fused: _FusedLinear, i: int):
        super().__init__()
        self.fused, self.i = [fused], i  # a list: not a submodule, so the fused weight is registered once

    def forward(self, x):
        fused = self.fused[0]
        out = fused.outputs(x)[self.i]
        if self.i == len(fused.splits) - 1:  # the last projection: drop the cached input and outputs (a prefill's
            fused._x = fused._out = None    # activations would otherwise stay alive until the next forward)
        return out


def fuse_qkv(model) -> int:
    """Replace each attention's q/k/v projections by one GEMM over their concatenated weights (as serving engines
    do), for every method alike: the modules stay where transformers calls them (q_proj, k_proj, v_proj, in
    that order, on the same input), the first call runs the GEMM and each returns its slice.  Returns the
    number of attention modules changed (those without biases)."""
    from loki.modeling import attention_modules

    n = 0
    for attn in attention_modules(model):
        lins = [attn.q_proj, attn.k_proj, attn.v_proj]
        if any(getattr(m, "bias", None) is not None or not isinstance(m, torch.nn.Linear) for m in lins):
            continue
        fused = _FusedLinear(lins)
        attn.qkv_fused = fused
        attn.q_proj, attn.k_proj, attn.v_proj = (_Slice(fused, i) for i in range(3))
        n += 1
    return n


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, n: int, device, warm: int = 1) -> float:
    """Median wall time of fn() in ms (CUDA events on the GPU)."""
    for _ in range(warm):
        fn()
    if torch.device(device).type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in evs)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _graph(fn, device):
    """Capture fn() in a CUDA graph (after warm-up on a side stream); returns the graph."""
    from kernels.testing import capture_graph  # noqa: PLC0415  (CUDA only; kernels imports triton)

    return capture_graph(fn)


# ------------------------------------------------------------------------------------------- one point


def _setup_method(model, method: str, loki_opts: dict, basis):
    """Switch the model to the method; returns the CachedLoki (or None for dense)."""
    from loki.generation import attach_cached_loki
    from loki.modeling import fingerprint

    if method == "dense":
        model.set_attn_implementation("sdpa")
        return None
    opts = dict(loki_opts)
    if method == "dense_flash":
        opts["dense_layers"] = fingerprint(model)["num_layers"]
    if method == "loki_rows_fp8":
        opts["slab_dtype"] = "fp8"
    return attach_cached_loki(model, opts, basis=basis)


def _make_cache(model, method: str, B: int, S_max: int):
    from loki.cache import LokiCache
    from loki.generation import dense_static_cache

    if method == "dense":
        return dense_static_cache(model, B, S_max)
    return LokiCache(model, batch_size=B, max_cache_len=S_max, layout="rows" if method.startswith("loki_rows") else "split")


def _attention_fn(model, method: str, cache, lm, B: int, ctx: int, S_max: int, device, dtype):
    """A function running the decode attention of every layer on the current cache (no cache writes)."""
    from loki.cache import kernel_decode, reference_decode
    from loki.modeling import attention_modules, fingerprint

    info = fingerprint(model)
    H, D, L = info["num_heads"], info["head_dim"], info["num_layers"]
    mods = attention_modules(model)
    g = torch.Generator(device=device)
    g.manual_seed(1)
    q = torch.randn(B, H, D, generator=g, device=device).to(dtype)
    if method == "dense":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = (torch.arange(S_max, device=device) < ctx + 1).view(1, 1, 1, S_max).expand(B, 1, 1, S_max)
        q4 = q.unsqueeze(2)

        def fn():
            for i in range(L):
                sdpa_attention_forward(mods[i], q4, cache.layers[i].keys, cache.layers[i].values, mask,
                                       scaling=mods[i].scaling)
        return fn
    step = kernel_decode if cache.use_kernels else reference_decode

    def fn():
        for i in range(L):
            step(lm, cache.layers[i], q, float(mods[i].scaling), i < int(lm.dense_layers))
    return fn


def bench_point(model, method: str, B: int, ctx: int, cfg: dict, loki_opts: dict, basis, device, log=print) -> dict:
    from loki.generation import GraphDecoder, cache_kwarg, cache_nbytes, fill_static_random
    from loki.modeling import fingerprint

    info = fingerprint(model)
    dtype = next(model.parameters()).dtype
    n_new, warm = int(cfg.get("new_tokens", 16)), int(cfg.get("warmup", 2))
    use_graphs = bool(cfg.get("graphs", True)) and torch.device(device).type == "cuda"
    S_max = ctx + n_new + warm + 8
    lm = _setup_method(model, method, loki_opts, basis)
    kw = cache_kwarg(model)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(cfg.get("seed", 0)))
    V = info["vocab_size"]

    # prefill (timed), into its own cache
    prefill_s = None
    if B * ctx <= int(cfg.get("prefill_max_tokens", 1 << 62)):
        ids = torch.randint(0, V, (B, ctx), generator=g).to(device)
        warm_ids = ids[:, : min(ctx, 64)]
        with torch.no_grad():
            wc = _make_cache(model, method, B, warm_ids.shape[1] + 1)  # compile / warm up the prefill path
            model(input_ids=warm_ids, use_cache=True, **{kw: wc})
            del wc
            cache = _make_cache(model, method, B, S_max)
            sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            sync(device)
            prefill_s = time.perf_counter() - t0
        next_ids = out.logits[:, -1].argmax(-1)
        del out
    else:
        cache = _make_cache(model, method, B, S_max)
        next_ids = torch.randint(0, V, (B,), generator=g).to(device)
    if prefill_s is None or cfg.get("fill", "prefill") == "random":
        if method == "dense":
            fill_static_random(cache, ctx, seed=int(cfg.get("seed", 0)))
        else:
            cache.reset()
            cache.fill_random(ctx, seed=int(cfg.get("seed", 0)))
    positions = torch.full((B,), ctx, dtype=torch.long, device=device)
    calls0 = lm.decode_calls if lm is not None else 0

    # decode steps
    if use_graphs:
        dec = GraphDecoder(model, cache, next_ids, positions, warmup=warm).capture()
        step_ms = _median_ms(dec.step, n_new, device, warm=1)
        dec.close()
        del dec
    else:
        state = {"ids": next_ids.view(B, 1), "pos": positions.view(B, 1), kw: cache}

        def eager_step():
            with torch.no_grad():
                o = model(input_ids=state["ids"], position_ids=state["pos"], use_cache=True, **{kw: state[kw]})
            state["ids"] = o.logits[:, -1].argmax(-1, keepdim=True)
            state["pos"] = state["pos"] + 1
            sync(device)
        step_ms = _median_ms(eager_step, n_new, device, warm=warm)
    if lm is not None and lm.decode_calls == calls0:
        raise fail(f"bench: the {method} decode never ran the Loki cache path.", "this is a bug: report it.")

    # attention alone
    attn_ms = None
    if cfg.get("attention_share", True):
        fn = _attention_fn(model, method, cache, lm, B, ctx, S_max, device, dtype)
        with torch.no_grad():
            if use_graphs:
                graph = _graph(fn, device)
                attn_ms = _median_ms(graph.replay, max(5, n_new // 2), device, warm=1)
                del graph
            else:
                attn_ms = _median_ms(fn, max(3, n_new // 4), device, warm=1)
    row = {
        "method": method,
        "d": None if method == "dense" else int(lm.dims),
        "k": None if method == "dense" else float(loki_opts.get("k")),
        "k_mode": None if method == "dense" else loki_opts.get("k_mode", "prefix"),
        "selection": None if method == "dense" else loki_opts.get("selection", "head"),
        # the options a result must share to be credited with this speed (report.speed_table)
        "options": None if lm is None else {k: lm.opts.get(k, v) for k, v in MEASURED_AT.items()},
        "head_dim": info["head_dim"],
        "batch": B,
        "context": ctx,
        "prefill_s": None if prefill_s is None else round(prefill_s, 5),
        "ms_per_token": round(step_ms, 4),
        "tokens_per_s": round(B * 1e3 / step_ms, 2),
        "attention_ms": None if attn_ms is None else round(attn_ms, 4),
        "attention_share": None if attn_ms is None else round(min(attn_ms / step_ms, 1.0), 4),
        "cache_bytes": cache_nbytes(cache),
        "graphs": use_graphs,
        "backend": "sdpa" if method == "dense" else ("kernels" if cache.use_kernels else "reference"),
        "layout": None if method == "dense" else cache.layout,
        "slab_dtype": None if lm is None else lm.slab_dtype,
        "dtype": str(dtype).replace("torch.", ""),
    }
    del cache
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    pre = "-" if row["prefill_s"] is None else f"{row['prefill_s']}s"
    log(f"[bench] {method:11s} B={B:<3d} ctx={ctx:<6d} prefill={pre}  "
        f"{row['ms_per_token']:.3f} ms/step  {row['tokens_per_s']:.1f} tok/s  attn share {row['attention_share']}")
    return row


# ------------------------------------------------------------------------------------------- the grid


def _add_speedups(rows: list[dict]) -> None:
    ref = {(r["batch"], r["context"], r["method"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        dense = ref.get((r["batch"], r["context"], "dense"))
        flash = ref.get((r["batch"], r["context"], "dense_flash"))
        r["speedup"] = None if not dense else round(r["tokens_per_s"] / dense, 3)
        r["speedup_vs_flash"] = None if not flash else round(r["tokens_per_s"] / flash, 3)


def resolve_basis(model, cfg: dict, device, pca_path: str | None = None, log=print, allow_foreign_basis: bool = False):
    """The bench's basis: the PCA file if it exists (and fits the model; ``allow_foreign_basis``: or another model
    of the same shapes), else one fitted on the model's keys."""
    from loki.generation import fit_basis
    from loki.modeling import fingerprint
    from loki.pca import load_basis

    if pca_path and Path(pca_path).exists():
        log(f"[bench] basis: {pca_path}")
        return load_basis(pca_path, fingerprint(model), allow_foreign_basis), str(pca_path)
    n = int(cfg.get("calib_tokens", 512))
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)) + 7)
    ids = torch.randint(0, fingerprint(model)["vocab_size"], (1, n), generator=g).to(device)
    log(f"[bench] basis: fitted on the model's keys over {n} random tokens (no PCA file)")
    return fit_basis(model, ids), f"fit_basis({n} random tokens)"


def check_grid(model, cfg: dict) -> None:
    """Refuse a grid that would crash mid-run or run the model past its positions, before any work: batch and
    context sizes >= 1 (contexts plus the decoded tokens within the model's limit), new_tokens >= 1, warmup >= 0."""
    from loki.modeling import max_positions

    def whole(v, least):
        return not isinstance(v, bool) and isinstance(v, int) and v >= least

    for key in ("batch", "context"):
        vals = cfg.get(key)
        if not isinstance(vals, (list, tuple)) or not vals or not all(whole(v, 1) for v in vals):
            raise fail(f"bench.{key} must be a non-empty list of whole numbers >= 1, got {vals!r}.",
                       f"e.g. bench.{key}=[{'1,16' if key == 'batch' else '256,512'}].")
    for key, least, example in (("new_tokens", 1, 16), ("warmup", 0, 2)):  # (bench_point's defaults)
        v = cfg.get(key, example)
        if not whole(v, least):
            raise fail(f"bench.{key} must be a whole number >= {least}, got {v!r}.", f"e.g. bench.{key}={example}.")
    limit = max_positions(model)
    need = max(cfg["context"]) + int(cfg.get("new_tokens", 16)) + int(cfg.get("warmup", 2))
    if limit and need > limit:
        raise fail(f"bench.context={list(cfg['context'])}: the largest context plus the decoded tokens ({need}) is "
                   f"beyond the model's {limit} positions.", f"use contexts <= {limit - need + max(cfg['context'])}.")


def run_bench(model, cfg: dict, loki_opts: dict, device, pca_path: str | None = None, log=print,
              on_row=None, errors: list | None = None, allow_foreign_basis: bool = False) -> list[dict]:
    """Every (method, batch, context) of ``cfg``; returns the rows (with speedups).

    With ``errors`` (a list), a point that fails on the device (e.g. out of memory) is recorded there and
    skipped instead of ending the run; ``on_row(row)`` is called after each point."""
    methods = list(cfg.get("methods", METHODS))
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise fail(f"bench: unknown method(s) {bad}.", f"use {list(METHODS)}.")
    check_grid(model, cfg)
    basis, basis_src = resolve_basis(model, cfg, device, pca_path, log, allow_foreign_basis)
    glue = bool(cfg.get("compile_glue")) and torch.device(device).type == "cuda"
    if glue:
        compile_glue(model)
    fused = bool(cfg.get("fuse_qkv")) and torch.device(device).type == "cuda"
    if fused:
        log(f"[bench] fuse_qkv: {fuse_qkv(model)} attention modules use one q/k/v GEMM")
    rows = []
    for B in cfg["batch"]:
        for ctx in cfg["context"]:
            for m in methods:
                try:
                    r = bench_point(model, m, int(B), int(ctx), cfg, loki_opts, basis, device, log)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if errors is None:
                        raise
                    errors.append({"method": m, "batch": int(B), "context": int(ctx), "error": repr(e)[:500]})
                    log(f"[bench] {m} B={B} ctx={ctx} FAILED: {e!r}"[:600])
                    gc.collect()
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                r["basis"] = basis_src
                r["compile_glue"] = glue
                r["fuse_qkv"] = fused
                rows.append(r)
                if on_row is not None:
                    on_row(r)
    _add_speedups(rows)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["method", "d", "k", "batch", "context", "prefill_s", "ms_per_token", "tokens_per_s", "attention_share",
            "speedup", "speedup_vs_flash", "cache_bytes"]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c[i].rjust(w[i]) for i in range(len(cols))) for c in cells)


# ------------------------------------------------------------------------------------------- GPU acceptance


def greedy_loop(model, cache, ids, attention_mask, steps: int, forced=None):
    """Manual greedy decoding (prefill + ``steps`` single-token forwards), as generate does it.

    ``forced`` (B, steps): feed these tokens instead of the argmax (teacher forcing). Returns
    (tokens (B, steps), logits (B, steps, V) fp32).
    """
    from loki.generation import cache_kwarg

    kw = {cache_kwarg(model): cache, "use_cache": True}
    am = attention_mask.clone()
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    toks, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, logits_to_keep=1, **kw)
        last = pos[:, -1:]
        for t in range(steps):
            lg = out.logits[:, -1].float()
            logits.append(lg)
            nxt = lg.argmax(-1, keepdim=True)
            toks.append(nxt)
            feed = forced[:, t: t + 1] if forced is not None else nxt
            if t == steps - 1:
                break
            last = last + 1
            am = torch.cat([am, torch.ones_like(am[:, :1])], dim=-1)
            out = model(input_ids=feed, attention_mask=am, position_ids=last, **kw)
    return torch.cat(toks, 1), torch.stack(logits, 1)


def _max_rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative L2 error over the last dim (one per sequence and step) of x against ref."""
    return ((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


# bf16 whole-model tolerances of the GPU acceptance (relative L2 of the logits, worst step): see acceptance()
GPU_REF_TOL = 4e-2
GPU_GRAPH_TOL = 3e-2


def acceptance(device="cuda", steps: int = 32, seed: int = 0, shape: dict | None = None, batch: int = 4,
               prompt: int = 2048, log=print) -> dict:
    """Kernel path vs torch reference path on a random-weight bf16 Llama: greedy tokens and logits.

    The kernel path decodes greedily; the reference path is teacher-forced on the same tokens, so each
    step compares the two paths on identical inputs: argmax equality wherever the reference's top-2
    logits are not tied (margin above 4x the 99.9th percentile of the two paths' logit differences), and
    logits within tolerance (relative L2 error per step; 2e-2 on the CPU's float32 model). A CUDA-graph replay of the
    kernel path, teacher-forced on the eager kernel path's tokens, must agree with it in the same way (same untied
    tokens, logits within GPU_GRAPH_TOL): the bracket path's atomics leave the summation order unspecified, so bitwise
    equality of free-running greedy sequences is not expected.  On the GPU the bf16 model's own noise sets the
    tolerances (GPU_REF_TOL, GPU_GRAPH_TOL), measured on the H200 over 11 seeds (session 20,
    kernels/bench_results/h200_accept_seeds_s20.jsonl): kernel vs reference 1.4-3.2% (the group variant the largest),
    graph replay vs eager 0.9-2.1%, with every untied token equal in every run (the fp8-slab variant, GPU only, over 8
    more seeds: 2.1-2.4% and 1.4-1.8%).  The earlier 2e-2 floor (session 13: 1.6-2.0% at seed 0) failed by chance in 5
    of the 11 seeds.  A wrong selection or attention shows as untied tokens that differ; the kernels' own
    float64-reference tests (tests/kernels) hold the numerics tight.
    """
    from loki.cache import LokiCache
    from loki.generation import GraphDecoder, attach_cached_loki, fit_basis

    shape = shape or dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=2048, max_position_embeddings=8192)
    on_gpu = torch.device(device).type == "cuda"
    model = random_llama(shape, torch.bfloat16 if on_gpu else torch.float32, device, seed=seed)
    g = torch.Generator().manual_seed(seed)
    B, T = batch, prompt
    ids = torch.randint(0, shape["vocab_size"], (B, T), generator=g).to(device)
    am = torch.ones(B, T, dtype=torch.long, device=device)
    for b in range(B):
        am[b, : int(T * b / (2 * B))] = 0  # left padding: ragged prompts (T, 7/8 T, 3/4 T, 5/8 T for B=4)
    basis = fit_basis(model, torch.randint(0, shape["vocab_size"], (1, min(T, 1024)), generator=g).to(device))
    # at B=4 with 8 KV / 32 query heads: group mode takes the split kernels, head mode the fused select,
    # forced (sink / local) tokens the split path with +inf scores
    variants = {
        "group_dD/4_k1/8": dict(d=0.25, k=0.125, selection="group", group_reduce="max"),
        "head_dD/4_k1/8": dict(d=0.25, k=0.125, selection="head"),
        "group_dD/4_k1/8_sink4_local16_dense1": dict(d=0.25, k=0.125, selection="group", sink_tokens=4,
                                                     local_window=16, dense_layers=1),
    }
    if on_gpu:  # session 20: the opt-in e4m3 scoring slab (a 16-bit cache, layout "rows"), both paths scoring on it
        variants["group_dD/4_k1/8_fp8_rows"] = dict(d=0.25, k=0.125, selection="group", group_reduce="max",
                                                    slab_dtype="fp8")
    report = {"device": torch.cuda.get_device_name() if on_gpu else str(device),
              "model": shape, "batch": B, "prompt_lengths": am.sum(-1).tolist(), "steps": steps, "variants": {}}
    for name, opts in variants.items():
        res = {}
        m = attach_cached_loki(model, dict(opts, backend="kernels"), basis=basis)
        cache = LokiCache(model, batch_size=B, max_cache_len=T + steps + 8)  # (fp8 slab: the rows layout)
        tok_k, log_k = greedy_loop(model, cache, ids, am, steps)
        assert m.kernel_calls > 0
        log_g = None
        if on_gpu:  # graphs: prefill again, capture the step, replay teacher-forced on the eager tokens
            cache.reset()
            tok0, _ = greedy_loop(model, cache, ids, am, 1)
            res["graph_prefill_token_equal"] = bool((tok0[:, 0] == tok_k[:, 0]).all())
            dec = GraphDecoder(model, cache, tok_k[:, 0], am.sum(-1), warmup=1).capture()
            # the warm-up step consumed token 0; replay r consumes token r + 1 and gives the logits of step r + 2
            log_g = []
            for r in range(steps - 2):
                dec.ids.copy_(tok_k[:, r + 1: r + 2])
                log_g.append(dec.step().float().clone())
            dec.close()
            log_g = torch.stack(log_g, 1)
            del dec
        # reference path, teacher-forced on the kernel path's tokens
        mr = attach_cached_loki(model, dict(opts, backend="reference"), basis=basis)
        cache_r = LokiCache(model, batch_size=B, max_cache_len=T + steps + 8)
        tok_r, log_r = greedy_loop(model, cache_r, ids, am, steps, forced=tok_k)
        assert mr.kernel_calls == 0 and mr.decode_calls > 0
        diff = (log_k - log_r).abs()
        rel = _max_rel_l2(log_k, log_r)
        top2 = log_r.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
        # tied: the reference's top-2 logits closer than 4x the paths' logit noise (99.9th percentile of
        # |kernel - reference| over all logits of all steps), so one rounding could reorder them
        noise = torch.quantile(diff.flatten()[:: max(1, diff.numel() // 1_000_000)].float(), 0.999).item()
        tie = 4 * noise
        untied = margin > tie
        agree = tok_k == tok_r
        first_bad = (~agree & untied).nonzero().tolist()[:3]
        graph_ok = None
        if log_g is not None:
            # the bracket path's atomics leave the selected indices' order (the attention's summation order)
            # unspecified, so replays and eager calls may differ in the last bits: the graph must give the eager
            # path's tokens wherever they are not tied, and its logits within the same tolerance
            agree_g, untied_g = log_g.argmax(-1) == tok_k[:, 2:], untied[:, 2:]
            res["graph_untied_agree"] = f"{int((agree_g & untied_g).sum())}/{int(untied_g.sum())}"
            res["graph_logit_rel_err"] = _max_rel_l2(log_g, log_k[:, 2:])
            graph_ok = (res["graph_prefill_token_equal"] and bool((agree_g | ~untied_g).all())
                        and res["graph_logit_rel_err"] < GPU_GRAPH_TOL)
        tol = GPU_REF_TOL if on_gpu else 2e-2
        res.update({
            "tokens_equal_all": bool(agree.all()),
            "untied_steps": int(untied.sum()), "untied_agree": int((agree & untied).sum()),
            "tied_steps": int((~untied).sum()), "tied_disagree": int((~agree & ~untied).sum()),
            "first_untied_disagreements": first_bad,
            "max_logit_rel_err": rel, "max_logit_abs_diff": diff.max().item(), "tie_threshold": tie,
            "median_top2_margin": margin.median().item(),
            "graph_matches_eager": graph_ok,
            "logit_tol": tol,
            "passed": bool((agree | ~untied).all()) and rel < tol and graph_ok is not False,
        })
        log(f"[accept] {name}: {res}")
        report["variants"][name] = res
        del cache, cache_r
        if on_gpu:
            torch.cuda.empty_cache()
    report["passed"] = all(v["passed"] for v in report["variants"].values())
    return report


# ------------------------------------------------------------------------------------------- CLI


def load_bench_config(path: str) -> dict:
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict) or "batch" not in cfg or "context" not in cfg:
        raise fail(f"{path} is not a bench config (needs batch, context, ...).", "see conf/bench/h200.yaml.")
    return cfg


def loki_options(cfg: dict) -> dict:
    """The Loki options of a bench: conf/method/loki.yaml overridden by the bench's ``loki:`` block."""
    import yaml

    from loki.common import CONF_DIR

    base = yaml.safe_load((CONF_DIR / "method" / "loki.yaml").read_text())
    base.pop("name", None)
    base.update(dict(cfg.get("loki") or {}))
    return base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="conf/bench/h200.yaml")
    ap.add_argument("--json", default=None, help="write the rows (or the acceptance report) here")
    ap.add_argument("--accept", action="store_true", help="GPU acceptance: kernels vs torch reference")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model-path", default=None, help="a local model folder instead of the config's model")
    ap.add_argument("--batch", default=None, help="comma list overriding the config")
    ap.add_argument("--context", default=None, help="comma list overriding the config")
    ap.add_argument("--methods", default=None, help="comma list overriding the config")
    ap.add_argument("--compile-glue", action="store_true",
                    help="torch.compile norms, MLPs and RoPE for every method (CUDA; the config's compile_glue)")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="one GEMM for each attention's q/k/v projections, every method alike (CUDA; fuse_qkv)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.accept:
        out = acceptance(device, log=log)
        result = out
        print(json.dumps(out, indent=2))
    else:
        cfg = load_bench_config(args.config)
        for key in ("batch", "context", "methods"):
            v = getattr(args, key)
            if v:
                cfg[key] = [int(x) if x.isdigit() else x for x in v.split(",")]
        if args.compile_glue:
            cfg["compile_glue"] = True
        if args.fuse_qkv:
            cfg["fuse_qkv"] = True
        dtype = getattr(torch, cfg.get("dtype", "bfloat16"))
        if args.model_path:
            from transformers import AutoModelForCausalLM

            import loki.attention  # noqa: F401

            model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(device).eval()
        else:
            model = random_llama(dict(cfg["random_llama"]), dtype, device, seed=int(cfg.get("seed", 0)))
        t0 = time.time()
        errors: list = []
        rows = run_bench(model, cfg, loki_options(cfg), device, log=log, errors=errors,
                         on_row=lambda r: print("[row] " + json.dumps(r), flush=True))
        print(table(rows))
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "seconds": round(time.time() - t0, 1), "config": cfg, "errors": errors,
                "command": "python -m loki.bench_core " + " ".join(argv if argv is not None else sys.argv[1:])}
        import transformers

        meta["transformers"] = transformers.__version__
        for r in rows:
            r["model"] = "random_llama" if not args.model_path else Path(args.model_path).name
            r["device"] = meta["device"]
        result = rows  # the format loki.bench writes (results/<exp>/bench/decode.json); meta beside it
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if (not args.accept or result.get("passed")) else 1


if __name__ == "__main__":
    sys.exit(main())
