import itertools, json, math, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton, triton.language as tl
from fixed import graph_time
from percta import _stream

def main():
    dev = "cuda"; R, G = 128, 16
    res = []
    for S, dlr in ((16384, 16), (16384, 32), (65536, 16), (4096, 32)):
        ncp = max(1, math.ceil(300e6 / (R * S * dlr * 2)))
        cps = [torch.randn(R, S, dlr, device=dev, dtype=torch.bfloat16) for _ in range(ncp)]
        q = torch.randn(R, G, dlr, device=dev, dtype=torch.bfloat16)
        scr = torch.empty(R, S, device=dev, dtype=torch.float32)
        dst = torch.empty_like(cps[0])
        cp = graph_time(lambda: [dst.copy_(c) for c in cps]) / ncp
        mb = R * S * dlr * 2 / 1e6
        print(f"S={S} d={dlr} slab {mb:.1f} MB copy(read+write) {cp:.2f} us", flush=True)
        best = None
        for nprog, bs, nw, ns in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512), (4, 8), (2, 3, 4, 6)):
            if S // nprog < bs:
                continue
            try:
                f = lambda: [_stream[(R, nprog)](c, q, scr, S, nprog, D_LR=dlr, BLOCK_S=bs, G=G, num_warps=nw, num_stages=ns) for c in cps]
                t = graph_time(f, rep=20) / ncp
            except Exception as e:
                print("fail", nprog, bs, nw, ns, repr(e)[:100]); continue
            r = dict(S=S, d=dlr, nprog=nprog, block=bs, warps=nw, stages=ns, us=t, copy_us=cp, slab_MB=mb)
            res.append(r)
            if best is None or t < best["us"]:
                best = r
        top = sorted([r for r in res if r["S"] == S and r["d"] == dlr], key=lambda r: r["us"])[:8]
        for r in top:
            print("  ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        for npg in (1, 2, 4, 8, 16, 32):
            rr = [r for r in res if r["S"] == S and r["d"] == dlr and r["nprog"] == npg]
            if rr:
                b = min(rr, key=lambda r: r["us"])
                print(f"   nprog {npg}: best {b['us']:.2f} us ({b['block']},{b['warps']}w,{b['stages']}s)", flush=True)
        del cps
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "sweep_stream.json"), "w"))

main()
