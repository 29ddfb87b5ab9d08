"""Benchmark of the Loki decode kernels against dense SDPA and a naive torch Loki pipeline.

    python -m kernels.bench                  # full grid (batch {1,16} x context {4K,16K,64K} (+128K at batch 1)
                                             #            x (d, k) in {(D/4,1/4), (D/4,1/8), (D/8,1/16)})
    python -m kernels.bench --quick          # batch 16, contexts 16K and 64K only
    python -m kernels.bench --tune           # sweep kernel configs first (on batch 16, 16K), use the best
    python -m kernels.bench --json out.json  # also write every number as JSON; --wandb logs to W&B if installed
    python -m kernels.bench --attn-probe     # the sparse attention alone: selected vs sorted vs contiguous indices,
                                             #   and launch-config variants (kernels/NOTES.md, v5 probe)
    python -m kernels.bench --layout rows    # the Loki cache in a row layout (`kv_cache.allocate_cache_rows`)
    python -m kernels.bench --layout-probe   # the sparse attention alone in the split / rows / padded layouts (v15)
    python -m kernels.profile --timeline     # each kernel's start / end within one step (CUPTI; keeps PDL overlap)

Llama-3-8B attention shapes: 32 query heads, 8 KV heads, head dim 128, bf16.  Every time is the median of
`triton.testing.do_bench` over replays of a CUDA graph holding several calls (launch gaps as in a captured
decode step); where one cache is smaller than ~3x L2 the calls rotate over several caches.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton

from . import attention as attn_mod
from . import bracket as bracket_mod
from . import scores as scores_mod
from . import topk as topk_mod
from .attention import dense_decode_attention, sparse_decode_attention
from .bracket import loki_select_bracket
from .loki import loki_decode
from .reference import dense_sdpa, naive_loki_torch
from .scores import loki_scores, rotate_q
from .testing import capture_graph, random_orthonormal, rows_copy
from .topk import loki_select, topk_select

H, KVH, D = 32, 8, 128
DTYPE = torch.bfloat16
DEV = "cuda"
SMOKE = False  # --smoke: CPU interpreter run of every code path on tiny shapes (no timing meaning)
TARGETS = {(4, 4): 2.0, (4, 8): 3.0, (8, 16): 5.0}  # (D/d, 1/k) -> speedup over SDPA at batch 16, 16K & 64K
# the Loki cache layout (session 13): "split" (k_lr | k_rest slabs and v: `allocate_cache`, no memory overhead),
# "rows" (whole K rows + a slab copy) or "kv" (one K' | V row per token + a slab copy; `allocate_cache_rows`,
# d / (2 D) more memory).  The SDPA and naive baselines read contiguous K and V (and the slab) in every layout
LAYOUT = "split"
LAYOUTS = ("split", "rows", "kv")
# session 19 (--slab-dtype fp8, row layouts only): the scoring pass reads an fp8 (e4m3) copy of k_lr.  That changes
# what Loki scores (the selection is that of the fp8-rounded keys), so such rows carry no acceptance target
SLAB_DTYPE = None


def bench_graph(fn, n_calls_target_ms=8.0, rep=100):
    """Median ms per call of fn, timed as replays of a CUDA graph that holds many calls."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n_inner = int(min(200, max(1, n_calls_target_ms / est)))
    g = capture_graph(fn, n_inner)
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=rep, return_mode="median")
    del g
    return ms / n_inner


def copy_bandwidth():
    if SMOKE:
        return 1.0
    x = torch.randn(2 ** 30 // 2, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e9  # GB/s, bytes read + written


class Case:
    """One cache (or a few, rotated) of a given batch / context, with q, P, in the layout LAYOUT (or `layout`).
    copies: (k_lr, k_rest, v) per cache; `slab(k_lr)`: its row layout's slab copy (None in "split"), `sc(k_lr)`:
    what the scoring pass reads."""

    def __init__(self, B, S, d, n_copies, layout=None):
        self.B, self.S, self.d = B, S, d
        self.layout = layout = LAYOUT if layout is None else layout
        if layout not in LAYOUTS:
            raise SystemExit(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
        self.copies, self._slabs = [], {}
        for _ in range(n_copies):
            k_lr = torch.randn(B, KVH, S, d, device=DEV, dtype=DTYPE)
            k_rest = torch.randn(B, KVH, S, D - d, device=DEV, dtype=DTYPE)
            v = torch.randn(B, KVH, S, D, device=DEV, dtype=DTYPE)
            slab = None
            if layout != "split":  # the same values in whole rows, the slab a copy
                k_lr, k_rest, v, _, slab = rows_copy(k_lr, k_rest, v, kv=layout == "kv")
                if SLAB_DTYPE is not None:
                    slab = slab.to(SLAB_DTYPE)
            self.copies.append((k_lr, k_rest, v))
            self._slabs[id(k_lr)] = slab
        self.lengths = torch.full((B,), S, dtype=torch.int32, device=DEV)
        self.q = torch.randn(B, H, D, device=DEV, dtype=DTYPE)
        self.P = random_orthonormal(KVH, D, DEV)
        self.q_rot = rotate_q(self.q, self.P)

    def slab(self, k_lr):
        """The slab copy of cache copy k_lr (row layouts), else None."""
        return self._slabs[id(k_lr)]

    def sc(self, k_lr):
        """What the scoring pass reads for cache copy k_lr."""
        s = self._slabs[id(k_lr)]
        return k_lr if s is None else s

    def sc16(self, k_lr):
        """`sc` in the cache dtype (the torch baselines' einsum cannot read an fp8 slab: they read k_lr then)."""
        s = self.sc(k_lr)
        return s if s.dtype == k_lr.dtype else k_lr


def rot(case, f):
    """Callable running f(k_lr, k_rest, v) over every cache copy; returns (fn, n_copies)."""
    cps = case.copies

    def fn():
        for c in cps:
            f(*c)
    return fn, len(cps)


def timed(case, f, rep=100):
    fn, n = rot(case, f)
    return bench_graph(fn, rep=rep) / n


def n_copies_for(B, S, d):
    l2x3 = 180e6
    bytes_one = B * KVH * S * 2 * D * 2
    return max(1, min(16, math.ceil(l2x3 / bytes_one)))


def run_case(B, S, dfrac, kfrac, rep, stage_times=True):
    d = D // dfrac
    k = S // kfrac
    case = Case(B, S, d, n_copies_for(B, S, d))
    L = case.lengths
    res = dict(batch=B, context=S, d=d, k=k, d_frac=f"D/{dfrac}", k_frac=f"1/{kfrac}")
    q, P, q_rot = case.q, case.P, case.q_rot
    # correctness spot check of the fused path against the split path and the naive pipeline
    k_lr, k_rest, v = case.copies[0]
    sl, sc, sc16 = case.slab, case.sc, case.sc16  # (row layouts: the scoring pass reads the slab copy)
    o_b = loki_decode(q, P, k_lr, k_rest, v, L, k, path="bracket", strict=False, slab=sl(k_lr))
    o_f = loki_decode(q, P, k_lr, k_rest, v, L, k, path="fused", strict=False, slab=sl(k_lr))
    o_s = loki_decode(q, P, k_lr, k_rest, v, L, k, path="split", strict=False, slab=sl(k_lr))
    o_n = naive_loki_torch(q, P, sc16(k_lr), k_rest, v, k)
    res["check_bracket_vs_split"] = ((o_b.float() - o_s.float()).norm() / o_s.float().norm()).item()
    res["check_fused_vs_split"] = ((o_f.float() - o_s.float()).norm() / o_s.float().norm()).item()
    res["check_fused_vs_naive"] = ((o_f.float() - o_n.float()).norm() / o_n.float().norm()).item()
    if stage_times:
        scores = loki_scores(q_rot, sc(k_lr), L, d=d, strict=False)
        res["rotate_ms"] = bench_graph(lambda: rotate_q(q, P), rep=rep)
        res["scores_ms"] = timed(case, lambda a, b_, c: loki_scores(q_rot, sc(a), L, d=d, strict=False), rep)
        res["topk_triton_ms"] = bench_graph(lambda: topk_select(scores, L, k, strict=False), rep=rep)
        res["topk_torch_ms"] = bench_graph(lambda: torch.topk(scores, k, dim=-1, sorted=False), rep=rep)
        res["select_fused_ms"] = timed(case, lambda a, b_, c: loki_select(q, sc(a), L, k, P=P, strict=False), rep)
        res["select_bracket_ms"] = timed(case, lambda a, b_, c: loki_select_bracket(q, sc(a), L, k, P=P, strict=False),
                                         rep)
        res["select_bracket_fused_ms"] = timed(  # v4: classification inside the scoring kernel
            case, lambda a, b_, c: loki_select_bracket(q, sc(a), L, k, P=P, strict=False, classify="fused"), rep)
        res["select_bracket_v6_ms"] = timed(  # v6: the bracket kernel before the scoring kernel (no overlap)
            case, lambda a, b_, c: loki_select_bracket(q, sc(a), L, k, P=P, strict=False, overlap=False), rep)
        # per-kernel split of the bracket path: rotate q, + scores & brackets, + classify (+ band select = bsel)
        for st in (1, 2, 3):
            res[f"bracket_stage{st}_ms"] = timed(
                case, lambda a, b_, c, st=st: loki_select_bracket(q, sc(a), L, k, P=P, strict=False, stages=st),
                rep)
        idx = topk_select(scores, L, k, strict=False)
        res["attention_ms"] = timed(
            case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, idx, strict=False), rep)
    for path in ("bracket", "fused", "split", "torch_topk"):
        res[f"total_{path}_ms"] = timed(case, lambda a, b_, c, path=path: loki_decode(
            q, P, a, b_, c, L, k, path=path, strict=False, slab=sl(a)), rep)
    res["naive_torch_ms"] = timed(case, lambda a, b_, c: naive_loki_torch(q, P, sc16(a), b_, c, k), rep)
    best = min(("bracket", res["total_bracket_ms"]), ("fused", res["total_fused_ms"]),
               ("split", res["total_split_ms"]), key=lambda x: x[1])
    res["total_ms"], res["best_path"] = best[1], best[0]
    del case
    if not SMOKE:
        torch.cuda.empty_cache()
    return res


def run_dense(B, S, rep):
    case = Case(B, S, 32, n_copies_for(B, S, 32))
    L = case.lengths
    kfull = [torch.cat([a, b], dim=-1) for a, b, _ in case.copies]  # (SDPA: contiguous K and V in every layout)
    vs = [c[2].contiguous() for c in case.copies]
    q = case.q
    q_rot_b = case.q_rot.to(DTYPE)

    def sdpa():
        for kk, vv in zip(kfull, vs):
            dense_sdpa(q_rot_b, kk, vv)
    n = len(kfull)
    res = dict(batch=B, context=S)
    res["sdpa_ms"] = bench_graph(sdpa, rep=rep) / n
    res["dense_triton_ms"] = timed(
        case, lambda a, b_, c: dense_decode_attention(case.q_rot, a, b_, c, L, strict=False), rep)
    o1 = dense_decode_attention(case.q_rot, *case.copies[0], L).float()
    o2 = dense_sdpa(q_rot_b, kfull[0], vs[0]).float()
    res["check_dense_vs_sdpa"] = ((o1 - o2).norm() / o2.norm()).item()
    res["dense_bytes"] = B * KVH * S * 2 * D * 2
    del case, kfull, vs
    if not SMOKE:
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------------------
def tune(rep, log, light=False, context=16384):
    """Sweep configs of each kernel on batch 16 at `context` (16K); set the module defaults to the best.

    Attention / selection configs are scored by the geometric mean of their times over the three (d, k) cases
    at 16K; the scores kernel is tuned separately for d = 32 and d = 16."""
    B, S = (16, context) if not SMOKE else (2, 256)
    cases = []
    for dfrac, kfrac in ((4, 4), (4, 8), (8, 16)):
        d, k = D // dfrac, S // kfrac
        case = Case(B, S, d, 1, layout="split")
        k_lr, k_rest, v = case.copies[0]
        scores = loki_scores(case.q_rot, k_lr, case.lengths, d=d, strict=False)
        idx = topk_select(scores, case.lengths, k, strict=False)
        cases.append(dict(case=case, d=d, k=k, scores=scores, idx=idx))
    out = {}

    def sweep(name, cands, mk, case_list):
        rows = []
        if SMOKE:
            cands = cands[:2]
        for c in cands:
            try:
                ts = [bench_graph(mk(c, cs), rep=rep) for cs in case_list]
            except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
                log(f"  {name} {c}: failed {type(e).__name__}: {str(e)[:160]}")
                continue
            gm = math.exp(sum(math.log(t) for t in ts) / len(ts))
            rows.append((gm, c, ts))
            log(f"  {name} {c}: " + " ".join(f"{t * 1e3:.1f}" for t in ts) + f" us (geo-mean {gm * 1e3:.1f})")
        rows.sort(key=lambda x: x[0])
        out[name] = [dict(geo_ms=g, config=c, ms=ts) for g, c, ts in rows]
        return rows[0][1] if rows else None

    def sweep_per_d(prefix, cands, mk, table):
        """Sweep on the d = D/4 and d = D/8 cases alone; each best config goes to table[32] / table[16] and [0]."""
        for cs in (cases[1], cases[2]):
            best = sweep(f"{prefix}_d{cs['d']}", cands, mk, [cs])
            if best:
                table[cs["d"] if cs["d"] < 32 else 32] = best
                if cs["d"] < 32:
                    table[0] = best

    def bsel(c, cs):
        cc = cs["case"]
        cfg = {k_: c[k_] for k_ in ("block_n", "tiles", "num_warps", "classify_block", "classify_warps",
                                    "finish_warps", "bracket_sub") if k_ in c}
        return lambda: loki_select_bracket(cc.q, cc.copies[0][0], cc.lengths, cs["k"], P=cc.P, strict=False,
                                           config=cfg or None, sample=c.get("sample"))
    if light == "bracket":  # the bracket path only: sample size, then scoring tiles per d
        best = sweep("bracket_sample", [dict(sample=sm) for sm in (512, 1024, 2048, 4096)], bsel, cases)
        if best:  # the best sample at this context, for the sweeps below and the run (DIV rule off)
            bracket_mod.BRACKET_SAMPLE, bracket_mod.BRACKET_SAMPLE_DIV = best["sample"], 0
        best = sweep("bracket_classify", [dict(classify_block=cb, classify_warps=cw, finish_warps=fw)
                                          for cb, cw in ((1024, 4), (2048, 4), (4096, 8)) for fw in (8, 16)],
                     bsel, cases)
        if best:
            bracket_mod.BRACKET_CLASSIFY_BLOCK = best["classify_block"]
            bracket_mod.BRACKET_CLASSIFY_WARPS = best["classify_warps"]
            bracket_mod.BRACKET_WARPS = best["finish_warps"]
        sweep_per_d("bracket_scores", [dict(block_n=bn, tiles=t, num_warps=nw)
                                       for bn, nw in ((64, 4), (128, 4), (256, 4), (256, 8)) for t in (1, 2, 4, 8)],
                    bsel, bracket_mod.BRACKET_SCORE_CONFIG)
        del cases
        return out
    def attn(c, cs):
        cc = cs["case"]
        k_lr, k_rest, v = cc.copies[0]
        return lambda: sparse_decode_attention(cc.q_rot, k_lr, k_rest, v, cs["idx"], config=c, strict=False)
    if light == "attention":  # the sparse attention kernel only
        best = sweep("sparse_attention", [dict(block_n=bn, num_warps=4, num_stages=ns, waves=wv)
                                          for bn in (32, 64, 128) for ns in (2, 3, 4) for wv in (1, 2, 3)],
                     attn, cases)
        if best:
            attn_mod.SPARSE_CONFIG.update(best)
        del cases
        return out
    if light:  # only the selection's sample size (incl. "direct": no bracket, full-row radix select)
        def fsel_l(c, cs):
            cc = cs["case"]
            return lambda: loki_select(cc.q, cc.copies[0][0], cc.lengths, cs["k"], P=cc.P, strict=False, **c)
        best = sweep("fused_select_sample", [dict(sample=sm) for sm in (1024, 2048, 0)], fsel_l, cases)
        if best:
            topk_mod.SELECT_SAMPLE = best["sample"]

        def tsel_l(c, cs):
            return lambda: topk_select(cs["scores"], cs["case"].lengths, cs["k"], strict=False, **c)
        sweep("topk_select_sample", [dict(sample=sm) for sm in (1024, 2048, 0)], tsel_l, cases)
        del cases
        return out

    best = sweep("sparse_attention", [dict(block_n=bn, num_warps=4, num_stages=ns, waves=wv)
                                      for bn in (32, 64) for ns in (3, 4) for wv in (0, 2, 4)], attn, cases)
    if best:
        attn_mod.SPARSE_CONFIG.update(best)

    def fsel(c, cs):
        cc = cs["case"]
        return lambda: loki_select(cc.q, cc.copies[0][0], cc.lengths, cs["k"], P=cc.P, strict=False, **c)
    best = sweep("fused_select", [dict(block_n=bn, num_warps=nw, sample=sm) for bn, nw in ((256, 8), (512, 8), (512, 4))
                                  for sm in (1024, 2048, 4096)], fsel, cases)
    if best:
        topk_mod.FUSED_BLOCK_N, topk_mod.FUSED_WARPS = best["block_n"], best["num_warps"]
        topk_mod.SELECT_SAMPLE = best["sample"]

    def tsel(c, cs):
        return lambda: topk_select(cs["scores"], cs["case"].lengths, cs["k"], strict=False, **c)
    best = sweep("topk_select", [dict(block_s=bs, num_warps=nw, sample=sm) for bs in (2048, 4096) for nw in (4, 8)
                                 for sm in (1024, 2048, 4096)], tsel, cases)
    if best:
        topk_mod.SELECT_BLOCK_S, topk_mod.SELECT_WARPS = best["block_s"], best["num_warps"]
        out["topk_select_sample_best"] = best["sample"]

    def sc(c, cs_):
        cc = cs_["case"]
        return lambda: loki_scores(cc.q_rot, cc.copies[0][0], cc.lengths, d=cs_["d"], config=c, strict=False)
    sweep_per_d("scores", [dict(block_n=bn, tiles=t, num_warps=4) for bn in (128, 256, 512) for t in (2, 4, 8)], sc,
                scores_mod.SCORES_CONFIG)
    del cases
    return out


def fmt_table(rows, dense, copy_bw):
    lines = []
    hdr = (f"{'B':>3} {'ctx':>6} {'d':>3} {'k':>6} | {'rot':>6} {'score':>6} {'topk':>6} {'tk_trch':>7} "
           f"{'fsel':>6} {'bsel':>6} {'bsel6':>6} {'bsel4':>6} {'attn':>6} | {'brkt':>6} {'fused':>6} {'split':>6} {'naive':>6} {'sdpa':>6} | "
           f"{'x_sdpa':>6} "
           f"{'x_naive':>7} {'ideal':>5} {'GB/s':>6} {'target':>6}")
    lines.append("times in us (median of do_bench over CUDA-graph replays); x_* = speedup of the best Loki total "
                 "(min of bracket, fused, split) over SDPA / the naive torch pipeline")
    lines.append("rot: rotate_q alone (not on the pipeline's path); score: Loki scores on the rotated q (split "
                 "path); topk: Triton selection on those scores; tk_trch: torch.topk(sorted=False) on the same; fsel: "
                 "fused rotate+score+select kernel; bsel: bracket path (rotate q, scores with the brackets alongside, classify, band select: 4 kernels); bsel6: the bracket kernel (rotate + bracket) before the scoring kernel (v6); bsel4: the classification inside the scoring kernel (v4, 3 kernels); attn: sparse flash-decoding incl. split combine; ideal: dense bytes / "
                 "Loki bytes; GB/s: Loki bytes / best total")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in rows:
        dn = dense[(r["batch"], r["context"])]
        def us(key):
            return f"{r[key] * 1e3:6.1f}" if key in r else f"{'-':>6}"
        tgt = r.get("target")
        lines.append(
            f"{r['batch']:>3} {r['context']:>6} {r['d']:>3} {r['k']:>6} | {us('rotate_ms')} {us('scores_ms')} "
            f"{us('topk_triton_ms')} {us('topk_torch_ms'):>7} {us('select_fused_ms')} {us('select_bracket_ms')} "
            f"{us('select_bracket_v6_ms')} {us('select_bracket_fused_ms')} {us('attention_ms')} | {us('total_bracket_ms')} {us('total_fused_ms')} {us('total_split_ms')} {us('naive_torch_ms')} {dn['sdpa_ms'] * 1e3:6.1f} | "
            f"{r['speedup_vs_sdpa']:6.2f} {r['speedup_vs_naive']:7.2f} {r['ideal_ratio']:5.2f} "
            f"{r['achieved_GBps']:6.0f} {('%.1fx' % tgt + (' ok' if r['target_met'] else ' NO')) if tgt else '':>6}")
    lines.append("")
    lines.append(f"copy bandwidth (read+write): {copy_bw:.0f} GB/s")
    lines.append(f"{'B':>3} {'ctx':>6} | {'sdpa us':>8} {'%copy':>6} | {'triton us':>9} {'%copy':>6}")
    for (B, S), dn in sorted(dense.items()):
        lines.append(f"{B:>3} {S:>6} | {dn['sdpa_ms'] * 1e3:8.1f} {dn['sdpa_pct_copy']:6.1f} | "
                     f"{dn['dense_triton_ms'] * 1e3:9.1f} {dn['dense_triton_pct_copy']:6.1f}")
    return "\n".join(lines)


def write_json(path, result):
    """Write the results as JSON (nothing when path is None)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


# session 10: with one 16-bit dot each (hilo=False) the loop with its indices one tile ahead keeps `num_stages - 1`
# tiles in flight (`kernels.ir`: async_wait num=3 at 3 stages) at 96 registers and 43 KB of shared memory for 32-row
# tiles: 5 programs per SM.  Register caps (maxnreg) and waves sized so that the grid is one wave at batch 16
PROBE_CONFIGS = [dict(hilo=False), dict(hilo=False, maxnreg=128, waves=3),
                 dict(hilo=False, block_n=32, num_stages=3, waves=4),
                 dict(hilo=False, block_n=32, num_stages=3, waves=4, maxnreg=96),
                 dict(hilo=False, block_n=32, num_stages=4, waves=2, maxnreg=96),
                 dict(hilo=False, block_n=32, num_stages=2, waves=4, maxnreg=96),
                 dict(hilo=False, block_n=64, num_stages=3, waves=1, maxnreg=96),
                 dict(hilo=False, block_n=64, num_stages=3, waves=1)]
# (sessions 3-7, the old loop: block_n 32 / 128, num_stages 2 / 4, num_warps 8, waves 1 / 4, block_n 32 with 5
# stages: all slower than block_n 64 / 3 stages (NOTES v5).  Session 8 (bench_results/h200_attn_probe_s8{a,b}):
# the indices one tile ahead at 3-4 stages, 8 warps, waves 1 / 3 / 4, block_n 32 / 128, and a loop pipelined by
# hand in registers: slower than the indices ahead at 2 stages, the default since; session 9's list:
# ahead=False at 3 stages, hilo=False at 2 / 3 stages and block_n 128, hilo=False with ahead=False at 3 stages)


def layout_probe(rep, log, points=((16, 65536, 16, 4096), (16, 65536, 32, 8192), (16, 16384, 16, 1024),
                                    (16, 16384, 32, 2048), (16, 65536, 32, 16384))):
    """The sparse attention alone (the bracket path's selection as indices) over the same values in three layouts:
    k_lr | k_rest slabs ("split"), views of whole K rows ("rows", read as one tile; "rows_narrow": as two), and
    k_rest padded to D-wide rows (each row 64-byte aligned; the slab apart).  Session 13 (h200_layout_probe_s13d:
    split / rows_narrow / rest_padded, run as a script with the same code before WIDEN_ROWS existed)."""
    rows = []
    for B, S, d, k in points:
        case = Case(B, S, d, 1 if SMOKE else n_copies_for(B, S, d), layout="split")
        L, q, P = case.lengths, case.q, case.P
        idx, q_rot = loki_select_bracket(q, case.copies[0][0], L, k, P=P, strict=False)
        split_copies = case.copies
        full = [rows_copy(*c, kv=False)[:3] for c in split_copies]
        pads = []
        for a, b_, c in split_copies:
            kp = torch.zeros(B, KVH, S, D, dtype=b_.dtype, device=b_.device)
            kp[..., :D - d] = b_
            pads.append((a, kp[..., :D - d], c))
        outs, r = [], dict(batch=B, context=S, d=d, k=k)
        widen = attn_mod.WIDEN_ROWS
        # "rows": whole K rows read as one tile (attention.WIDEN_ROWS, session 13's round 7); "rows_narrow": the same
        # views read as k_lr and k_rest tiles (as measured in h200_layout_probe_s13d, before WIDEN_ROWS)
        for name, copies, wr in (("split", split_copies, widen), ("rows", full, True), ("rows_narrow", full, False),
                                 ("rest_padded", pads, widen)):
            attn_mod.WIDEN_ROWS = wr
            try:
                outs.append(sparse_decode_attention(q_rot, *copies[0], idx))
                case.copies = copies
                t = timed(case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, idx, strict=False),
                          rep)
            finally:
                attn_mod.WIDEN_ROWS = widen
            r[f"{name}_us"] = t * 1e3
            r[f"{name}_TBps"] = B * KVH * k * 2 * D * 2 / t / 1e9
        r["max_rel_diff"] = max(((o.float() - outs[0].float()).norm() / outs[0].float().norm()).item()
                                for o in outs[1:])
        log(json.dumps(r))
        rows.append(r)
        del case, split_copies, full, pads
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows


def attention_probe(rep, log, copy_bw):
    """The sparse attention kernel at batch 16, on the indices the fused path selects, the same indices sorted,
    and contiguous rows (arange(k)); the selected ones also under each of PROBE_CONFIGS.  Rows of dicts."""
    grid = [(2, 256, 4, 8)] if SMOKE else [(16, S, df, kf) for S in (16384, 65536) for df, kf in ((4, 8), (8, 16), (4, 4))]
    rows = []
    for B, S, dfrac, kfrac in grid:
        d, k = D // dfrac, S // kfrac
        case = Case(B, S, d, 1 if SMOKE else n_copies_for(B, S, d))
        idx, _ = loki_select(case.q, case.copies[0][0], case.lengths, k, P=case.P, mode="group", strict=False)
        orders = {"selected": idx.contiguous(), "sorted": torch.sort(idx, dim=-1).values.contiguous(),
                  "contiguous": torch.arange(k, device=DEV, dtype=idx.dtype).expand_as(idx).contiguous()}
        nbytes = B * KVH * k * 2 * D * DTYPE.itemsize
        for order, ix in orders.items():
            for cfg in [None] + (PROBE_CONFIGS if order == "selected" and not SMOKE else []):
                t = timed(case, lambda kl, kr, v: sparse_decode_attention(case.q_rot, kl, kr, v, ix, config=cfg,
                                                                          strict=False), rep)
                r = dict(batch=B, context=S, d=d, k=k, order=order, config=cfg, us=t * 1e3,
                         pct_copy=100 * nbytes / (t * 1e-3) / 1e9 / copy_bw)
                rows.append(r)
                log(f"B={B} S={S:6d} d={d:3d} k={k:6d} {order:10s} {str(cfg or 'default'):38s} {r['us']:8.1f} us "
                    f"{r['pct_copy']:5.1f}% of copy")
        del case
    return rows


# ablation of the bracket path's options (module defaults set per variant); name -> settings
# (a variant inherits what the previous one set and it does not: _V7 names every setting the later ones change)
_SPARSE_S7 = dict(block_n=64, num_warps=4, num_stages=3, waves=2, ahead=False, hilo=True)
_V7 = dict(SPARSE_CONFIG=_SPARSE_S7, BRACKET_OVERLAP=True, FOLD_COMBINE=True, BRACKET_SAMPLE=1024,
           BRACKET_SAMPLE_DIV=64,
           BRACKET_CLASSIFY="split", BRACKET_CLASSIFY_BLOCK=1024, BRACKET_CLASSIFY_WARPS=4, BRACKET_EARLY_EXIT=True,
           BRACKET_BAND_REG=8192, BRACKET_SCORE_CONFIG={0: dict(block_n=256, tiles=2, num_warps=4),
                                                        32: dict(block_n=128, tiles=4, num_warps=4)},
           BRACKET_CLASSIFY_SCALAR=False, BRACKET_CACHE_HINTS=False, BRACKET_BAND3=False, BRACKET_CLASSIFY_VEC=0,
           BRACKET_CLASSIFY_ASM=True, BRACKET_BAND_IDX_FIRST=0, BRACKET_BAND_ASM=False, ROTATE_COLS=16,
           BRACKET_CLASSIFY_NB=1, ATTN_EARLY=False, BRACKET_ROTATE_PDL=0, BRACKET_ROTATE_PDL_MAX_D=0,
           BRACKET_ROTATE_PDL_MIN_S=0, BRACKET_FINISH_MAXNREG=0, ATTN_LOWRANK_D=0)
_SCAN = dict(_V7, BRACKET_CLASSIFY="scan")


def _pipe(stages, programs, tiles=(1, 1)):
    """Scoring configs of the software-pipelined tile loop: `stages`, about `programs` programs in all, at least
    `tiles` (d < 32, d >= 32) tiles each."""
    return {0: dict(block_n=256, tiles=tiles[0], num_warps=4, stages=stages, programs=programs),
            32: dict(block_n=128, tiles=tiles[1], num_warps=4, stages=stages, programs=programs)}


_S7 = dict(_V7, BRACKET_BAND_REG=16384, BRACKET_SCORE_CONFIG=_pipe(3, 4096))  # session 7 candidates
_S7_DEFAULT = dict(_V7, BRACKET_BAND_REG=16384, BRACKET_SCORE_CONFIG=_pipe(3, 4096, (2, 4)))  # session 7 (round 1)
_S8_BASE = dict(_S7_DEFAULT, BRACKET_CLASSIFY_SCALAR=True, SPARSE_CONFIG=_SPARSE_S7, BRACKET_WARPS=8)  # session 7's final defaults
_SC_D16 = dict(block_n=256, tiles=2, num_warps=4, stages=3, programs=4096)  # BRACKET_SCORE_CONFIG since session 7
_SC_D32 = dict(block_n=128, tiles=4, num_warps=4, stages=3, programs=4096)
# session 10's defaults before the three-block band select (rounds 3-4); "s10_band3" below: the defaults since
_S10 = dict(_S8_BASE, BRACKET_CACHE_HINTS="auto", BRACKET_SCORE_CONFIG={0: _SC_D16, 32: _SC_D32},
            SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=3, waves=1, hilo=False), BRACKET_BAND3=False)
# session 11: the vec classify (BRACKET_CLASSIFY_VEC = 4, 1024-key blocks, 4 warps: measured faster at every point,
# h200_variants_s11a)
_S11 = dict(_S10, BRACKET_BAND3=True, BRACKET_CLASSIFY_VEC=4, BRACKET_CLASSIFY_BLOCK=1024, BRACKET_CLASSIFY_WARPS=4,
            ROTATE_COLS=16)  # (16: the rotation's columns per program at g = 4 until round 2)
_S12 = dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0, ATTN_EARLY=True,
            BRACKET_FLOW=False, ATTN_WIDE_MIN_D=0)  # = s11_early
_S12_D16 = dict(_S12, BRACKET_ROTATE_PDL=1, BRACKET_ROTATE_PDL_MAX_D=16, BRACKET_ROTATE_PDL_MIN_S=16384,
                ATTN_LOWRANK_D=16)
_S13 = dict(_S12_D16, BRACKET_FLOW="auto", BRACKET_FLOW_PDL=True, LAYOUT="split", ATTN_LOWRANK_WAVES=2,
            ATTN_WIDE_MIN_D=0, WIDEN_ROWS=False, ATTN_LOWRANK_ROWS_D=16)
_S13_WIDE = dict(_S13, ATTN_WIDE_MIN_D=17, WIDEN_ROWS=True)  # the module defaults since round 7
_S14 = dict(_S13_WIDE, ATTN_WIDE_ROWS=False, ROTATE_WARPS=4)  # (the session-14 defaults, every setting named)
_S15 = dict(_S14, ROTATE_WARPS=2, BRACKET_NSIG=4.0)  # (the session-15 defaults)
# (the session-17 defaults: two attention waves at d <= 32 in a row layout)
_S17 = dict(_S15, ATTN_LOWRANK_ROWS_D=32, ATTN_WIDE_CONFIG=dict(block_n=128, num_stages=2))
VARIANTS = {
    "v6": dict(BRACKET_OVERLAP=False, FOLD_COMBINE=False, BRACKET_SAMPLE=512, BRACKET_SAMPLE_DIV=0),
    "overlap": dict(BRACKET_OVERLAP=True, FOLD_COMBINE=False, BRACKET_SAMPLE=512, BRACKET_SAMPLE_DIV=0),
    "overlap+fold": dict(BRACKET_OVERLAP=True, FOLD_COMBINE=True, BRACKET_SAMPLE=512, BRACKET_SAMPLE_DIV=0),
    "fold": dict(BRACKET_OVERLAP=False, FOLD_COMBINE=True, BRACKET_SAMPLE=512, BRACKET_SAMPLE_DIV=0),
    "s1024": dict(BRACKET_OVERLAP=True, FOLD_COMBINE=True, BRACKET_SAMPLE=1024, BRACKET_SAMPLE_DIV=0),
    "s2048": dict(BRACKET_OVERLAP=True, FOLD_COMBINE=True, BRACKET_SAMPLE=2048, BRACKET_SAMPLE_DIV=0),
    "s4096": dict(BRACKET_OVERLAP=True, FOLD_COMBINE=True, BRACKET_SAMPLE=4096, BRACKET_SAMPLE_DIV=0),
    "div16_max4096": dict(BRACKET_OVERLAP=True, FOLD_COMBINE=True, BRACKET_SAMPLE=4096, BRACKET_SAMPLE_DIV=16),
    # session 6: the v7 defaults against the one-program-per-row scan (classify="scan") and its tiles
    "v7": _V7,
    "scan": dict(_SCAN, BRACKET_SCAN_BLOCK=4096, BRACKET_SCAN_WARPS=8),
    "scan_b2048": dict(_SCAN, BRACKET_SCAN_BLOCK=2048, BRACKET_SCAN_WARPS=8),
    "scan_b8192": dict(_SCAN, BRACKET_SCAN_BLOCK=8192, BRACKET_SCAN_WARPS=8),
    "scan_w4": dict(_SCAN, BRACKET_SCAN_BLOCK=4096, BRACKET_SCAN_WARPS=4),
    "scan_w16": dict(_SCAN, BRACKET_SCAN_BLOCK=4096, BRACKET_SCAN_WARPS=16),
    "scan_b8192_w16": dict(_SCAN, BRACKET_SCAN_BLOCK=8192, BRACKET_SCAN_WARPS=16),
    # session 7: the bit-by-bit band select with and without its early exit; 16K-key band registers; the scoring
    # kernel's software-pipelined loop (stages, total programs)
    "early": dict(_V7, BRACKET_EARLY_EXIT=True),
    "noearly": dict(_V7, BRACKET_EARLY_EXIT=False),
    "band16k": dict(_V7, BRACKET_BAND_REG=16384),
    "s2048_div32": dict(_V7, BRACKET_SAMPLE=2048, BRACKET_SAMPLE_DIV=32),
    **{f"pipe{st}_p{p}": dict(_V7, BRACKET_SCORE_CONFIG=_pipe(st, p)) for st, p in
       ((2, 1024), (3, 1024), (3, 2048), (4, 2048), (3, 4096))},
    "pipe3_p2048_bn64": dict(_V7, BRACKET_SCORE_CONFIG={
        0: dict(block_n=128, tiles=1, num_warps=4, stages=3, programs=2048),
        32: dict(block_n=64, tiles=1, num_warps=4, stages=3, programs=2048)}),
    "s7": _S7,
    "s7_default": _S7_DEFAULT,
    # session 7, round 2: the classify kernel in a one-key-per-thread layout (the default since) or not
    "s7_base": dict(_S7_DEFAULT, BRACKET_CLASSIFY_SCALAR=False),
    "s7_scalar": dict(_S7_DEFAULT, BRACKET_CLASSIFY_SCALAR=True),
    "s7_p8192": dict(_S7, BRACKET_SCORE_CONFIG=_pipe(3, 8192)),
    "s7_c2048_w8": dict(_S7, BRACKET_CLASSIFY_BLOCK=2048, BRACKET_CLASSIFY_WARPS=8),
    "s7_c4096_w8": dict(_S7, BRACKET_CLASSIFY_BLOCK=4096, BRACKET_CLASSIFY_WARPS=8),
    "s7_c512_w4": dict(_S7, BRACKET_CLASSIFY_BLOCK=512, BRACKET_CLASSIFY_WARPS=4),
    # session 8: the sparse attention loop with its indices one tile ahead (round 2 of bench_results/
    # h200_variants_s8{a,b}: 2 stages, and at 128-row tiles or 3 waves; "s8_s2": the old loop at 2 stages).  Round 1
    # also measured programmatic dependent launch, q rotated inside the scoring kernel and a loop pipelined by hand
    # in registers: all slower, removed (kernels/NOTES.md v10)
    "s8_base": _S8_BASE,
    "s8_ahead_s2": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2)),
    "s8_ahead_s2_bn128": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2, block_n=128)),
    "s8_ahead_s2_w3": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2, waves=3)),
    "s8_s2": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, num_stages=2)),
    # round 3: session 8's defaults ("s8") and the same with q' and p rounded to bf16, one dot each, as SDPA does
    # ("s8_bf16"; an option, not the default: the default keeps ~fp32 dots)
    "s8": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2)),
    "s8_bf16": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2, hilo=False)),
    # round 4: the classify kernel at 4 keys per thread (51 / 46 registers instead of 80: 50-62% occupancy instead
    # of 37.5%) and the band select with 16 warps (half the band registers per thread)
    **{f"s8_{n}": dict(_S8_BASE, SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2),
                       BRACKET_CLASSIFY_BLOCK=cb, BRACKET_CLASSIFY_WARPS=cw, BRACKET_WARPS=fw)
       for n, cb, cw, fw in (("c1024w8", 1024, 8, 8), ("c512w4", 512, 4, 8), ("f16", 1024, 4, 16),
                             ("c1024w8_f16", 1024, 8, 16), ("c512w4_f16", 512, 4, 16))},
    # session 10: the session-8 defaults ("s10_base"); one 16-bit dot each in the sparse attention ("bf16", as SDPA);
    # a 128-register cap with 3 waves of programs (4 programs per SM, one wave at batch 16: "r128_w3"); L2 eviction
    # hints (slab and gathered rows read evict_first, the keys kept for the classify kernel: "hints")
    **{f"s10_{n}": dict(_S8_BASE, BRACKET_CACHE_HINTS=h,
                        SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=2, hilo=hilo, evict=h,
                                           **(dict(maxnreg=128, waves=3) if cap else {})))
       for n, hilo, cap, h in (("base", True, False, False), ("r128_w3", True, True, False),
                               ("bf16", False, False, False), ("bf16_r128_w3", False, True, False),
                               ("hints", True, False, True), ("bf16_r128_w3_hints", False, True, True))},
    # round 2 (from the attention probe h200_attn_probe_s10b: with hilo=False, 3 stages keep two tiles in flight;
    # 81 KB of shared memory, 2 programs per SM, one wave at waves=1); the bracket's hints ("bh") and the attention's
    # evict_first gathers ("ah") apart
    **{f"s10_bf16_s3w1{n}": dict(_S8_BASE, BRACKET_CACHE_HINTS=bh,
                                 SPARSE_CONFIG=dict(_SPARSE_S7, ahead=True, num_stages=3, waves=1, hilo=False, evict=ah))
       for n, bh, ah in (("", False, False), ("_bh", True, False), ("_ah", False, True), ("_hints", True, True))},
    # round 3: the defaults after round 2 ("s10": L2 hints "auto", hilo=False at 3 stages / one wave); round 4: the
    # scoring kernel's tiles at those defaults (bracket_sub: the bracket programs' sub-tile, kept at 128 / 256 tokens)
    "s10": _S10,
    **{f"s10_sc{n}": dict(_S10, BRACKET_SCORE_CONFIG={0: dict(_SC_D16, **c16), 32: dict(_SC_D32, **c32)})
       for n, c16, c32 in (("256", {}, dict(block_n=256, tiles=2, bracket_sub=128)),
                           ("256_w8", {}, dict(block_n=256, tiles=2, num_warps=8, bracket_sub=128)),
                           ("128_s4", {}, dict(stages=4)),
                           ("128_p8192", {}, dict(programs=8192)),
                           ("_d16_512", dict(block_n=512, tiles=1, bracket_sub=256), {}))},
    # round 5: the band select's band in one power-of-2 register block or in three quarter blocks (BRACKET_BAND3;
    # "s10_band3" = the module defaults at the end of session 10)
    **{f"s10_band{n}": dict(_S10, BRACKET_BAND3=n == 3) for n in (1, 3)},
    # session 11: the classify kernel with `vec` consecutive keys per thread, scanned in the thread, its scattered
    # stores in inline PTX (BRACKET_CLASSIFY_VEC / _ASM; ~48 instead of ~76 SASS instructions per key), by keys per
    # program (b) and warps (w); "s11_base": session 10's final defaults
    "s11_base": dict(_S10, BRACKET_BAND3=True),
    **{f"s11_vec{v}_b{b}w{w}{'' if asm else '_noasm'}": dict(
        _S10, BRACKET_BAND3=True, BRACKET_CLASSIFY_VEC=v, BRACKET_CLASSIFY_BLOCK=b, BRACKET_CLASSIFY_WARPS=w,
        BRACKET_CLASSIFY_ASM=asm)
       for v, b, w, asm in ((4, 1024, 4, True), (4, 2048, 8, True), (8, 2048, 4, True), (4, 512, 4, True),
                            (4, 1024, 4, False), (4, 4096, 8, True))},
    # round 2, from "s11" (the vec classify at 4 keys per thread, 1024-key blocks: the defaults since round 1): the
    # band select's stores in inline PTX ("band_asm", 112 instead of 159 registers at a 8192-key block on sm_90), with
    # its positions loaded with its keys ("band_asm_idx"); the scoring kernel's loop at d = 16 (4 stages, 8192 programs,
    # 128-token tiles); the rotation's output columns per program (8 / 32 instead of 16)
    "s11": _S11,
    "s11_band_asm": dict(_S11, BRACKET_BAND_ASM=True),
    "s11_band_asm_idx": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=16384),
    # the module defaults since round 2: band_asm with positions first for one-block bands of up to 8192 keys, 32
    # rotation columns per program at g = 4 (ROTATE_COLS = 0: auto)
    "s11_final": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0),
    # round 4: the attention launched early (programmatic dependent launch after the band select) on each row's keys
    # above its bracket (kernels.loki.ATTN_EARLY: the module default since); 2 / 4 classify blocks per program
    "s11_early": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0, ATTN_EARLY=True),
    **{f"s11_early_nb{nb}": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0,
                                 ATTN_EARLY=True, BRACKET_CLASSIFY_NB=nb) for nb in (2, 4)},
    # the scoring kernel launched during the rotation, prefetching its first 1 / 2 slab tiles per program into L2
    # (BRACKET_ROTATE_PDL; measured in session 12, h200_variants_s12a: mixed, left off)
    **{f"s11_early_rotpdl{p}": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0,
                                     ATTN_EARLY=True, BRACKET_ROTATE_PDL=p) for p in (1, 2)},
    # round 5: the band select in 4 warps (fewer registers per program: room for two attention programs beside it)
    "s11_early_f4": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0, ATTN_EARLY=True,
                         BRACKET_WARPS=4),
    # round 3: L2 eviction hints at every size (the "auto" rule dates from the session-7 classify kernel)
    "s11_final_hints": dict(_S11, BRACKET_BAND_ASM=True, BRACKET_BAND_IDX_FIRST=8192, ROTATE_COLS=0,
                            BRACKET_CACHE_HINTS=True),
    **{f"s11_d16_{n}": dict(_S11, BRACKET_SCORE_CONFIG={0: dict(_SC_D16, **c16), 32: _SC_D32})
       for n, c16 in (("s4", dict(stages=4)), ("p8192", dict(programs=8192)),
                      ("bn128", dict(block_n=128, tiles=4, bracket_sub=128)))},
    **{f"s11_rot{c}": dict(_S11, ROTATE_COLS=c) for c in (8, 32)},
    # session 12 (from "s11_early", the defaults): the bracket sample doubled at 64K (a narrower band: more of each
    # row ready for the early attention, band3 blocks at (D/4, 1/8)); two waves of attention programs (more programs
    # per row to start early).  Also measured in that run (h200_variants_s12b), code in git history (486bd65,
    # removed): "s12_fuse" / "s12_fuse_asm", BRACKET_FUSE_READY (scoring programs that start after their row's
    # bracket classify on the spot): 50-75 us slower at 64K, 18-35 us at 16K
    "s12_s2048": dict(_S12, BRACKET_SAMPLE=2048, BRACKET_SAMPLE_DIV=32),
    "s12_w2": dict(_S12, SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], waves=2)),
    # round 3: about 1024 / 2048 scoring programs in all instead of 4096 (longer programs: their start-up latency
    # amortized over more tiles, at 16K 2-4 tiles each now); at d = 16 the two that were faster there (round 1: the
    # scoring kernel launched during the rotation; round 2: two waves of attention programs), together
    **{f"s12_sp{p}": dict(_S12, BRACKET_SCORE_CONFIG={0: dict(_SC_D16, programs=p), 32: dict(_SC_D32, programs=p)})
       for p in (1024, 2048)},
    "s12_rotpdl1_w2": dict(_S12, BRACKET_ROTATE_PDL=1, SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], waves=2)),
    # round 4 (h200_variants_s12c), code in git history (ac6d2de, removed): "s12_ch2" / "s12_ch4" (+ "_w2"): the batch in
    # 2 / 4 ranges after the scoring pass, each range's classify, band select and attention on a stream of its own
    # (kernels.loki.ATTN_CHUNKS): 17-49 us slower at 64K / d = 32, 4-11 us at 4K, within 3 us at 64K / d = 16
    # round 5: "s12_d16": round 3's s12_rotpdl1_w2 (the scoring kernel launched during the rotation, two waves of
    # attention programs) only where d <= 16 and S_max >= 16K (the module defaults since); the band select under a
    # register cap (112: two early-started attention programs fit beside it; 96), alone and with s12_d16
    "s12_d16": _S12_D16,
    **{f"s12_fmr{r}": dict(_S12, BRACKET_FINISH_MAXNREG=r) for r in (112, 96)},
    **{f"s12_d16_fmr{r}": dict(_S12_D16, BRACKET_FINISH_MAXNREG=r) for r in (112,)},
    # round 6: the two halves of s12_d16 apart (the rotation PDL / the attention's two waves), for batch 1
    "s12_rot16": dict(_S12_D16, ATTN_LOWRANK_D=0),
    "s12_lr16": dict(_S12_D16, BRACKET_ROTATE_PDL=0),
    # session 13: the classify kernel started during the scoring pass, each program waiting for its row's scoring
    # programs (BRACKET_FLOW=True: everywhere), against session 12's defaults ("s12_d16")
    "s13_flow": dict(_S13, BRACKET_FLOW=True),
    "s13_flow_nopdl": dict(_S13, BRACKET_FLOW=True, BRACKET_FLOW_PDL=False),  # (the row order and waits alone)
    # round 2: the flow only where the rotation PDL is off ("auto").  Also measured (h200_variants_s13c), option
    # removed: the classify kernel under a register cap of 48 / 40 / 32 ("s13_cr*": 12 / 16 programs per SM instead of
    # 8): 2-15 us slower at d = 32, within 0.6 at d = 16
    "s13": _S13,
    # round 3: the row layouts (LAYOUT: whole K rows / one K' | V row per token, the slab a copy)
    **{f"s13_{lay}": dict(_S13, LAYOUT=lay) for lay in ("rows", "kv")},
    # round 4: the sparse attention's shape in the "rows" layout: one / three waves of programs at d = 16 (two:
    # the default), 128-token tiles at 2 stages
    "s13_rows_w1": dict(_S13, LAYOUT="rows", ATTN_LOWRANK_D=0),
    "s13_rows_w3": dict(_S13, LAYOUT="rows", ATTN_LOWRANK_WAVES=3),
    "s13_rows_bn128": dict(_S13, LAYOUT="rows", SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=128, num_stages=2)),
    # round 5: 128-token tiles in the other layouts and with 8 warps / two waves
    "s13_bn128": dict(_S13, SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=128, num_stages=2)),
    "s13_kv_bn128": dict(_S13, LAYOUT="kv", SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=128, num_stages=2)),
    "s13_rows_bn128w8": dict(_S13, LAYOUT="rows", SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=128, num_stages=2,
                                                                       num_warps=8)),
    "s13_rows_bn128v2": dict(_S13, LAYOUT="rows", SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=128, num_stages=2,
                                                                       waves=2)),
    # round 6 (for d = 16; at d = 32 these tiles are slower): 32-token tiles at 4 stages, 64-token tiles at 4 stages
    "s13_rows_bn32s4": dict(_S13, LAYOUT="rows", SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=32, num_stages=4)),
    "s13_rows_bn64s4": dict(_S13, LAYOUT="rows", SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], num_stages=4)),
    "s13_rows_bn32s4w4": dict(_S13, LAYOUT="rows", ATTN_LOWRANK_WAVES=4,
                              SPARSE_CONFIG=dict(_S12["SPARSE_CONFIG"], block_n=32, num_stages=4)),
    # the defaults (round 5's 128-token tiles at d >= 17, kernels.loki.ATTN_WIDE_*), and in the "rows" layout as
    # measured in the grids h200_bench_s13i / s13m (before attention.WIDEN_ROWS)
    "s13_wide": _S13_WIDE,
    "s13_wide_rows": dict(_S13_WIDE, LAYOUT="rows", WIDEN_ROWS=False),
    # round 7: the attention reading whole K rows as one tile where k_rest continues k_lr (attention.WIDEN_ROWS, the
    # default), with 128-token tiles at d = 32 (ATTN_WIDE) and without
    "s13_wide_rows_widen": dict(_S13_WIDE, LAYOUT="rows"),
    "s13_wide_kv_widen": dict(_S13_WIDE, LAYOUT="kv"),
    "s13_rows_widen_bn64": dict(_S13_WIDE, LAYOUT="rows", ATTN_WIDE_MIN_D=0),
    # (since round 7 the module defaults take ATTN_WIDE only where the rows are not whole: s13_wide = the defaults in
    # the split layout, s13_rows_widen_bn64 in the rows layout)
    # session 14, round 1 (h200_variants_s14b): no rotation kernel, the scoring kernel's bracket programs writing q' and
    # its scoring programs computing their own q'[:d] (bracket.BRACKET_SELF_ROTATE, 93394b8, removed: 15-28 us slower)
    "s14_base": _S14,
    "s14_rows": dict(_S14, LAYOUT="rows"),
    # round 2 (timelines, h200_timeline_s14c_*): the brackets in a kernel of their own before the scoring kernel
    # (overlap off), a 512-token sample at 64K
    "s14_nooverlap": dict(_S14, BRACKET_OVERLAP=False),
    "s14_s512": dict(_S14, BRACKET_SAMPLE=512),
    # round 3: in the rows layout, 128-token attention tiles at 2 stages at d >= 17 (loki.ATTN_WIDE_ROWS; the sparse
    # attention alone was 2.6-11 us faster so, h200_attn_cfg_probe_s14), with and without the attention's early start
    "s14_rows_wide": dict(_S14, LAYOUT="rows", ATTN_WIDE_ROWS=True),
    "s14_rows_noearly": dict(_S14, LAYOUT="rows", ATTN_EARLY=False),
    "s14_rows_wide_noearly": dict(_S14, LAYOUT="rows", ATTN_WIDE_ROWS=True, ATTN_EARLY=False),
    # session 15 (the chunked streams of round 1, kernels.loki.STREAM_CHUNKS, had variants of their own and were
    # removed: cc0aecc, h200_variants_s15a; round 2's rotation in chunks of the input dimension likewise: 2e3cf06,
    # h200_variants_s15h).  Round 3 (h200_variants_s15i): the two fastest rotations alone (h200_rotate_probe_s15), 2
    # warps (the default since) or 64 output columns per program, in the rows layout
    "s15_base": _S15,
    "s15_rw2": dict(_S14, LAYOUT="rows", ROTATE_WARPS=2),
    "s15_c64": dict(_S14, LAYOUT="rows", ROTATE_COLS=64),
    "s15_rw8": dict(_S14, LAYOUT="rows", ROTATE_WARPS=8),
    # not measured yet (for the next session): the session-15 defaults in the rows layout; the scoring kernel launched
    # during the (now 2-warp) rotation at d = 32 too (session 12 measured it 2.6-3.7 us slower at 64K with the 4-warp
    # rotation); a narrower bracket (fewer band keys for the band select, more rows where the bracket misses and the
    # whole row is selected: ~0.05% / 0.27% of rows at 3.5 / 3 sigma instead of ~0.006%)
    "s15_rows": dict(_S15, LAYOUT="rows"),
    "s15_rotpdl32": dict(_S15, LAYOUT="rows", BRACKET_ROTATE_PDL_MAX_D=0),
    "s15_nsig35": dict(_S15, LAYOUT="rows", BRACKET_NSIG=3.5),
    "s15_nsig3": dict(_S15, LAYOUT="rows", BRACKET_NSIG=3.0),
    # session 17: more, shorter attention programs at d = 32 too (the d <= 16 rule's waves).  In the 16K timeline the
    # attention takes 77.7 us in the step against 72.9 alone: while the band select holds most of each SM's registers,
    # half of the 256 one-wave programs wait, and each holds a fixed half of its row.  Session 12 measured two waves at
    # d = 32 8-55 us slower, in the split layout (three gathers per token)
    "s17_w2": dict(_S15, LAYOUT="rows", ATTN_LOWRANK_D=32),
    "s17_w3": dict(_S15, LAYOUT="rows", ATTN_LOWRANK_D=32, ATTN_LOWRANK_WAVES=3),
    "s17_w4": dict(_S15, LAYOUT="rows", ATTN_LOWRANK_D=32, ATTN_LOWRANK_WAVES=4),
    # the rule taken (loki.ATTN_LOWRANK_ROWS_D = 32: s17_w2 in a row layout, the d <= 16 rule elsewhere)
    "s17_base": _S17,
    "s17_rows": dict(_S17, LAYOUT="rows"),
    # round 3 (h200_variants_s17e), around the rule: two waves of 128-token tiles at 2 stages (ATTN_WIDE_ROWS with
    # waves in ATTN_WIDE_CONFIG), the sparse loop at 2 stages (less shared memory: more programs beside the band
    # select) or with 32-token tiles
    "s17_w2_wide": dict(_S17, LAYOUT="rows", ATTN_WIDE_ROWS=True, ATTN_WIDE_CONFIG=dict(block_n=128, num_stages=2,
                                                                                      waves=2)),
    "s17_w2_s2": dict(_S17, LAYOUT="rows", SPARSE_CONFIG=dict(_S17["SPARSE_CONFIG"], num_stages=2)),
    "s17_w2_bn32": dict(_S17, LAYOUT="rows", SPARSE_CONFIG=dict(_S17["SPARSE_CONFIG"], block_n=32)),
    # round 4 (h200_variants_s17f): with three attention programs per row, register caps on the band select
    # (BRACKET_FINISH_MAXNREG, session 12's option, then measured beside one-wave attention) or on the attention, so
    # that two attention programs fit beside the band select on an SM
    **{f"s17_w2_fr{r}": dict(_S17, LAYOUT="rows", BRACKET_FINISH_MAXNREG=r) for r in (96, 112)},
    "s17_w2_ar128": dict(_S17, LAYOUT="rows", SPARSE_CONFIG=dict(_S17["SPARSE_CONFIG"], maxnreg=128)),
    # session 20 (h200_variants_s20d_r{1,2}): the scoring programs computing q'[:d] from q and P on tensor cores
    # (bracket.BRACKET_ROT_MMA, 8722895, removed since: 3.4-9.5 us slower per step with the rotation kernel still run,
    # more than the 3.6 us that kernel takes), against "s20_rows", the defaults in the rows layout
    "s20_rows": dict(_S17, LAYOUT="rows"),
}


def _variant_modules() -> dict:
    """Setting name -> the module that holds it (the settings VARIANTS may change)."""
    import kernels.loki as loki_mod
    return dict(BRACKET_OVERLAP=bracket_mod, FOLD_COMBINE=loki_mod, BRACKET_SAMPLE=bracket_mod,
                BRACKET_SAMPLE_DIV=bracket_mod, BRACKET_CLASSIFY=bracket_mod, BRACKET_SCAN_BLOCK=bracket_mod,
                BRACKET_SCAN_WARPS=bracket_mod, BRACKET_CLASSIFY_BLOCK=bracket_mod,
                BRACKET_CLASSIFY_WARPS=bracket_mod, BRACKET_EARLY_EXIT=bracket_mod, BRACKET_BAND_REG=bracket_mod,
                BRACKET_SCORE_CONFIG=bracket_mod, BRACKET_CLASSIFY_SCALAR=bracket_mod, SPARSE_CONFIG=attn_mod,
                BRACKET_WARPS=bracket_mod, BRACKET_CACHE_HINTS=bracket_mod, BRACKET_BAND3=bracket_mod,
                BRACKET_CLASSIFY_VEC=bracket_mod, BRACKET_CLASSIFY_ASM=bracket_mod, BRACKET_BAND_IDX_FIRST=bracket_mod,
                BRACKET_BAND_ASM=bracket_mod, ROTATE_COLS=scores_mod, BRACKET_CLASSIFY_NB=bracket_mod,
                ATTN_EARLY=loki_mod, BRACKET_ROTATE_PDL=bracket_mod, BRACKET_ROTATE_PDL_MAX_D=bracket_mod, BRACKET_ROTATE_PDL_MIN_S=bracket_mod,
                BRACKET_FINISH_MAXNREG=bracket_mod, ATTN_LOWRANK_D=loki_mod, BRACKET_FLOW=bracket_mod,
                BRACKET_FLOW_PDL=bracket_mod, LAYOUT=sys.modules[__name__],
                ATTN_LOWRANK_WAVES=loki_mod, ATTN_WIDE_MIN_D=loki_mod, WIDEN_ROWS=attn_mod, ATTN_WIDE_ROWS=loki_mod,
                ROTATE_WARPS=scores_mod, BRACKET_NSIG=bracket_mod, ATTN_LOWRANK_ROWS_D=loki_mod,
                ATTN_WIDE_CONFIG=loki_mod)


def apply_variant(name: str) -> dict:
    """Set the module defaults named by VARIANTS[name]; returns the settings."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; one of: {', '.join(VARIANTS)}")
    mods = _variant_modules()
    for k_, v_ in VARIANTS[name].items():
        setattr(mods[k_], k_, v_)
    return VARIANTS[name]


def variant_sweep(rep, log, grid, names):
    """Whole Loki step (bracket path) at each grid point and (d, k) under each variant of VARIANTS; rows."""
    mods = _variant_modules()
    saved = {k_: getattr(m, k_) for k_, m in mods.items()}
    rows = []
    for B, S in grid:
        for dfrac, kfrac in ((4, 4), (4, 8), (8, 16)):
            d, k = D // dfrac, S // kfrac
            cases = {}  # by layout (a variant may set LAYOUT): the same values in each (one seed per point)
            ref = None
            for name in names:
                apply_variant(name)
                if LAYOUT not in cases:
                    torch.manual_seed(B * 1000003 + S * 17 + d)
                    cases[LAYOUT] = Case(B, S, d, n_copies_for(B, S, d))
                case = cases[LAYOUT]
                q, P, L, sl = case.q, case.P, case.lengths, case.slab
                try:
                    out = loki_decode(q, P, *case.copies[0], L, k, path="bracket", strict=False,
                                      slab=sl(case.copies[0][0]))
                    ref = out if ref is None else ref
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = timed(case, lambda a, b_, c: loki_decode(q, P, a, b_, c, L, k, path="bracket", strict=False,
                                                                 slab=sl(a)), rep)
                except Exception as e:  # noqa: BLE001 (a variant that does not compile here is reported, not fatal)
                    err_text = f"{type(e).__name__}: {e}"[:500]
                    rows.append(dict(batch=B, context=S, d=d, k=k, variant=name, error=err_text))
                    log(f"B={B} S={S:6d} d={d:3d} k={k:6d} {name:14s} FAILED: {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append(dict(batch=B, context=S, d=d, k=k, variant=name, us=t * 1e3, rel_diff_vs_first=err))
                log(f"B={B} S={S:6d} d={d:3d} k={k:6d} {name:14s} {t * 1e3:8.1f} us  (diff vs first {err:.1e})")
            for k_, v_ in saved.items():
                setattr(mods[k_], k_, v_)
            del cases, case
            if not SMOKE:
                torch.cuda.empty_cache()
    return rows


def parse_configs(text: str) -> list[tuple[int, int]]:
    """--configs "B:S,B:S" -> [(B, S), ...]."""
    return [tuple(int(x) for x in c.split(":")) for c in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 16, contexts 16K and 64K only")
    ap.add_argument("--tune", action="store_true", help="sweep kernel configs first and use the best")
    ap.add_argument("--tune-select", action="store_true", help="only pick the selection's sample size first")
    ap.add_argument("--tune-bracket", action="store_true", help="only tune the bracket path first (sample, tiles)")
    ap.add_argument("--tune-attention", action="store_true", help="only tune the sparse attention kernel first")
    ap.add_argument("--tune-context", type=int, default=16384, help="context of the tuning sweeps (batch 16)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--wandb", action="store_true", help="log to Weights & Biases when installed")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) per measurement")
    ap.add_argument("--configs", default=None, help="comma list of B:S (e.g. 16:16384,1:131072)")
    ap.add_argument("--no-stages", action="store_true", help="time only the totals")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter smoke run (tiny shapes, no timing)")
    ap.add_argument("--attn-probe", action="store_true",
                    help="only the sparse attention: index order (selected/sorted/contiguous) and config variants")
    ap.add_argument("--layout-probe", action="store_true",
                    help="only the sparse attention over the same values in the split / rows / padded layouts")
    ap.add_argument("--variants", default=None,
                    help="only the bracket-path ablation: comma list of VARIANTS names (or 'all'), over --configs")
    ap.add_argument("--variant", default=None, help="run everything under one VARIANTS entry (module defaults)")
    ap.add_argument("--layout", default="split", choices=LAYOUTS,
                    help="the Loki cache layout (see LAYOUT; the baselines read contiguous K and V either way)")
    ap.add_argument("--slab-dtype", default=None, choices=("fp8",),
                    help="row layouts: the scoring pass reads an fp8 (e4m3) slab copy (changes what Loki scores: "
                         "no acceptance targets)")
    args = ap.parse_args(argv)
    global SMOKE, DEV, H, KVH, D, DTYPE, LAYOUT, SLAB_DTYPE
    LAYOUT = args.layout
    if args.slab_dtype:
        if LAYOUT == "split":
            raise SystemExit("--slab-dtype needs a row layout (--layout rows or kv): the split layout has no slab copy")
        SLAB_DTYPE = torch.float8_e4m3fn
    if args.smoke:
        SMOKE, DEV, H, KVH, D, DTYPE = True, "cpu", 8, 2, 64, torch.float16
    else:
        assert torch.cuda.is_available(), "the benchmark needs a CUDA device (or --smoke)"
    torch.manual_seed(0)

    def log(*a):
        print(*a, flush=True)

    t_start = time.time()
    info = dict(device=torch.cuda.get_device_name() if not SMOKE else "cpu-interpreter", torch=torch.__version__,
                triton=triton.__version__,
                sms=torch.cuda.get_device_properties(0).multi_processor_count if not SMOKE else 0, heads=H, kv_heads=KVH, head_dim=D,
                dtype=str(DTYPE), layout=LAYOUT, slab_dtype=str(SLAB_DTYPE or DTYPE), command="python -m kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.variant:
        info["variant"] = dict(name=args.variant, settings=apply_variant(args.variant))
    log(json.dumps(info, default=str))
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth {copy_bw:.0f} GB/s")
    if args.variants:
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        vgrid = ([(2, 256)] if SMOKE else parse_configs(args.configs) if args.configs
                 else [(16, 4096), (16, 16384), (16, 32768), (16, 65536)])
        result = dict(info=info, copy_bandwidth_GBps=copy_bw, variants=variant_sweep(args.rep, log, vgrid, names),
                      wall_s=time.time() - t_start)
        write_json(args.json, result)
        return result
    if args.layout_probe:
        pts = ((2, 256, 16, 64),) if SMOKE else None
        result = dict(info=info, copy_bandwidth_GBps=copy_bw,
                      layout_probe=layout_probe(args.rep, log, *([pts] if pts else [])), wall_s=time.time() - t_start)
        write_json(args.json, result)
        return result
    if args.attn_probe:
        result = dict(info=info, copy_bandwidth_GBps=copy_bw, attention_probe=attention_probe(args.rep, log, copy_bw),
                      wall_s=time.time() - t_start)
        write_json(args.json, result)
        return result
    if args.tune:
        tuning = tune(args.rep, log, context=args.tune_context)
    elif args.tune_bracket or args.tune_attention:
        tuning = {}
        if args.tune_bracket:
            tuning.update(tune(args.rep, log, light="bracket", context=args.tune_context))
        if args.tune_attention:
            tuning.update(tune(args.rep, log, light="attention", context=args.tune_context))
    else:
        tuning = tune(args.rep, log, light=True) if args.tune_select else None
    cfgs = dict(sparse=dict(attn_mod.SPARSE_CONFIG), dense=dict(attn_mod.DENSE_CONFIG),
                fused=(topk_mod.FUSED_BLOCK_N, topk_mod.FUSED_WARPS),
                topk=(topk_mod.SELECT_BLOCK_S, topk_mod.SELECT_WARPS), sample=topk_mod.SELECT_SAMPLE,
                nsig=topk_mod.SELECT_NSIG, scores={str(k_): v_ for k_, v_ in scores_mod.SCORES_CONFIG.items()},
                bracket=dict(sample=bracket_mod.BRACKET_SAMPLE, sample_div=bracket_mod.BRACKET_SAMPLE_DIV,
                             nsig=bracket_mod.BRACKET_NSIG,
                             classify=bracket_mod.BRACKET_CLASSIFY, band_reg=bracket_mod.BRACKET_BAND_REG,
                             overlap=bracket_mod.BRACKET_OVERLAP,
                             classify_block=bracket_mod.BRACKET_CLASSIFY_BLOCK,
                             classify_warps=bracket_mod.BRACKET_CLASSIFY_WARPS, finish_warps=bracket_mod.BRACKET_WARPS,
                             classify_vec=bracket_mod.BRACKET_CLASSIFY_VEC,
                             scores={str(k_): v_ for k_, v_ in bracket_mod.BRACKET_SCORE_CONFIG.items()}))
    log("configs", cfgs)
    if SMOKE:
        grid = [(2, 256)]
    elif args.configs:
        grid = parse_configs(args.configs)
    elif args.quick:
        grid = [(16, 16384), (16, 65536)]
    else:
        grid = [(16, 4096), (16, 16384), (16, 65536), (1, 4096), (1, 16384), (1, 65536), (1, 131072)]
    dense, rows = {}, []
    for B, S in grid:
        dn = run_dense(B, S, args.rep)
        for key in ("sdpa", "dense_triton"):
            dn[f"{key}_pct_copy"] = 100 * dn["dense_bytes"] / (dn[f"{key}_ms"] * 1e-3) / 1e9 / copy_bw
        dense[(B, S)] = dn
        log(f"dense B={B} S={S}: sdpa {dn['sdpa_ms'] * 1e3:.1f} us ({dn['sdpa_pct_copy']:.0f}% copy), "
            f"triton {dn['dense_triton_ms'] * 1e3:.1f} us ({dn['dense_triton_pct_copy']:.0f}% copy)")
        for dfrac, kfrac in ((4, 4), (4, 8), (8, 16)):
            r = run_case(B, S, dfrac, kfrac, args.rep, stage_times=not args.no_stages)
            slab_bytes = 1 if SLAB_DTYPE is not None else 2
            loki_bytes = B * KVH * (S * r["d"] * slab_bytes + r["k"] * 2 * D * 2)
            r["loki_bytes"] = loki_bytes
            r["ideal_ratio"] = dn["dense_bytes"] / loki_bytes
            r["achieved_GBps"] = loki_bytes / (r["total_ms"] * 1e-3) / 1e9
            r["sdpa_ms"] = dn["sdpa_ms"]
            r["speedup_vs_sdpa"] = dn["sdpa_ms"] / r["total_ms"]
            r["speedup_vs_naive"] = r["naive_torch_ms"] / r["total_ms"]
            if SLAB_DTYPE is not None:
                r["slab_dtype"] = str(SLAB_DTYPE)  # (not the method: no target)
            elif B == 16 and S >= 16384 or SMOKE:
                r["target"] = TARGETS[(dfrac, kfrac)]
                r["target_met"] = r["speedup_vs_sdpa"] >= r["target"]
            elif B == 16:
                r["target"] = 1.0
                r["target_met"] = r["speedup_vs_sdpa"] >= 1.0
            rows.append(r)
            log(json.dumps({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in r.items()}))
    table = fmt_table(rows, dense, copy_bw)
    result = dict(info=info, copy_bandwidth_GBps=copy_bw, configs=cfgs, tuning=tuning, loki=rows,
                  dense=[dict(v_, batch=b_, context=s_) for (b_, s_), v_ in dense.items()],
                  wall_s=time.time() - t_start)
    write_json(args.json, result)
    if args.wandb:
        try:
            import wandb
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loki-kernels"), job_type="bench", config=info)
            run.log({"loki": wandb.Table(dataframe=__import__("pandas").DataFrame(rows)),
                     "copy_bandwidth_GBps": copy_bw})
            run.finish()
        except Exception as e:  # noqa: BLE001 (W&B is optional)
            log(f"wandb logging skipped: {type(e).__name__}: {e}")
    print("\n" + table, flush=True)
    return result


if __name__ == "__main__":
    main()
