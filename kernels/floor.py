"""The floor of a two-pass Loki step on this GPU: the two bandwidth-bound passes alone, as plain kernels.

    python -m kernels.floor                  # batch 16, 16K and 64K: table on stdout
    python -m kernels.floor --json F.json    # also every configuration measured
    python -m kernels.floor --smoke          # CPU interpreter: the two kernels against torch (no timing meaning)

A Loki step reads the low-rank slab once (scoring) and then k rows of K and V (attention).  Whatever the selection
in between costs, the step cannot beat these two passes run as the simplest kernels that do their arithmetic:

* stream: each program scores a contiguous range of one row's slab against its group's query heads (one 16-bit
  `tl.dot`, max over heads) and writes one fp32 score per token, like the scoring pass (without its brackets, key
  transform or second dot);
* gather: each program attends over a share of one row's k selected tokens (sorted random positions), reading whole
  K and V rows (the "rows" layout), online softmax, one 16-bit dot each, no split combine.

Each is timed over a sweep of programs per row, tile, warps and stages (CUDA-graph replays of rotated copies, as in
`kernels.bench`), and the best is kept.  The table adds them per acceptance point and sets the sum against SDPA /
target, the time the whole step has to meet (session 14, kernels/NOTES.md v16).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os

import torch
import triton
import triton.language as tl

H, KVH, D, G_PAD = 32, 8, 128, 16
TARGETS = {(4, 4): 2.0, (4, 8): 3.0, (8, 16): 5.0}  # (D / d, 1 / k) -> speedup over SDPA at 16K and 64K


@triton.jit
def _stream_kernel(klr_ptr, q_ptr, out_ptr, S, NPROG, D_LR: tl.constexpr, BLOCK_S: tl.constexpr, G: tl.constexpr):
    """Program (row, part): out[row, j] = max_h q[row, h] . klr[row, j] for the part's tokens j."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    dl = tl.arange(0, D_LR)
    qv = tl.load(q_ptr + row * G * D_LR + tl.arange(0, G)[:, None] * D_LR + dl[None, :])
    chunk = tl.cdiv(tl.cdiv(S, NPROG), BLOCK_S) * BLOCK_S
    for s0 in range(part * chunk, tl.minimum((part + 1) * chunk, S), BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        m = offs < S
        k = tl.load(klr_ptr + row * S * D_LR + offs[:, None] * D_LR + dl[None, :], mask=m[:, None], other=0.0)
        sc = tl.dot(k, tl.trans(qv))
        tl.store(out_ptr + row * S + offs, tl.max(sc, axis=1), mask=m)


@triton.jit
def _gather_kernel(k_ptr, v_ptr, idx_ptr, q_ptr, out_ptr, S, KSEL, NPROG, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   G: tl.constexpr):
    """Program (row, part): softmax(q K[idx]^T) V[idx] over the part's share of the row's KSEL indices (unnormalized
    parts are not combined: the floor of the reads, not a usable output when NPROG > 1)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    d = tl.arange(0, D)
    qv = tl.load(q_ptr + row * G * D + tl.arange(0, G)[:, None] * D + d[None, :])
    m_i = tl.full([G], -float("inf"), tl.float32)
    l_i = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    chunk = tl.cdiv(tl.cdiv(KSEL, NPROG), BLOCK_N) * BLOCK_N
    for n0 in range(part * chunk, tl.minimum((part + 1) * chunk, KSEL), BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        valid = j < KSEL
        t = tl.load(idx_ptr + row * KSEL + j, mask=valid, other=0).to(tl.int64)
        kk = tl.load(k_ptr + row * S * D + t[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.where(valid[None, :], tl.dot(qv, tl.trans(kk)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(v_ptr + row * S * D + t[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    tl.store(out_ptr + ((row * NPROG + part) * G + tl.arange(0, G))[:, None] * D + d[None, :], acc / l_i[:, None])


def stream(klr, q, out, nprog=1, block_s=256, **launch):
    """klr (R, S, d), q (R, G_PAD, d) 16-bit (or fp32 under the interpreter), out (R, S) fp32."""
    R, S, d = klr.shape
    _stream_kernel[(R, nprog)](klr, q, out, S, nprog, D_LR=d, BLOCK_S=block_s, G=q.shape[1], **launch)
    return out


def gather(k, v, idx, q, out, nprog=1, block_n=128, **launch):
    """k / v (R, S, D), idx (R, KSEL) int32, q (R, G_PAD, D), out (R * nprog, G_PAD, D) fp32."""
    R, S, Dh = k.shape
    _gather_kernel[(R, nprog)](k, v, idx, q, out, S, idx.shape[1], nprog, D=Dh, BLOCK_N=block_n, G=q.shape[1],
                               **launch)
    return out


def _graph_us(fn, n_copies):
    from .bench import bench_graph
    return bench_graph(fn, rep=20) * 1e3 / n_copies


def _best(rows):
    return min(rows, key=lambda r: r["us"])


def measure(S_list=(16384, 65536), B=16, log=print):
    """Best stream (d = D/4, D/8) and gather (k = 1/4, 1/8, 1/16) time per context, SDPA alongside; rows of dicts."""
    from .reference import dense_sdpa
    dev, R, rows = "cuda", B * KVH, []
    for S in S_list:
        for d in (D // 4, D // 8):
            n = max(1, math.ceil(300e6 / (R * S * d * 2)))
            cps = [torch.randn(R, S, d, device=dev, dtype=torch.bfloat16) for _ in range(n)]
            q = torch.randn(R, G_PAD, d, device=dev, dtype=torch.bfloat16)
            out = torch.empty(R, S, device=dev, dtype=torch.float32)
            for nprog, bs, nw, ns in itertools.product((1, 4, 32), (128, 256, 512), (4, 8), (2, 3, 4)):
                t = _graph_us(lambda: [stream(c, q, out, nprog, bs, num_warps=nw, num_stages=ns) for c in cps], n)
                rows.append(dict(kind="stream", context=S, d=d, nprog=nprog, block=bs, warps=nw, stages=ns, us=t,
                                 MB=(R * S * d * 2 + R * S * 4) / 1e6))
            b = _best([r for r in rows if r["kind"] == "stream" and r["context"] == S and r["d"] == d])
            log(f"stream  S={S:6d} d={d:3d}: {b['us']:7.1f} us  {b['MB'] / b['us']:.2f} TB/s  "
                f"({b['nprog']} programs per row, {b['block']} tokens, {b['warps']} warps, {b['stages']} stages)")
            del cps
        n = max(1, math.ceil(400e6 / (R * S * 2 * D * 2)))
        K = [torch.randn(R, S, D, device=dev, dtype=torch.bfloat16) for _ in range(n)]
        V = [torch.randn(R, S, D, device=dev, dtype=torch.bfloat16) for _ in range(n)]
        q = torch.randn(R, G_PAD, D, device=dev, dtype=torch.bfloat16) * D ** -0.5
        kq = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
        t = _graph_us(lambda: [dense_sdpa(kq, kk.view(B, KVH, S, D), vv.view(B, KVH, S, D)) for kk, vv in zip(K, V)],
                      n)
        rows.append(dict(kind="sdpa", context=S, us=t))
        log(f"sdpa    S={S:6d}: {t:7.1f} us")
        for kf in (4, 8, 16):
            ksel = S // kf
            idx = [torch.sort(torch.rand(R, S, device=dev).argsort(dim=1)[:, :ksel].to(torch.int32), dim=1)
                   .values.contiguous() for _ in range(n)]
            for nprog, bn, nw, ns in itertools.product((1, 2, 4), (64, 128), (4, 8), (2, 3, 4)):
                out = torch.empty(R * nprog, G_PAD, D, device=dev, dtype=torch.float32)
                t = _graph_us(lambda: [gather(K[i], V[i], idx[i], q, out, nprog, bn, num_warps=nw, num_stages=ns)
                                       for i in range(n)], n)
                rows.append(dict(kind="gather", context=S, k_frac=kf, nprog=nprog, block=bn, warps=nw, stages=ns,
                                 us=t, MB=2 * R * ksel * D * 2 / 1e6))
            b = _best([r for r in rows if r["kind"] == "gather" and r["context"] == S and r["k_frac"] == kf])
            log(f"gather  S={S:6d} k=1/{kf:<2d}: {b['us']:7.1f} us  {b['MB'] / b['us']:.2f} TB/s  "
                f"({b['nprog']} programs per row, {b['block']} tokens, {b['warps']} warps, {b['stages']} stages)")
        del K, V
        torch.cuda.empty_cache()
    return rows


def floor_table(rows):
    """Per acceptance point: best stream + best gather against SDPA / target."""
    lines = ["| ctx | (d, k) | stream | gather | sum | SDPA / target | left for rotation + selection |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    out = []
    for S in sorted({r["context"] for r in rows}):
        sdpa = _best([r for r in rows if r["kind"] == "sdpa" and r["context"] == S])["us"]
        for (df, kf), target in TARGETS.items():
            st = _best([r for r in rows if r["kind"] == "stream" and r["context"] == S and r["d"] == D // df])["us"]
            ga = _best([r for r in rows if r["kind"] == "gather" and r["context"] == S and r["k_frac"] == kf])["us"]
            budget = sdpa / target
            out.append(dict(context=S, d=D // df, k_frac=kf, stream_us=st, gather_us=ga, sum_us=st + ga,
                            sdpa_us=sdpa, target=target, budget_us=budget, left_us=budget - st - ga))
            lines.append(f"| {S // 1024}K | (D/{df}, 1/{kf}) | {st:.1f} | {ga:.1f} | {st + ga:.1f} | {budget:.1f} | "
                         f"{budget - st - ga:+.1f} |")
    return "\n".join(lines), out


def smoke(device="cpu"):
    """Both kernels against float64 torch on tiny shapes: fp32 on the CPU (TRITON_INTERPRET=1), bf16 on a GPU (the
    reference takes the same bf16 values).  Returns the largest absolute errors (scores, attention output)."""
    torch.manual_seed(0)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    R, S, d, Dh, ksel = 3, 200, 16, 64, 40
    klr, q = torch.randn(R, S, d).to(dt), torch.randn(R, G_PAD, d).to(dt)
    out = stream(klr.to(device), q.to(device), torch.empty(R, S, device=device), nprog=2, block_s=32)
    err_s = (out.cpu().double() - (klr.double() @ q.double().transpose(1, 2)).amax(-1)).abs().max().item()
    K, V = torch.randn(R, S, Dh).to(dt), torch.randn(R, S, Dh).to(dt)
    qd = (torch.randn(R, G_PAD, Dh) * Dh ** -0.5).to(dt)
    idx = torch.sort(torch.rand(R, S).argsort(1)[:, :ksel].to(torch.int32), 1).values.contiguous()
    o = gather(K.to(device), V.to(device), idx.to(device), qd.to(device), torch.empty(R, G_PAD, Dh, device=device),
               nprog=1, block_n=16)
    Ks, Vs = (torch.gather(x.double(), 1, idx.long()[..., None].expand(-1, -1, Dh)) for x in (K, V))
    err_g = (o.cpu().double() - torch.softmax(qd.double() @ Ks.transpose(1, 2), -1) @ Vs).abs().max().item()
    return err_s, err_g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write every measured configuration and the table to this file")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter check of the two kernels (no timing)")
    ap.add_argument("--contexts", default="16384,65536", help="comma list of contexts (batch 16)")
    args = ap.parse_args(argv)
    if args.smoke:
        err_s, err_g = smoke("cuda" if torch.cuda.is_available() else "cpu")
        print(f"stream max abs err {err_s:.2e}, gather max abs err {err_g:.2e}")
        return dict(stream_err=err_s, gather_err=err_g)
    assert torch.cuda.is_available(), "the floor needs a CUDA device (or --smoke)"
    rows = measure(tuple(int(s) for s in args.contexts.split(",")), log=lambda *a: print(*a, flush=True))
    table, points = floor_table(rows)
    print("\n" + table, flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           points=points, rows=rows), f, indent=1)
        os.replace(tmp, args.json)
    return points


if __name__ == "__main__":
    main()
