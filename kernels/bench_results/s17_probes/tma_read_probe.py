"""Session 17 probe: do bulk tensor copies (TMA descriptors) read a 16K-sized pass faster than pointer loads?

Every bandwidth-bound pass of the 16K step pays ~4-6 us over a copy of the same bytes (kernels/NOTES.md v16 item 3,
v18 item 4): batch 1 / 16K dense 22.0 us for 67 MB where a copy moves those bytes in 17.4 us.  Here, for the same
sizes: (1) a plain read (per-program sum) through pointer loads in a pipelined loop, one-shot programs, and TMA
descriptor loads in a pipelined loop; torch's memcpy and sum as references; (2) the plainest dense attention pass at
batch 1 over the rows layout (K'|V rows, (R, S, 2D)), pointer loads against descriptor loads; (3) the scoring stream
at batch 16 / 16K (slab (R, S, d)), pointer against descriptor.  CUDA-graph timed over rotated copies (>= 300 MB).
Run: PYTHONPATH=. python kernels/bench_results/s17_probes/tma_read_probe.py OUT.json [--smoke]
"""
import itertools
import json
import math
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SMOKE = "--smoke" in sys.argv
COPY_GBPS = 4247.0
D, G = 128, 16
rows = []


@triton.jit
def _read_ptr(x_ptr, out_ptr, N, NPROG, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    chunk = tl.cdiv(tl.cdiv(N, NPROG), BLOCK) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.range(pid * chunk, tl.minimum(pid * chunk + chunk, N), BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _read_once(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + pid, tl.sum(tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32), 0))


@triton.jit
def _read_tma(desc, out_ptr, M, NPROG, BM: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    chunk = M // NPROG
    acc = tl.zeros([BM, BC], tl.float32)
    for r in tl.range(pid * chunk, pid * chunk + chunk, BM, num_stages=STAGES):
        acc += desc.load([r, 0]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _dense_ptr(kv_ptr, q_ptr, out_ptr, S, NPROG, D: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
               STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    d = tl.arange(0, D)
    qv = tl.load(q_ptr + row * G * D + tl.arange(0, G)[:, None] * D + d[None, :])
    m_i = tl.full([G], -float("inf"), tl.float32)
    l_i = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    chunk = S // NPROG
    base = kv_ptr + row * S * 2 * D
    for n0 in tl.range(part * chunk, part * chunk + chunk, BLOCK_N, num_stages=STAGES):
        j = n0 + tl.arange(0, BLOCK_N)
        kk = tl.load(base + j[:, None] * (2 * D) + d[None, :])
        s = tl.dot(qv, tl.trans(kk))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(base + j[:, None] * (2 * D) + D + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    tl.store(out_ptr + ((row * NPROG + part) * G + tl.arange(0, G))[:, None] * D + d[None, :], acc / l_i[:, None])


@triton.jit
def _dense_tma(desc, q_ptr, out_ptr, S, NPROG, D: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
               STAGES: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    d = tl.arange(0, D)
    qv = tl.load(q_ptr + row.to(tl.int64) * G * D + tl.arange(0, G)[:, None] * D + d[None, :])
    m_i = tl.full([G], -float("inf"), tl.float32)
    l_i = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    chunk = S // NPROG
    for n0 in tl.range(part * chunk, part * chunk + chunk, BLOCK_N, num_stages=STAGES):
        kk = desc.load([row * S + n0, 0])
        s = tl.dot(qv, tl.trans(kk))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = desc.load([row * S + n0, D])
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    tl.store(out_ptr + ((row.to(tl.int64) * NPROG + part) * G + tl.arange(0, G))[:, None] * D + d[None, :],
             acc / l_i[:, None])


@triton.jit
def _stream_ptr(klr_ptr, q_ptr, out_ptr, S, NPROG, D_LR: tl.constexpr, BLOCK_S: tl.constexpr, G: tl.constexpr,
                STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    dl = tl.arange(0, D_LR)
    qv = tl.load(q_ptr + row * G * D_LR + tl.arange(0, G)[:, None] * D_LR + dl[None, :])
    chunk = S // NPROG
    for s0 in tl.range(part * chunk, part * chunk + chunk, BLOCK_S, num_stages=STAGES):
        offs = s0 + tl.arange(0, BLOCK_S)
        k = tl.load(klr_ptr + row * S * D_LR + offs[:, None] * D_LR + dl[None, :])
        tl.store(out_ptr + row * S + offs, tl.max(tl.dot(k, tl.trans(qv)), axis=1))


@triton.jit
def _stream_tma(desc, q_ptr, out_ptr, S, NPROG, D_LR: tl.constexpr, BLOCK_S: tl.constexpr, G: tl.constexpr,
                STAGES: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    dl = tl.arange(0, D_LR)
    qv = tl.load(q_ptr + row.to(tl.int64) * G * D_LR + tl.arange(0, G)[:, None] * D_LR + dl[None, :])
    chunk = S // NPROG
    for s0 in tl.range(part * chunk, part * chunk + chunk, BLOCK_S, num_stages=STAGES):
        k = desc.load([row * S + s0, 0])
        offs = s0 + tl.arange(0, BLOCK_S)
        tl.store(out_ptr + row.to(tl.int64) * S + offs, tl.max(tl.dot(k, tl.trans(qv)), axis=1))


def timed(fn, n):
    if SMOKE:
        fn()
        return float("nan")
    from kernels.bench import bench_graph
    return bench_graph(fn, rep=20) * 1e3 / n


def record(section, size_mb, us, **cfg):
    r = dict(section=section, MB=size_mb, us=us, pct_copy=100 * size_mb * 1e6 / (us * 1e-6) / 1e9 / COPY_GBPS, **cfg)
    rows.append(r)
    return r


def sweep(section, size_mb, configs, make_fn, n):
    best = None
    for cfg in configs:
        try:
            r = record(section, size_mb, timed(make_fn(**cfg), n), **cfg)
        except Exception as e:  # out of resources, unsupported descriptor shape ...
            print("skip", section, cfg, type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "", flush=True)
            continue
        if best is None or r["us"] < best["us"]:
            best = r
    if best is not None:
        print(f"{section:34s} {size_mb:7.1f} MB  best {best['us']:7.1f} us = {best['pct_copy']:5.1f}% of copy  "
              + str({k: v for k, v in best.items() if k not in ('section', 'MB', 'us', 'pct_copy')}), flush=True)
    return best


dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
if dev == "cpu":
    triton.runtime.driver.set_active_to_cpu() if hasattr(triton.runtime.driver, "set_active_to_cpu") else None


def dump():
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--"):
        json.dump(dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", triton=triton.__version__,
                       copy_GBps=COPY_GBPS, rows=rows), open(sys.argv[1], "w"), indent=1)


# 1. plain reads
for mb in ((2.0, 8.0) if SMOKE else (16.8, 67.1, 268.4)):
    N = int(mb * 1e6 / 2) // (128 * 1056) * (128 * 1056)
    size = N * 2 / 1e6
    n = 1 if SMOKE else max(1, math.ceil(300 / size))
    xs = [torch.randn(N, device=dev, dtype=dt) for _ in range(n)]
    out = torch.empty(1 << 20, device=dev, dtype=torch.float32)
    if not SMOKE:
        half = [torch.empty(N, dtype=torch.uint8, device=dev) for _ in range(n)]
        hd = [torch.empty_like(h) for h in half]
        record("memcpy (same bytes moved)", size, timed(lambda: [b.copy_(a) for a, b in zip(half, hd)], n))
        print(f"memcpy {size:.1f} MB moved: {rows[-1]['us']:.1f} us = {rows[-1]['pct_copy']:.1f}%", flush=True)
        del half, hd
        o2 = torch.empty(N // 4096, device=dev, dtype=dt)
        record("torch sum", size, timed(lambda: [torch.sum(x.view(-1, 4096), dim=1, out=o2) for x in xs], n))
        print(f"torch sum {size:.1f} MB: {rows[-1]['us']:.1f} us = {rows[-1]['pct_copy']:.1f}%", flush=True)
    sweep("read ptr loop", size, [dict(nprog=a, block=b, warps=c, stages=s) for a, b, c, s in
                                  itertools.product((132, 264, 528, 1056), (4096, 8192), (4, 8), (2, 4))],
          lambda nprog, block, warps, stages: (lambda: [_read_ptr[(nprog,)](x, out, N, nprog, BLOCK=block,
                                                                            STAGES=stages, num_warps=warps)
                                                        for x in xs]), n)
    sweep("read one-shot", size, [dict(block=b, warps=c) for b, c in itertools.product((4096, 8192, 16384), (4, 8))],
          lambda block, warps: (lambda: [_read_once[(triton.cdiv(N, block),)](x, out, N, BLOCK=block, num_warps=warps)
                                         for x in xs]), n)
    descs = {bm: [TensorDescriptor.from_tensor(x.view(-1, 128), block_shape=[bm, 128]) for x in xs] for bm in (32, 64)}
    sweep("read tma loop", size, [dict(nprog=a, bm=b, warps=c, stages=s) for a, b, c, s in
                                  itertools.product((132, 264, 528, 1056), (32, 64), (4,), (2, 3, 4))],
          lambda nprog, bm, warps, stages: (lambda: [_read_tma[(nprog,)](ds, out, N // 128, nprog, BM=bm, BC=128,
                                                                         STAGES=stages, num_warps=warps)
                                                     for ds in descs[bm]]), n)
    del xs, descs
    dump()

# 2. dense attention pass, batch 1 (8 KV rows), rows layout
R = 8
for S in ((256,) if SMOKE else (16384, 65536)):
    size = 2 * R * S * D * 2 / 1e6
    n = 1 if SMOKE else max(1, math.ceil(300 / size))
    kvs = [torch.randn(R, S, 2 * D, device=dev, dtype=dt) for _ in range(n)]
    q = (torch.randn(R, G, D, device=dev) * D ** -0.5).to(dt)
    grid_cfg = [dict(nprog=a, bn=b, warps=4, stages=s) for a, b, s in
                itertools.product(((2,) if SMOKE else (16, 32, 64, 128)), (32, 64) if SMOKE else (64, 128), (2, 3))]
    o = torch.empty(R * 128 * G * D, device=dev, dtype=torch.float32)
    sweep(f"dense b1 ptr S={S}", size, grid_cfg,
          lambda nprog, bn, warps, stages: (lambda: [_dense_ptr[(R, nprog)](kv, q, o, S, nprog, D=D, BLOCK_N=bn, G=G,
                                                                            STAGES=stages, num_warps=warps)
                                                     for kv in kvs]), n)
    dd = {bn: [TensorDescriptor.from_tensor(kv.view(R * S, 2 * D), block_shape=[bn, D]) for kv in kvs] for bn in
          (32, 64, 128)}
    sweep(f"dense b1 tma S={S}", size, grid_cfg,
          lambda nprog, bn, warps, stages: (lambda: [_dense_tma[(R, nprog)](ds, q, o, S, nprog, D=D, BLOCK_N=bn, G=G,
                                                                            STAGES=stages, num_warps=warps)
                                                     for ds in dd[bn]]), n)
    if SMOKE:  # check both against float64
        kv = kvs[0].double()
        for fn in ("ptr", "tma"):
            o.zero_()
            if fn == "ptr":
                _dense_ptr[(R, 1)](kvs[0], q, o, S, 1, D=D, BLOCK_N=32, G=G, STAGES=2)
            else:
                _dense_tma[(R, 1)](dd[32][0], q, o, S, 1, D=D, BLOCK_N=32, G=G, STAGES=2)
            ref = torch.softmax(q.double() @ kv[..., :D].transpose(1, 2), -1) @ kv[..., D:]
            print("smoke dense", fn, (o[: R * G * D].view(R, G, D).double() - ref).abs().max().item())
    del kvs, dd
    dump()

# 3. scoring stream, batch 16 (128 rows), 16K
R = 16 * 8 if not SMOKE else 4
for dlr in (32, 16):
    S = 16384 if not SMOKE else 512
    size = (R * S * dlr * 2 + R * S * 4) / 1e6
    n = 1 if SMOKE else max(1, math.ceil(300 / size))
    slabs = [torch.randn(R, S, dlr, device=dev, dtype=dt) for _ in range(n)]
    q = torch.randn(R, G, dlr, device=dev, dtype=dt)
    sc = torch.empty(R, S, device=dev, dtype=torch.float32)
    cfgs = [dict(nprog=a, bs=b, warps=w, stages=s) for a, b, w, s in
            itertools.product(((1, 2) if SMOKE else (1, 4, 8, 32)), (128, 256, 512), (4,), (2, 3, 4))]
    sweep(f"stream b16 S={S} d={dlr} ptr", size, cfgs,
          lambda nprog, bs, warps, stages: (lambda: [_stream_ptr[(R, nprog)](sl, q, sc, S, nprog, D_LR=dlr, BLOCK_S=bs,
                                                                             G=G, STAGES=stages, num_warps=warps)
                                                     for sl in slabs]), n)
    ds = {bs: [TensorDescriptor.from_tensor(sl.view(R * S, dlr), block_shape=[bs, dlr]) for sl in slabs]
          for bs in (128, 256, 512)}
    sweep(f"stream b16 S={S} d={dlr} tma", size, cfgs,
          lambda nprog, bs, warps, stages: (lambda: [_stream_tma[(R, nprog)](de, q, sc, S, nprog, D_LR=dlr, BLOCK_S=bs,
                                                                             G=G, STAGES=stages, num_warps=warps)
                                                     for de in ds[bs]]), n)
    if SMOKE:
        ref = (slabs[0].double() @ q.double().transpose(1, 2)).amax(-1)
        _stream_tma[(R, 2)](ds[128][0], q, sc, S, 2, D_LR=dlr, BLOCK_S=128, G=G, STAGES=2)
        print("smoke stream tma", (sc.double() - ref).abs().max().item())
    del slabs, ds
    dump()

