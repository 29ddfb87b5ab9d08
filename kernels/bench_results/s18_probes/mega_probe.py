"""Session 18 probe: does one persistent kernel with per-row dependencies hide the selection behind the two passes?

    PYTHONPATH=. python3 kernels/bench_results/s18_probes/mega_probe.py OUT.json      # H200, call s18a
    PYTHONPATH=. python3 kernels/bench_results/s18_probes/mega_probe.py OUT.json --dispatch   # call s18b
    PYTHONPATH=. python3 kernels/bench_results/s18_probes/mega_probe.py OUT.json --memset     # call s18c
    TRITON_INTERPRET=1 PYTHONPATH=. python kernels/bench_results/s18_probes/mega_probe.py --smoke   # CPU check

kernels/NOTES.md v16 item 2: at 16K the two plainest passes (stream + gather) already take 86-93% of the budgets,
and the step adds ~20 us of rotation and selection *between* them (a chain of kernel boundaries).  The untried
structure (NOTES "Where it stands"): one persistent kernel whose programs take tasks from a queue in a fixed
order - stream(row, chunk), select(row), gather(row, chunk) - each waiting only for its own row's predecessors
(per-row counters, release / acquire), so row r's selection runs while later rows stream and row r's gathers
start before the last rows have streamed.  No grid barrier (v16 item 3 lost its saving to one).

The selection here is a stand-in with a knob, not Loki's: a compaction pass over the row's fp32 scores against a
given threshold (the row's (k+1)-th largest score, from torch), repeated PASSES times (each pass a serial chain of
block loads, prefix sums and a carry, like the classify / band-select kernels).  Measured for each point:
  sep2   : stream kernel + gather kernel over precomputed indices (the two-pass floor, as kernels.floor)
  sep3   : stream + select + gather as three kernels (the chain of boundaries)
  mega2  : one persistent kernel, stream + gather tasks (gathers wait for their row's stream)
  mega3  : one persistent kernel, stream + select + gather tasks
Each call zeroes a small sync buffer first (a memset node, in every variant).  The gather keeps real partials
(m, l, acc per chunk) and its row's last chunk combines them (an output, checked against torch).
"""
from __future__ import annotations

import itertools
import json
import math
import sys

import torch
import triton
import triton.language as tl

SMOKE = "--smoke" in sys.argv
D, G, G_PAD = 128, 4, 16
KD, KG, KGP = tl.constexpr(D), tl.constexpr(G), tl.constexpr(G_PAD)  # (the kernels' view)
rows_out = []


@triton.jit
def _spin(flag_ptr, target, to_ptr, SPIN_MAX):
    c = tl.atomic_add(flag_ptr, 0, sem="acquire")
    it = 0
    while (c < target) & (it < SPIN_MAX):
        c = tl.atomic_add(flag_ptr, 0, sem="acquire")
        it += 1
    if c < target:
        tl.atomic_add(to_ptr, 1)


@triton.jit
def _stream_task(r, c, slab_ptr, qlr_ptr, sc_ptr, done_ptr, S, CS, DL: tl.constexpr, BS: tl.constexpr,
                 ST: tl.constexpr):
    r = r.to(tl.int64)
    dl = tl.arange(0, DL)
    hh = tl.arange(0, KGP)
    qv = tl.load(qlr_ptr + r * KGP * DL + hh[:, None] * DL + dl[None, :])
    for s0 in tl.range(c * CS, c * CS + CS, BS, num_stages=ST):
        offs = s0 + tl.arange(0, BS)
        k = tl.load(slab_ptr + (r * S + offs)[:, None] * DL + dl[None, :])
        sc = tl.dot(k, tl.trans(qv))
        sc = tl.where((hh < KG)[None, :], sc, float("-inf"))
        tl.store(sc_ptr + r * S + offs, tl.max(sc, axis=1))
    tl.debug_barrier()
    tl.atomic_add(done_ptr + r, 1, sem="release")


@triton.jit
def _select_task(r, thr_ptr, sc_ptr, idx_ptr, done_ptr, S, KMAX, PASSES, SB: tl.constexpr):
    r = r.to(tl.int64)
    thr = tl.load(thr_ptr + r)
    base = 0
    for p in range(PASSES):
        base = 0
        for s0 in range(0, S, SB):
            offs = s0 + tl.arange(0, SB)
            s = tl.load(sc_ptr + r * S + offs, cache_modifier=".cg")
            m = s > thr
            pos = base + tl.cumsum(m.to(tl.int32), 0) - 1
            tl.store(idx_ptr + r * KMAX + pos, offs, mask=m & (pos < KMAX))
            base += tl.sum(m.to(tl.int32), 0)
    for p0 in range(0, KMAX, SB):
        offs = p0 + tl.arange(0, SB)
        tl.store(idx_ptr + r * KMAX + offs, -1, mask=(offs >= base) & (offs < KMAX))
    tl.debug_barrier()
    tl.atomic_add(done_ptr + r, 1, sem="release")


@triton.jit
def _gather_task(r, c, kv_ptr, q_ptr, idx_ptr, mp_ptr, lp_ptr, op_ptr, out_ptr, cnt_ptr, S, KMAX, CG, NCHG,
                 BN: tl.constexpr, NCHG_P2: tl.constexpr, ST: tl.constexpr):
    r = r.to(tl.int64)
    d = tl.arange(0, KD)
    hh = tl.arange(0, KGP)
    qv = tl.load(q_ptr + r * KGP * KD + hh[:, None] * KD + d[None, :])
    m_i = tl.full([KGP], -1.0e30, tl.float32)
    l_i = tl.zeros([KGP], tl.float32)
    acc = tl.zeros([KGP, KD], tl.float32)
    for n0 in tl.range(c * CG, c * CG + CG, BN, num_stages=ST):
        j = n0 + tl.arange(0, BN)
        t = tl.load(idx_ptr + r * KMAX + j, cache_modifier=".cg")
        valid = t >= 0
        t = tl.where(valid, t, 0).to(tl.int64)
        row = kv_ptr + (r * S + t)[:, None] * (2 * KD)
        kk = tl.load(row + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.where(valid[None, :], tl.dot(qv, tl.trans(kk)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(row + KD + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new
    hm = hh < KG
    part = (r * NCHG + c) * KG + hh
    tl.store(mp_ptr + part, m_i, mask=hm)
    tl.store(lp_ptr + part, l_i, mask=hm)
    tl.store(op_ptr + part[:, None] * KD + d[None, :], acc, mask=hm[:, None])
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel")
    if done == NCHG - 1:
        cc = tl.arange(0, NCHG_P2)
        cm = cc < NCHG
        for h in tl.static_range(KG):
            pp = (r * NCHG + cc) * KG + h
            m = tl.load(mp_ptr + pp, mask=cm, other=-1.0e30, cache_modifier=".cg")
            l = tl.load(lp_ptr + pp, mask=cm, other=0.0, cache_modifier=".cg")
            a = tl.load(op_ptr + pp[:, None] * KD + d[None, :], mask=cm[:, None], other=0.0, cache_modifier=".cg")
            w = tl.where(cm, tl.exp2(m - tl.max(m, 0)), 0.0)
            o = tl.sum(w[:, None] * a, 0) / tl.sum(w * l, 0)
            tl.store(out_ptr + (r * KG + h) * KD + d, o.to(out_ptr.dtype.element_ty))
        tl.atomic_xchg(cnt_ptr + r, 0)  # (self-resetting: variant sep2n runs without the per-call memset)


@triton.jit
def _kernel(tasks_ptr, NTASK, sync_ptr, slab_ptr, kv_ptr, qlr_ptr, q_ptr, thr_ptr, sc_ptr, idx_ptr, mp_ptr, lp_ptr,
            op_ptr, out_ptr, S, KMAX, NCH, CS, NCHG, CG, R, PASSES, SPIN_MAX,
            MODE: tl.constexpr, WITH_SEL: tl.constexpr, DL: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
            SB: tl.constexpr, NCHG_P2: tl.constexpr, ST_S: tl.constexpr, ST_G: tl.constexpr,
            DISPATCH: tl.constexpr = 0):
    """MODE 0: persistent, tasks from the queue (sync[0]); 1 / 2 / 3: one task per program, stream / select /
    gather.  sync: [queue, streamed[R], selected[R], gathered[R], timeouts]."""
    streamed = sync_ptr + 1
    selected = sync_ptr + 1 + R
    gathered = sync_ptr + 1 + 2 * R
    to_ptr = sync_ptr + 1 + 3 * R
    if MODE == 0:
        # DISPATCH 0: a queue (one atomic per task, waited for before the task); 1: the queue with the next task
        # taken (and its descriptor loaded) before the current one runs; 2: static round robin (task pid + i * NPROG,
        # no atomic; needs every program resident), the next descriptor loaded ahead
        if DISPATCH == 2:
            t = tl.program_id(0)
        else:
            t = tl.atomic_add(sync_ptr, 1)
        tn = t
        typ_n = tl.load(tasks_ptr + 3 * t, mask=t < NTASK, other=0)
        r_n = tl.load(tasks_ptr + 3 * t + 1, mask=t < NTASK, other=0)
        c_n = tl.load(tasks_ptr + 3 * t + 2, mask=t < NTASK, other=0)
        while t < NTASK:
            typ, r, c = typ_n, r_n, c_n
            if DISPATCH == 2:
                tn = t + tl.num_programs(0)
            elif DISPATCH == 1:
                tn = tl.atomic_add(sync_ptr, 1)
            if DISPATCH != 0:
                typ_n = tl.load(tasks_ptr + 3 * tn, mask=tn < NTASK, other=0)
                r_n = tl.load(tasks_ptr + 3 * tn + 1, mask=tn < NTASK, other=0)
                c_n = tl.load(tasks_ptr + 3 * tn + 2, mask=tn < NTASK, other=0)
            if typ == 0:
                _stream_task(r, c, slab_ptr, qlr_ptr, sc_ptr, streamed, S, CS, DL, BS, ST_S)
            elif typ == 1:
                _spin(streamed + r, NCH, to_ptr, SPIN_MAX)
                _select_task(r, thr_ptr, sc_ptr, idx_ptr, selected, S, KMAX, PASSES, SB)
            else:
                if WITH_SEL:
                    _spin(selected + r, 1, to_ptr, SPIN_MAX)
                else:
                    _spin(streamed + r, NCH, to_ptr, SPIN_MAX)
                _gather_task(r, c, kv_ptr, q_ptr, idx_ptr, mp_ptr, lp_ptr, op_ptr, out_ptr, gathered, S, KMAX, CG,
                             NCHG, BN, NCHG_P2, ST_G)
            if DISPATCH == 0:
                t = tl.atomic_add(sync_ptr, 1)
                typ_n = tl.load(tasks_ptr + 3 * t, mask=t < NTASK, other=0)
                r_n = tl.load(tasks_ptr + 3 * t + 1, mask=t < NTASK, other=0)
                c_n = tl.load(tasks_ptr + 3 * t + 2, mask=t < NTASK, other=0)
            else:
                t = tn
    elif MODE == 1:
        pid = tl.program_id(0)
        _stream_task(pid // NCH, pid % NCH, slab_ptr, qlr_ptr, sc_ptr, streamed, S, CS, DL, BS, ST_S)
    elif MODE == 2:
        _select_task(tl.program_id(0), thr_ptr, sc_ptr, idx_ptr, selected, S, KMAX, PASSES, SB)
    else:
        pid = tl.program_id(0)
        _gather_task(pid // NCHG, pid % NCHG, kv_ptr, q_ptr, idx_ptr, mp_ptr, lp_ptr, op_ptr, out_ptr, gathered, S,
                     KMAX, CG, NCHG, BN, NCHG_P2, ST_G)


def task_table(R, NCH, NCHG, with_sel, lag_sel, lag_gat, device):
    """Queue order: row r's stream tasks, then the select of row r - lag_sel, then the gathers of row
    r - lag_sel - lag_gat (the rest at the end, in row order).  Every task's predecessors come earlier."""
    t = []
    sel_next = gat_next = 0
    for r in range(R + lag_sel + lag_gat + 1):
        if r < R:
            t += [(0, r, c) for c in range(NCH)]
        while with_sel and sel_next < R and sel_next <= r - lag_sel:
            t.append((1, sel_next, 0))
            sel_next += 1
        while gat_next < R and gat_next <= r - lag_sel - lag_gat and (not with_sel or gat_next < sel_next):
            t += [(2, gat_next, c) for c in range(NCHG)]
            gat_next += 1
    assert len(t) == R * NCH + (R if with_sel else 0) + R * NCHG
    return torch.tensor(t, dtype=torch.int32, device=device).flatten()


class Point:
    def __init__(self, R, S, DL, KSEL, n_copies, dev, dt):
        self.R, self.S, self.DL, self.K = R, S, DL, KSEL
        g = torch.Generator(device="cpu").manual_seed(0)
        self.slabs, self.kvs = [], []
        for _ in range(n_copies):
            self.slabs.append(torch.randn(R, S, DL, generator=g).to(dev, dt))
            self.kvs.append(torch.randn(R, S, 2 * D, generator=g).to(dev, dt))
        self.qlr = torch.zeros(R, G_PAD, DL, device=dev, dtype=dt)
        self.qlr[:, :G] = torch.randn(R, G, DL, generator=g).to(dev, dt)
        self.q = torch.zeros(R, G_PAD, D, device=dev, dtype=dt)
        self.q[:, :G] = (torch.randn(R, G, D, generator=g) * D ** -0.5 * 1.4426950408889634).to(dev, dt)
        self.q[:, :G, :DL] = self.qlr[:, :G]  # (q' starts with the scored dims, as in Loki)
        sc = (self.slabs[0].float() @ self.qlr[:, :G].float().transpose(1, 2)).amax(-1)  # (R, S)
        self.thr = torch.topk(sc, KSEL + 1, dim=-1).values[:, -1].contiguous()  # > thr: k tokens (no ties)
        self.idx_pre = torch.topk(sc, KSEL, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
        self.sc = torch.empty(R, S, device=dev, dtype=torch.float32)
        self.idx = torch.empty(R, KSEL, device=dev, dtype=torch.int32)
        self.out = torch.empty(R, G, D, device=dev, dtype=dt)
        self.sync = torch.zeros(1 + 3 * R + 1, device=dev, dtype=torch.int32)
        self._tasks, self._wsd = {}, {}

    def run(self, variant, cfg, copy=0):
        R, S, DL, K = self.R, self.S, self.DL, self.K
        NCH, NCHG = cfg["nch"], cfg["nchg"]
        CS, CG = S // NCH, K // NCHG
        assert CS % cfg["bs"] == 0 and CG % cfg["bn"] == 0 and S % cfg["sb"] == 0
        with_sel = variant in ("sep3", "mega3")
        idx = self.idx if with_sel else self.idx_pre
        mp = self._ws(R * NCHG * G)
        common = dict(S=S, KMAX=K, NCH=NCH, CS=CS, NCHG=NCHG, CG=CG, R=R, PASSES=cfg["passes"], SPIN_MAX=1 << 18,
                      WITH_SEL=with_sel, DL=DL, BS=cfg["bs"], BN=cfg["bn"], SB=cfg["sb"],
                      NCHG_P2=max(2, triton.next_power_of_2(NCHG)), ST_S=cfg["st_s"], ST_G=cfg["st_g"],
                      DISPATCH=cfg.get("dispatch", 0))
        args = lambda tasks, nt: (tasks, nt, self.sync, self.slabs[copy], self.kvs[copy], self.qlr, self.q, self.thr,
                                  self.sc, idx, mp[0], mp[1], mp[2], self.out)
        if variant != "sep2n":  # (sep2n: no memset; the gather's counters reset themselves, nothing else waits)
            self.sync.zero_()
        nw = cfg["warps"]
        if variant.startswith("sep"):
            _kernel[(R * NCH,)](*args(self.sync, 0), MODE=1, num_warps=nw, **common)
            if with_sel:
                _kernel[(R,)](*args(self.sync, 0), MODE=2, num_warps=nw, **common)
            _kernel[(R * NCHG,)](*args(self.sync, 0), MODE=3, num_warps=nw, **common)
        else:
            key = (with_sel, NCH, NCHG, cfg["lag_sel"], cfg["lag_gat"])
            if key not in self._tasks:
                self._tasks[key] = task_table(R, NCH, NCHG, with_sel, cfg["lag_sel"], cfg["lag_gat"],
                                              self.sc.device)
            tasks = self._tasks[key]
            nprog = cfg["nprog"]
            _kernel[(nprog,)](*args(tasks, tasks.numel() // 3), MODE=0, num_warps=nw, **common)

    def _ws(self, n):
        if n not in self._wsd:
            dev = self.sc.device
            self._wsd[n] = (torch.empty(n, device=dev), torch.empty(n, device=dev), torch.empty(n * D, device=dev))
        return self._wsd[n]

    def check(self, variant):
        """Output against torch over the indices the variant attended to; timeouts must be 0."""
        with_sel = variant in ("sep3", "mega3")
        idx = (self.idx if with_sel else self.idx_pre).long()
        kv = self.kvs[0].double()
        err = 0.0
        for r in range(self.R):
            sel = idx[r][idx[r] >= 0]
            kk, vv = kv[r, sel, :D], kv[r, sel, D:]
            s = self.q[r, :G].double() @ kk.T * math.log(2)  # (q carries log2(e): exp2 in the kernel)
            ref = torch.softmax(s, -1) @ vv
            err = max(err, ((self.out[r].double() - ref).abs().max() / ref.abs().max()).item())
        n_sel = int((self.idx >= 0).sum(-1).min()) if with_sel else self.K
        same = bool((self.idx.sort(-1).values == self.idx_pre).all()) if with_sel else True
        return dict(rel_err=err, timeouts=int(self.sync[-1]), min_selected=n_sel, same_as_topk=same)


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    out_json = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    if SMOKE:
        pts = [(4, 512, 32, 128), (4, 512, 16, 32)]
        base = dict(nch=4, nchg=2, bs=64, bn=16, sb=128, st_s=1, st_g=1, warps=4, passes=2, nprog=3, lag_sel=1,
                    lag_gat=1)
        for R, S, DL, K in pts:
            p = Point(R, S, DL, K, 1, dev, dt)
            for v, disp in (("sep2", 0), ("sep2n", 0), ("sep3", 0), ("mega2", 0), ("mega3", 0), ("mega3", 1)):
                p.out.zero_()
                p.run(v, dict(base, dispatch=disp))
                print("smoke", (R, S, DL, K), v, "dispatch", disp, p.check(v), flush=True)
        return
    from kernels.bench import bench_graph
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    R = 128
    pts = [(R, 16384, 32, 4096), (R, 16384, 32, 2048), (R, 16384, 16, 1024)]
    if "--64k" in sys.argv:
        pts.append((R, 65536, 32, 8192))
    for R, S, DL, K in pts:
        n = 2
        p = Point(R, S, DL, K, n, dev, dt)

        def timed(variant, cfg):
            try:
                us = bench_graph(lambda: [p.run(variant, cfg, c) for c in range(n)], rep=20) * 1e3 / n
            except Exception as e:  # (out of resources ...)
                print("skip", variant, cfg, type(e).__name__, str(e).splitlines()[0][:100] if str(e) else "",
                      flush=True)
                return None
            p.run(variant, cfg, 0)
            torch.cuda.synchronize()
            chk = p.check(variant) if cfg.get("check") else dict(timeouts=int(p.sync[-1]))
            row = dict(R=R, S=S, d=DL, k=K, variant=variant, us=us, **{k: v for k, v in cfg.items() if k != "check"},
                       **chk)
            rows_out.append(row)
            return row

        def best(variant, cfgs):
            rs = [x for x in (timed(variant, c) for c in cfgs) if x is not None]
            b = min(rs, key=lambda x: x["us"])
            print(f"S={S:6d} d={DL:3d} k={K:5d} {variant:6s} best {b['us']:7.1f} us  "
                  + str({k: b[k] for k in ('nch', 'nchg', 'bs', 'bn', 'st_s', 'st_g', 'warps', 'nprog', 'lag_sel',
                                           'lag_gat', 'passes', 'dispatch', 'timeouts')}), flush=True)
            return b

        base = dict(nch=32, nchg=2, bs=256, bn=128, sb=2048, st_s=3, st_g=3, warps=4, passes=1, nprog=sms * 2,
                    lag_sel=2, lag_gat=4, dispatch=0)
        res = {}
        if "--memset" in sys.argv:  # third call (s18c): the two-pass floor with the combine, with / without the memset
            cf = [dict(base, nchg=ng, bn=bn, st_g=sg) for ng, bn, sg in itertools.product((1, 2, 4), (64, 128), (2, 3))]
            res["sep2"] = best("sep2", cf)
            res["sep2n"] = best("sep2n", cf)
            if S == pts[0][1] and DL == pts[0][2] and K == pts[0][3]:
                ms = bench_graph(lambda: [p.sync.zero_() for _ in range(n)], rep=20) * 1e3 / n
                rows_out.append(dict(variant="memset alone", us=ms))
                print(f"memset alone (graph node): {ms:.2f} us", flush=True)
            cfgs = []
        elif "--dispatch" in sys.argv:  # second call (s18b): the dispatch's latency; sep at call a's best configuration
            sep = dict(base, st_g=2)
            res["sep2"] = best("sep2", [sep])
            res["sep3_p1"] = best("sep3", [sep])
            for v in ("mega2", "mega3"):
                for disp in (0, 1, 2):
                    cf = [dict(base, dispatch=disp, nchg=ng, bn=64, st_g=sg, nprog=sms * pp, lag_sel=8, lag_gat=lg)
                          for ng, sg, pp, lg in itertools.product((2, 4), (2, 3), (2, 3), (4, 16))
                          if disp != 2 or (pp == 2 and sg == 2)]  # (static: every program resident)
                    res[f"{v}_d{disp}"] = best(v, cf)
            cfgs = []
        else:
            cfgs = (1, 3)
        for passes in cfgs:
            cf = [dict(base, passes=passes, nchg=ng, bn=bn, st_g=sg) for ng, bn, sg in
                  itertools.product((2, 4), (64, 128), (2, 3))]
            if passes == 1:
                res["sep2"] = best("sep2", cf)
            res[f"sep3_p{passes}"] = best("sep3", cf)
            mcf = [dict(base, passes=passes, nchg=ng, bn=bn, st_g=sg, nprog=sms * pp, lag_sel=ls, lag_gat=lg)
                   for ng, bn, sg, pp, ls, lg in itertools.product((2, 4), (64, 128), (2, 3), (2, 4), (2, 8),
                                                                   (4, 16))]
            if passes == 1:
                res["mega2"] = best("mega2", [c for c in mcf if c["lag_sel"] == 2])
            res[f"mega3_p{passes}"] = best("mega3", mcf)
        for k, b in res.items():  # correctness of each best configuration
            timed(b["variant"], dict({kk: b[kk] for kk in base}, check=True))
            print("check", k, {kk: rows_out[-1][kk] for kk in ("rel_err", "timeouts", "min_selected",
                                                                 "same_as_topk")}, flush=True)
        del p
        torch.cuda.empty_cache()
        if out_json:
            json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, rows=rows_out),
                      open(out_json, "w"), indent=1)


if __name__ == "__main__":
    main()
