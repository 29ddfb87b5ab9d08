"""Session 15 probe 3: where the small-batch attention configs of probe 2 stop paying: the dense kernel at batch 8 /
16 (single 16-bit dots, more waves) and the sparse kernel at batch 8 / 16 (two waves), rows layout.
    PYTHONPATH=. python kernels/bench_results/s15_probes/attn_rule_probe.py OUT.json
"""
import json
import sys

import torch

import kernels.bench as kb
from kernels.attention import DENSE_CONFIG, SPARSE_CONFIG, dense_decode_attention, sparse_decode_attention

rows = []
DENSE = [dict(), dict(hilo=False), dict(waves=4, block_n=64, num_stages=2, hilo=False),
         dict(waves=2, block_n=64, num_stages=2, hilo=False), dict(block_n=64, num_stages=2, hilo=False)]
SPARSE = [dict(), dict(waves=2), dict(waves=2, block_n=128, num_stages=2)]
for B, S in ((8, 16384), (16, 4096), (16, 16384), (16, 65536), (8, 4096), (1, 4096), (4, 4096)):
    case = kb.Case(B, S, 32, kb.n_copies_for(B, S, 32), layout="rows")
    q_rot, L = case.q_rot, case.lengths
    nbytes = B * kb.KVH * S * 2 * kb.D * 2
    for ch in DENSE:
        cfg = dict(DENSE_CONFIG, **ch)
        us = kb.timed(case, lambda a, b_, c: dense_decode_attention(q_rot, a, b_, c, L, config=cfg, strict=False), 20) * 1e3
        rows.append(dict(kind="dense", batch=B, context=S, change=ch, us=us, GBps=nbytes / us / 1e3))
        print(f"dense  B={B:2d} S={S:6d} {str(ch):60s} {us:8.1f} us {nbytes / us / 1e3:7.0f} GB/s", flush=True)
    if B in (8, 1, 4):
        for kf in (4, 8, 16):
            k = S // kf
            idx = torch.stack([torch.randperm(S, device="cuda")[:k].sort().values for _ in range(B * kb.KVH)])
            idx = idx.view(B, kb.KVH, k).to(torch.int32).contiguous()
            nb = B * kb.KVH * k * 2 * kb.D * 2
            for ch in SPARSE:
                cfg = dict(SPARSE_CONFIG, **ch)
                us = kb.timed(case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, idx, config=cfg, strict=False),
                              20) * 1e3
                rows.append(dict(kind="sparse", batch=B, context=S, k=k, change=ch, us=us, GBps=nb / us / 1e3))
                print(f"sparse B={B:2d} S={S:6d} k={k:6d} {str(ch):45s} {us:8.1f} us {nb / us / 1e3:7.0f} GB/s",
                      flush=True)
    del case
    torch.cuda.empty_cache()
# the sparse kernel at batch 8 / 64K
case = kb.Case(8, 65536, 32, 1, layout="rows")
q_rot = case.q_rot
for kf in (4, 8, 16):
    k = 65536 // kf
    idx = torch.stack([torch.randperm(65536, device="cuda")[:k].sort().values for _ in range(8 * kb.KVH)])
    idx = idx.view(8, kb.KVH, k).to(torch.int32).contiguous()
    nb = 8 * kb.KVH * k * 2 * kb.D * 2
    for ch in SPARSE:
        cfg = dict(SPARSE_CONFIG, **ch)
        us = kb.timed(case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, idx, config=cfg, strict=False), 20) * 1e3
        rows.append(dict(kind="sparse", batch=8, context=65536, k=k, change=ch, us=us, GBps=nb / us / 1e3))
        print(f"sparse B= 8 S= 65536 k={k:6d} {str(ch):45s} {us:8.1f} us {nb / us / 1e3:7.0f} GB/s", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
