"""Where one decode step spends its time on a CUDA device (issue 6; docs/bench/README.md, "Where a step's time goes").

    python -m loki.profile_step [--json out.json]      # on the GPU machine; torch, triton and transformers only
    python -m loki.profile_step --compile-experiment   # step times with and without torch.compile of the glue
        [--loki-paths fused,bracket]                   #   loki timed with each kernel path

1. The bandwidth of one bf16 GEMM at each Llama-3-8B decode shape (batch 1 and 16; weights rotated over several
   copies so that they do not sit in L2).
2. One decode step of the random-weight Llama-3-8B of conf/bench/h200.yaml, replayed as a CUDA graph, for
   dense_flash and loki: the step time, and torch.profiler's device time per kernel (top 22).
"""
from __future__ import annotations

import argparse
import time

import torch

from loki.common import write_json


def gemm_bandwidth(log=print) -> dict:
    from triton.testing import do_bench

    out = {}
    for M in (1, 16):
        for n, k in [(4096, 4096), (6144, 4096), (1024, 4096), (28672, 4096), (14336, 4096), (4096, 14336),
                     (128256, 4096)]:
            Ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, int(600e6 // (n * k * 2))))]
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)

            def f():
                for W in Ws:
                    torch.nn.functional.linear(x, W)
            ms = do_bench(f, warmup=25, rep=100) / len(Ws)
            out[f"linear_M{M}_{n}x{k}"] = {"us": ms * 1e3, "TBps": n * k * 2 / ms / 1e9}
            log(f"linear M={M:2d} {n:6d}x{k:5d}: {ms * 1e3:7.1f} us  {n * k * 2 / ms / 1e9:5.2f} TB/s")
            del Ws
    torch.cuda.empty_cache()
    return out


def _random_model(log=print):
    """The random-weight Llama-3-8B of conf/bench/h200.yaml, its Loki options and a basis fitted on its keys."""
    from loki.bench_core import load_bench_config, loki_options, random_llama, resolve_basis

    cfg = load_bench_config("conf/bench/h200.yaml")
    t0 = time.time()
    model = random_llama(cfg["random_llama"], torch.bfloat16, "cuda")
    opts = loki_options(cfg)
    basis, _ = resolve_basis(model, cfg, "cuda")
    log(f"model + basis {time.time() - t0:.1f}s")
    return model, opts, basis


def _graph_decoder(model, opts, basis, method: str, B: int, ctx: int):
    """A captured decode step of ``method`` on a cache of ``ctx`` random tokens per sequence."""
    from loki.bench_core import _make_cache, _setup_method
    from loki.generation import GraphDecoder

    _setup_method(model, method, opts, basis)
    cache = _make_cache(model, method, B, ctx + 64)
    cache.reset()
    cache.fill_random(ctx, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (B,), device="cuda")
    pos = torch.full((B,), ctx, dtype=torch.long, device="cuda")
    return GraphDecoder(model, cache, ids, pos, warmup=3).capture()


def _step_ms(dec, n: int = 15, skip: int = 3) -> float:
    """Median ms of one graph replay (after ``skip`` untimed replays), timed as loki.bench times a step."""
    from loki.bench_core import _median_ms

    return _median_ms(dec.step, n, "cuda", warm=skip)


def _release(dec) -> None:
    """Free the graph and drop the decoder's references to its cache (a batch-16 / 32K cache is 69 GB), so that
    the next point's cache fits."""
    dec.close()
    dec.cache = dec.kw = dec.logits = None
    torch.cuda.empty_cache()


def step_profile(points=(("dense_flash", 1, 4096), ("dense_flash", 16, 4096), ("loki", 16, 4096)), log=print) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model, opts, basis = _random_model(log)
    out = {}
    for method, B, ctx in points:
        dec = _graph_decoder(model, opts, basis, method, B, ctx)
        step_ms = _step_ms(dec)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                dec.step()
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        device_ms = sum(e.device_time_total for e in rows) / 3 / 1e3
        kernels = [{"ms": e.device_time_total / 3 / 1e3, "calls": e.count // 3, "kernel": e.key} for e in rows]
        out[f"{method}_b{B}_ctx{ctx}"] = {"graph_step_ms": step_ms, "device_ms": device_ms, "kernels": kernels}
        log(f"== {method} B={B} ctx={ctx}: graph step {step_ms:.3f} ms, profiled device time {device_ms:.3f} ms")
        for r in kernels[:22]:
            log(f"  {r['ms']:8.3f} ms  {r['calls']:5d}x  {r['kernel'][:110]}")
        _release(dec)
    return out


def compile_experiment(points=(("dense_flash", 16, 32768), ("loki", 16, 32768), ("dense_flash", 16, 4096),
                                ("loki", 16, 4096)), log=print, loki_paths=("auto",)) -> list:
    """Graph-step times of each point before and after compiling transformers' non-attention "glue" with
    torch.compile, for both methods alike: every RMSNorm, every MLP, and the RoPE function. (Compiling whole
    decoder layers, attention included, fails in dynamo: illegal memory access; not pursued.) An experiment: the
    RoPE function is replaced in transformers' llama module for the rest of the process.  ``loki_paths``: the
    kernel paths (kernels.loki.PATHS) each loki point is timed with, set through ``kernels.loki.AUTO_PATH``."""
    import kernels.loki as kloki
    from loki.bench_core import compile_glue

    model, opts, basis = _random_model(log)
    rows = []
    for compiled in (False, True):
        if compiled:
            compile_glue(model)
        for method, B, ctx in points:
            for path in (loki_paths if method == "loki" else (None,)):
                kloki.AUTO_PATH = None if path in (None, "auto") else path
                dec = _graph_decoder(model, opts, basis, method, B, ctx)
                ms = _step_ms(dec)
                _release(dec)
                kloki.AUTO_PATH = None
                name = method if path is None else f"{method}[{path}]"
                rows.append({"compiled_glue": compiled, "method": name, "batch": B, "context": ctx, "ms_per_step": ms})
                log(f"compiled glue={compiled!s:5} {name:16s} B={B:2d} ctx={ctx:6d}: {ms:.3f} ms/step")
    for compiled in (False, True):
        by = {(r["method"], r["batch"], r["context"]): r["ms_per_step"] for r in rows if r["compiled_glue"] == compiled}
        for (m, B, ctx), ms in by.items():
            if m.startswith("loki") and ("dense_flash", B, ctx) in by:
                log(f"compiled glue={compiled!s:5} B={B} ctx={ctx}: {m} {by[('dense_flash', B, ctx)] / ms:.2f}x "
                    "dense_flash")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-experiment", action="store_true", help="only the torch.compile experiment")
    ap.add_argument("--loki-paths", default="auto",
                    help="comma list of kernel paths the compile experiment times loki with (auto, bracket, fused)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("loki.profile_step needs a CUDA device.")
    if args.compile_experiment:
        rows = compile_experiment(loki_paths=tuple(args.loki_paths.split(",")))
        res = {"device": torch.cuda.get_device_name(), "compile_experiment": rows}
    else:
        res = {"device": torch.cuda.get_device_name(), "gemm": gemm_bandwidth(), "steps": step_profile()}
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
