"""Session 15 probe: the dense flash-decoding kernel's launch config at batch 1 (66-71% of copy bandwidth at 128K in
every grid since session 7, against SDPA's ~100%).  Times dense_decode_attention over configs (graph-timed like the
benchmark) at B=1 / 16K, 64K, 128K and B=16 / 16K, in the split and rows layouts; prints a table, writes JSON.
    PYTHONPATH=. python kernels/bench_results/s15_probes/dense_cfg_probe.py OUT.json
"""
import itertools
import json
import sys

import torch

import kernels.bench as kb
from kernels.attention import DENSE_CONFIG, SPARSE_CONFIG, dense_decode_attention, sparse_decode_attention

rows = []
for layout in ("rows", "split"):
    for B, S in ((1, 131072), (1, 65536), (1, 16384), (16, 16384)):
        case = kb.Case(B, S, 32, kb.n_copies_for(B, S, 32), layout=layout)
        L, q_rot = case.lengths, case.q_rot
        nbytes = B * kb.KVH * S * 2 * kb.D * 2
        grid = itertools.product((1, 2, 4), (64, 128), (2, 3, 4), (4, 8), (True, False))
        if layout == "split" or B == 16 or S == 16384:  # (a smaller sweep)
            grid = itertools.product((1, 2, 4), (64, 128), (3,), (4,), (True,))
        for waves, bn, st, nw, hilo in grid:
            cfg = dict(DENSE_CONFIG, waves=waves, block_n=bn, num_stages=st, num_warps=nw, hilo=hilo)
            try:
                t = kb.timed(case, lambda a, b_, c: dense_decode_attention(q_rot, a, b_, c, L, config=cfg, strict=False), 20)
            except Exception as e:  # noqa: BLE001
                print(f"{layout} B={B} S={S} {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            us = t * 1e3
            r = dict(layout=layout, batch=B, context=S, waves=waves, block_n=bn, num_stages=st, num_warps=nw,
                     hilo=hilo, us=us, GBps=nbytes / us / 1e3)
            rows.append(r)
            print(f"{layout:5s} B={B:2d} S={S:6d} waves={waves} bn={bn:3d} st={st} nw={nw} hilo={int(hilo)}: "
                  f"{us:8.1f} us  {nbytes / us / 1e3:7.0f} GB/s", flush=True)
        del case
        torch.cuda.empty_cache()
# the sparse attention at batch 1 (rows layout): k = S/4 random sorted positions per KV head
for B, S in ((1, 131072), (1, 65536)):
    case = kb.Case(B, S, 32, kb.n_copies_for(B, S, 32), layout="rows")
    q_rot = case.q_rot
    k = S // 4
    idx = torch.stack([torch.randperm(S, device="cuda")[:k].sort().values for _ in range(B * kb.KVH)])
    idx = idx.view(B, kb.KVH, k).to(torch.int32).contiguous()
    nbytes = B * kb.KVH * k * 2 * kb.D * 2
    for waves, bn, st in itertools.product((1, 2, 3, 4), (64, 128), (2, 3)):
        cfg = dict(SPARSE_CONFIG, waves=waves, block_n=bn, num_stages=st)
        try:
            t = kb.timed(case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, idx, config=cfg, strict=False), 20)
        except Exception as e:  # noqa: BLE001
            print(f"sparse B={B} S={S} {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        us = t * 1e3
        rows.append(dict(layout="rows", kind="sparse", batch=B, context=S, k=k, waves=waves, block_n=bn,
                         num_stages=st, us=us, GBps=nbytes / us / 1e3))
        print(f"sparse B={B} S={S:6d} k={k} waves={waves} bn={bn:3d} st={st}: {us:8.1f} us  "
              f"{nbytes / us / 1e3:7.0f} GB/s", flush=True)
    del case
    torch.cuda.empty_cache()
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
for layout in ("rows", "split"):
    for B, S in ((1, 131072), (1, 65536), (1, 16384), (16, 16384)):
        sel = [r for r in rows if "kind" not in r and r["layout"] == layout and r["batch"] == B and r["context"] == S]
        if sel:
            best = min(sel, key=lambda r: r["us"])
            dflt = [r for r in sel if r["waves"] == 1 and r["block_n"] == 128 and r["num_stages"] == 3
                    and r["num_warps"] == 4 and r["hilo"]]
            print(f"BEST {layout} B={B} S={S}: {best}  default: {dflt[0]['us'] if dflt else None:.1f} us")
