"""Session 21 probe: a one-pass Loki step's main kernel, timed against the two-pass floor (kernels/NOTES.md v23).

The design under test: the scoring pass attends as it goes.  Each program streams a chunk of one row's slab, scores
each tile (one 16-bit dot, max over the group's heads) and, for the tile's tokens whose score is >= the row's
threshold, reads their K and V rows (masked loads: unselected rows cost no DRAM traffic) and folds them into an
online softmax (fp32); a combine kernel merges the chunks' partials.  The probe is handed an *oracle* threshold (the
row's exact k-th score from torch), so it times the best case of that design: no bracket before the pass, no band
fix-up after it.  If even this is not well under the two-pass floor (sep2n 110.5 / 79.0 / 47.1 us at 16K, session 18),
the design cannot meet the 16K budgets (120.6 / 80.4 / 48.3 us at SDPA 241.2).

    TRITON_INTERPRET=1 python kernels/bench_results/s21_probes/onepass_probe.py --smoke   # CPU: against torch
    python kernels/bench_results/s21_probes/onepass_probe.py --json out.json                  # H200: the sweep
"""
import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
G_PAD = 16


@triton.jit
def _onepass_kernel(slab_ptr, k_ptr, v_ptr, qlr_ptr, q_ptr, thr_ptr, m_ptr, l_ptr, acc_ptr, S, CH,
                    D_LR: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, HPR: tl.constexpr,
                    SKIP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    nch = tl.num_programs(1)
    dl = tl.arange(0, D_LR)
    dd = tl.arange(0, D)
    hh = tl.arange(0, G)
    qlr = tl.load(qlr_ptr + row * G * D_LR + hh[:, None] * D_LR + dl[None, :])  # (G, d), scaled
    qf = tl.load(q_ptr + row * G * D + hh[:, None] * D + dd[None, :])  # (G, D), scaled by 1/sqrt(D) * log2(e)
    thr = tl.load(thr_ptr + row)
    m_i = tl.full([G], -1e30, tl.float32)
    l_i = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    start = c * CH
    for s0 in range(start, start + CH, BN):
        offs = s0 + tl.arange(0, BN)
        kl = tl.load(slab_ptr + row * S * D_LR + offs[:, None] * D_LR + dl[None, :])
        sc = tl.dot(kl, tl.trans(qlr))  # (BN, G)
        sc = tl.where((hh < HPR)[None, :], sc, float("-inf"))
        sel = tl.max(sc, 1) >= thr
        go = True
        if SKIP:
            go = tl.max(sel.to(tl.int32), 0) > 0
        if go:
            kk = tl.load(k_ptr + row * S * D + offs[:, None] * D + dd[None, :], mask=sel[:, None], other=0.0)
            s = tl.dot(qf, tl.trans(kk))  # (G, BN), log2 domain
            s = tl.where(sel[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(v_ptr + row * S * D + offs[:, None] * D + dd[None, :], mask=sel[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
    part = row * nch + c
    tl.store(m_ptr + part * G + hh, m_i)
    tl.store(l_ptr + part * G + hh, l_i)
    tl.store(acc_ptr + (part * G + hh)[:, None] * D + dd[None, :], acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, NCH, D: tl.constexpr, NCH_P: tl.constexpr, G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cc = tl.arange(0, NCH_P)
    cm = cc < NCH
    dd = tl.arange(0, D)
    idx = (row * NCH + cc) * G + h
    m = tl.load(m_ptr + idx, mask=cm, other=-1e30)
    l = tl.load(l_ptr + idx, mask=cm, other=0.0)
    mm = tl.max(m, 0)
    w = tl.exp2(m - mm) * tl.where(cm, 1.0, 0.0)
    a = tl.load(acc_ptr + idx[:, None] * D + dd[None, :], mask=cm[:, None], other=0.0)
    o = tl.sum(a * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + (row * G + h) * D + dd, o)


def onepass(slab, K, V, qlr, qf, thr, parts, out, nch, bn, hpr, skip=False, **launch):
    R, S, d = slab.shape
    D = K.shape[-1]
    ch = S // nch
    m, l, acc = parts
    _onepass_kernel[(R, nch)](slab, K, V, qlr, qf, thr, m, l, acc, S, ch, D_LR=d, D=D, BN=bn, G=G_PAD, HPR=hpr,
                              SKIP=skip, **launch)
    _combine_kernel[(R, hpr)](m, l, acc, out, nch, D=D, NCH_P=max(2, triton.next_power_of_2(nch)), G=G_PAD)
    return out


def make_case(R, S, d, D, hpr, ksel, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    slab = torch.randn(R, S, d, generator=g).to(dtype).to(device)
    K = torch.randn(R, S, D, generator=g).to(dtype).to(device)
    V = torch.randn(R, S, D, generator=g).to(dtype).to(device)
    q = torch.zeros(R, G_PAD, D)
    q[:, :hpr] = torch.randn(R, hpr, D, generator=g)
    qlr = (q[:, :, :d] * D ** -0.5).to(dtype).to(device).contiguous()
    qf = (q * D ** -0.5 * LOG2E).to(dtype).to(device).contiguous()
    sc = (slab.float() @ qlr.float().transpose(1, 2))[:, :, :hpr].amax(-1)  # (R, S)
    top = sc.topk(ksel + 1, dim=1).values
    thr = ((top[:, -2] + top[:, -1]) / 2).contiguous()  # between the k-th and (k+1)-th: no rounding ties
    return slab, K, V, qlr, qf, thr


def reference(slab, K, V, qlr, qf, thr, hpr):
    sc = (slab.double() @ qlr.double().transpose(1, 2))[:, :, :hpr].amax(-1)
    sel = sc >= thr.double()[:, None]
    s = (qf.double()[:, :hpr] @ K.double().transpose(1, 2)) / LOG2E  # (R, hpr, S), natural log domain
    s = s.masked_fill(~sel[:, None, :], float("-inf"))
    return torch.softmax(s, -1) @ V.double(), sel.sum(1)


def smoke():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    R, S, d, D, hpr, ksel = 3, 256, 16, 64, 4, 40
    case = make_case(R, S, d, D, hpr, ksel, dt, dev)
    worst = 0.0
    for nch, bn, skip in ((2, 32, False), (4, 16, True), (8, 32, True)):
        parts = (torch.empty(R * nch * G_PAD, device=dev), torch.empty(R * nch * G_PAD, device=dev),
                 torch.empty(R * nch * G_PAD * D, device=dev))
        out = torch.empty(R, G_PAD, D, device=dev)
        onepass(*case, parts, out, nch, bn, hpr, skip=skip)
        ref, n_sel = reference(*[t.cpu() for t in case], hpr)
        err = ((out[:, :hpr].cpu().double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        print(f"smoke nch={nch} bn={bn} skip={skip}: rel err {err:.2e} (selected per row {n_sel.tolist()})")
    assert worst < (1e-5 if dev == "cpu" else 2e-2), worst
    return worst


def sweep(points, log):
    from kernels.bench import bench_graph
    from kernels.reference import dense_sdpa

    dev, B, KVH, H, D, S = "cuda", 16, 8, 32, 128, 16384
    R, hpr = B * KVH, H // KVH
    rows = []
    kq = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    Kd = torch.randn(B, KVH, S, D, device=dev, dtype=torch.bfloat16)
    Vd = torch.randn_like(Kd)
    sdpa = bench_graph(lambda: dense_sdpa(kq, Kd, Vd), rep=20) * 1e3
    del Kd, Vd
    log(f"sdpa B=16 S=16K: {sdpa:.1f} us")
    for d, ksel in points:
        case = make_case(R, S, d, D, hpr, ksel, torch.bfloat16, dev)
        ref, n_sel = reference(*[t[:2].cpu() for t in case], hpr)
        for nch, bn, nw, ns, skip in itertools.product((8, 16, 32), (32, 64), (4, 8), (2, 3), (False, True)):
            parts = (torch.empty(R * nch * G_PAD, device=dev), torch.empty(R * nch * G_PAD, device=dev),
                     torch.empty(R * nch * G_PAD * D, device=dev))
            out = torch.empty(R, G_PAD, D, device=dev)
            fn = lambda: onepass(*case, parts, out, nch, bn, hpr, skip=skip, num_warps=nw, num_stages=ns)
            try:
                fn()
                torch.cuda.synchronize()
                err = ((out[:2, :hpr].cpu().double() - ref).norm() / ref.norm()).item()
                us = bench_graph(fn, rep=20) * 1e3
            except Exception as e:  # a config that does not compile / fit
                log(f"  d={d} k={ksel} nch={nch} bn={bn} w={nw} s={ns} skip={skip}: {type(e).__name__}")
                continue
            rows.append(dict(d=d, k=ksel, nch=nch, bn=bn, warps=nw, stages=ns, skip=skip, us=us, err=err))
        best = min((r for r in rows if r["d"] == d and r["k"] == ksel), key=lambda r: r["us"])
        budget = {(32, 4096): 2.0, (32, 2048): 3.0, (16, 1024): 5.0}[(d, ksel)]
        floor = {(32, 4096): 110.5, (32, 2048): 79.0, (16, 1024): 47.1}[(d, ksel)]
        log(f"onepass d={d} k={ksel}: best {best['us']:.1f} us (nch={best['nch']} bn={best['bn']} w={best['warps']} "
            f"s={best['stages']} skip={best['skip']}, err {best['err']:.1e}); two-pass floor {floor}; budget "
            f"{sdpa / budget:.1f} (SDPA/{budget:g}); selected/row {int(n_sel[0])}")
        del case
        torch.cuda.empty_cache()
    return dict(sdpa_us=sdpa, rows=rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.smoke:
        smoke()
        sys.exit(0)
    smoke()
    res = sweep([(16, 1024), (32, 2048), (32, 4096)], lambda *a: print(*a, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
