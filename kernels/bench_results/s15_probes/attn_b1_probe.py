"""Session 15 probe 2: the dense and sparse attention kernels' launch configs at small batches (1-8 sequences: 8-64
KV rows, split-K over the context), rows layout, graph-timed like the benchmark; table on stdout, JSON to argv[1].
    PYTHONPATH=. python kernels/bench_results/s15_probes/attn_b1_probe.py OUT.json
"""
import json
import sys

import torch

import kernels.bench as kb
from kernels.attention import DENSE_CONFIG, SPARSE_CONFIG, dense_decode_attention, sparse_decode_attention

rows = []
SPARSE = [dict(), dict(block_n=128), dict(block_n=128, num_stages=2), dict(waves=2), dict(waves=3, num_stages=2),
          dict(waves=2, block_n=128, num_stages=2)]
DENSE = [dict(), dict(waves=2, block_n=64), dict(waves=2, block_n=64, hilo=False),
         dict(waves=4, block_n=64, num_stages=2, hilo=False), dict(waves=2)]
for B in (1, 2, 4, 8):
    for S in (16384, 32768, 65536, 131072):
        case = kb.Case(B, S, 32, kb.n_copies_for(B, S, 32), layout="rows")
        q_rot, L = case.q_rot, case.lengths
        if S >= 32768:
            nbytes = B * kb.KVH * S * 2 * kb.D * 2
            for ch in DENSE:
                cfg = dict(DENSE_CONFIG, **ch)
                us = kb.timed(case, lambda a, b_, c: dense_decode_attention(q_rot, a, b_, c, L, config=cfg, strict=False), 20) * 1e3
                rows.append(dict(kind="dense", batch=B, context=S, change=ch, us=us, GBps=nbytes / us / 1e3))
                print(f"dense  B={B} S={S:6d} {str(ch):55s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s", flush=True)
        if B <= 4 and S != 32768:
            for kf in (4, 8, 16):
                k = S // kf
                idx = torch.stack([torch.randperm(S, device="cuda")[:k].sort().values for _ in range(B * kb.KVH)])
                idx = idx.view(B, kb.KVH, k).to(torch.int32).contiguous()
                nbytes = B * kb.KVH * k * 2 * kb.D * 2
                for ch in SPARSE:
                    cfg = dict(SPARSE_CONFIG, **ch)
                    us = kb.timed(case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, idx, config=cfg, strict=False),
                                  20) * 1e3
                    rows.append(dict(kind="sparse", batch=B, context=S, k=k, change=ch, us=us,
                                     GBps=nbytes / us / 1e3))
                    print(f"sparse B={B} S={S:6d} k={k:6d} {str(ch):45s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s",
                          flush=True)
        del case
        torch.cuda.empty_cache()
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
