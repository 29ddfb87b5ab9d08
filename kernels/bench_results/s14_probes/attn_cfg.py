"""The real sparse attention kernel (rows layout, whole K rows) under tile configs, against the plain gather probe."""
import json, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch
import kernels.bench as kb
from kernels.attention import sparse_decode_attention
from kernels.bracket import loki_select_bracket
from fixed import _gather_k

kb.LAYOUT = "rows"
CFGS = {"default": None, "bn128s3": dict(block_n=128, num_stages=3), "bn128s2": dict(block_n=128, num_stages=2),
        "bn128s4": dict(block_n=128, num_stages=4), "bn128s3_noahead": dict(block_n=128, num_stages=3, ahead=False),
        "bn64s3_noahead": dict(block_n=64, num_stages=3, ahead=False), "bn128s3_w2": dict(block_n=128, num_stages=3, waves=2)}
res = []
for B, S, d, k in ((16, 65536, 32, 8192), (16, 65536, 16, 4096), (16, 65536, 32, 16384), (16, 16384, 32, 4096),
                   (16, 16384, 32, 2048), (16, 16384, 16, 1024)):
    case = kb.Case(B, S, d, kb.n_copies_for(B, S, d), layout="rows")
    L, q, P = case.lengths, case.q, case.P
    idx, q_rot = loki_select_bracket(q, case.sc(case.copies[0][0]), L, k, P=P, strict=False)
    idx_sorted = torch.sort(idx, dim=-1).values.contiguous()
    r = dict(B=B, S=S, d=d, k=k)
    ref = sparse_decode_attention(q_rot, *case.copies[0], idx, strict=False)
    for name, cfg in CFGS.items():
        for order, ix in (("sel", idx), ("sorted", idx_sorted)):
            try:
                o = sparse_decode_attention(q_rot, *case.copies[0], ix, config=cfg, strict=False)
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                t = kb.timed(case, lambda a, b_, c: sparse_decode_attention(q_rot, a, b_, c, ix, config=cfg, strict=False), 20)
                r[f"{name}_{order}_us"] = round(t * 1e3, 2)
                r[f"{name}_{order}_err"] = err
            except Exception as e:
                r[f"{name}_{order}_us"] = repr(e)[:200]
    Rr = B * kb.KVH
    G = 16
    q16 = torch.zeros(Rr, G, kb.D, device="cuda", dtype=torch.bfloat16)
    q16[:, :kb.H // kb.KVH] = (q_rot * kb.D ** -0.5).view(Rr, kb.H // kb.KVH, kb.D).to(torch.bfloat16)
    out = torch.empty(Rr * 2, G, kb.D, device="cuda", dtype=torch.float32)
    a0 = case.copies[0][0]
    for order, ix in (("sel", idx), ("sorted", idx_sorted)):
        def g(a, b_, c, ix=ix):
            K = a.as_strided((B, kb.KVH, S, kb.D), a.stride())
            _gather_k[(Rr, 2)](K, c, ix, q16, out, S, k, 2, D=kb.D, BLOCK_N=128, G=G, num_warps=4, num_stages=3)
        K0 = a0.as_strided((B, kb.KVH, S, kb.D), a0.stride())
        assert K0.is_contiguous() and case.copies[0][2].is_contiguous(), (a0.stride(), case.copies[0][2].stride())
        r[f"probe_{order}_us"] = round(kb.timed(case, g, 20) * 1e3, 2)
    print(json.dumps(r), flush=True)
    res.append(r)
    del case
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "attn_cfg.json"), "w"), indent=1)
