"""Session 15 probe 4: the rotation kernel alone (q @ P[kvh], Llama-3-8B shapes) under scores.ROTATE_CHUNK /
ROTATE_WARPS / ROTATE_COLS, graph-timed like the benchmark, at batch 16 and 1; table on stdout, JSON to argv[1].
    PYTHONPATH=. python kernels/bench_results/s15_probes/rotate_probe.py OUT.json
(run at 2e3cf06; scores.ROTATE_CHUNK was removed after it, so at later commits the chunk settings do nothing)
"""
import json
import sys

import torch

import kernels.bench as kb
import kernels.scores as sc

rows = []
P = kb.random_orthonormal(kb.KVH, kb.D, "cuda")
for B in (16, 1):
    q = torch.randn(B, kb.H, kb.D, device="cuda", dtype=kb.DTYPE)
    ref = None
    for chunk in (0, 64, 32, 16):
        for warps in (2, 4, 8):
            for cols in (0, 64, 128):
                sc.ROTATE_CHUNK, sc.ROTATE_WARPS, sc.ROTATE_COLS = chunk, warps, cols
                out = sc.rotate_q(q, P)
                ref = out if ref is None else ref
                err = (out - ref).abs().max().item()
                us = kb.bench_graph(lambda: sc.rotate_q(q, P), rep=20) * 1e3
                rows.append(dict(batch=B, chunk=chunk, warps=warps, cols=cols, us=us, max_diff=err))
                print(f"B={B:2d} chunk={chunk:3d} warps={warps} cols={cols:3d}: {us:6.2f} us  (max diff {err:.1e})",
                      flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
