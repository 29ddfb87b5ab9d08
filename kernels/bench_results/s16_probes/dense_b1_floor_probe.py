"""Session 16 probe: can any kernel read batch 1's K and V at >= 85% of copy bandwidth?

For batch 1 (8 KV rows) at 4K-128K: (a) the plainest dense attention pass (kernels.floor's gather over all positions
in order, no split combine), best over programs per row x tile x stages; (b) a torch copy of half the pass's bytes
(read + write = the pass's bytes).  The project's dense kernel and SDPA at these points: the full grid (h200_bench_s16a).  All CUDA-graph timed over rotated copies
(>= 300 MB), as kernels.bench.  Run: PYTHONPATH=. python kernels/bench_results/s16_probes/dense_b1_floor_probe.py OUT.json
"""
import itertools
import json
import math
import sys

import torch

from kernels import floor
from kernels.bench import bench_graph

B, H, KVH, D, G = 1, 32, 8, 128, 16
rows = []
big = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(big)
copy_gbs = (2 * big.numel()) / (bench_graph(lambda: dst.copy_(big), rep=20) * 1e-3) / 1e9
print(f"copy bandwidth (2 GiB, read + write): {copy_gbs:.0f} GB/s")
del big, dst
for S in (4096, 16384, 65536, 131072):
    R = B * KVH
    nbytes = 2 * R * S * D * 2
    n = max(1, math.ceil(300e6 / nbytes))
    K = [torch.randn(R, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    V = [torch.randn(R, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    idx = torch.arange(S, device="cuda", dtype=torch.int32).expand(R, S).contiguous()
    q = torch.randn(R, G, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
    best = None
    for nprog, bn, ns in itertools.product((4, 8, 16, 33, 66), (64, 128), (2, 3, 4)):
        out = torch.empty(R * nprog, G, D, device="cuda", dtype=torch.float32)
        try:
            us = bench_graph(lambda: [floor.gather(k, v, idx, q, out, nprog, bn, num_warps=4, num_stages=ns)
                                      for k, v in zip(K, V)], rep=20) * 1e3 / n
        except Exception as e:  # out of resources etc.
            print("skip", nprog, bn, ns, type(e).__name__)
            continue
        r = dict(kind="plain_pass", context=S, nprog=nprog, block_n=bn, stages=ns, us=us,
                 pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs)
        rows.append(r)
        if best is None or us < best["us"]:
            best = r
    print(f"S={S:6d} plain pass best {best['us']:7.1f} us = {best['pct_copy']:5.1f}% of copy "
          f"({best['nprog']} programs per row, {best['block_n']} tokens, {best['stages']} stages)")
    half = [torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda") for _ in range(n)]
    hdst = [torch.empty_like(h) for h in half]
    us = bench_graph(lambda: [d_.copy_(s_) for s_, d_ in zip(half, hdst)], rep=20) * 1e3 / n
    rows.append(dict(kind="copy_same_bytes", context=S, us=us, pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs))
    print(f"S={S:6d} copy of the same bytes {us:7.1f} us = {rows[-1]['pct_copy']:5.1f}% of copy")
    del half, hdst
    del K, V
json.dump(dict(copy_GBps=copy_gbs, rows=rows), open(sys.argv[1], "w"), indent=1)
