"""The whole Loki decode step: rotate q, approximate scores, top-k, sparse flash-decoding.

    out = loki_decode(q, P, k_lr, k_rest, v, lengths, k_budget, mode="group", reduce="max", scaling=None)

path="auto" picks by the number of score rows (`choose_path`).
path="bracket": rotate q + sample bracket, scores with the selection pass fused in (many programs
per row), band select, then the sparse attention kernel (+ split combine); see bracket.py.
path="fused": one kernel rotates q, scores each row and selects its top-k (one program per row).
path="split": rotate_q, loki_scores (many programs per row), topk_select, sparse attention.
path="torch_topk": split path with torch.topk instead of the Triton selection.
sink_tokens / local_window (always-selected positions) are supported on the bracket path.

streams=n (n > 1, bracket path) splits the batch into n chunks, each on its own CUDA stream (chunk 0 on the
current one), pipelined: chunk i starts once chunk i-1 is scored, so that the chunks' latency-bound kernels (band
select, split combine) overlap the next chunk's bandwidth-bound ones.  Inside a CUDA graph the chunks are
parallel branches.  On the CPU (interpreter) the chunks run one after the other, with the same results.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ._utils import LokiInputError, check, check_cache, check_float, check_lengths, num_sms
from .attention import sparse_decode_attention
from .bracket import bracket_workspace_size, loki_select_bracket
from .scores import loki_scores, rotate_q
from .topk import _budget_args, loki_select, topk_select


PATHS = ("auto", "bracket", "fused", "split", "torch_topk")
AUTO_PATH: str | None = None  # when set, path="auto" resolves to it (benchmarks compare paths inside a whole model)
AUTO_STREAMS: int | None = None  # when set, streams=None resolves to it (else `choose_streams`)
_SIDE_STREAMS: dict = {}


def choose_streams(B: int, rows: int, device) -> int:
    """Batch chunks on parallel streams: 1 unless AUTO_STREAMS says otherwise (measured: kernels/NOTES.md)."""
    return max(1, min(int(AUTO_STREAMS or 1), B)) if device.type == "cuda" else 1


def _side_stream(device, i: int) -> "torch.cuda.Stream":
    key = (device.index if device.index is not None else torch.cuda.current_device(), i)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key[0])
    return _SIDE_STREAMS[key]


def choose_path(B: int, rows: int, device, forced: bool = False) -> str:
    """Few score rows (batch 1): the bracket path, whose scoring pass spreads each row over many programs; enough
    rows to fill the GPU: the fused path (kernels/NOTES.md, v4).  Sinks / local window: the bracket path."""
    if forced:
        return "bracket"
    if AUTO_PATH is not None:
        return AUTO_PATH
    return "fused" if B * rows >= num_sms(device) // 2 else "bracket"


def loki_decode(q: torch.Tensor, P: torch.Tensor, k_lr: torch.Tensor, k_rest: torch.Tensor, v: torch.Tensor,
                lengths: torch.Tensor, k_budget, mode: str = "group", reduce: str = "max",
                scaling: float | None = None, strict: bool = True, path: str = "auto", k_max: int | None = None,
                return_indices: bool = False, num_splits: int | None = None,
                sink_tokens: int = 0, local_window: int = 0, streams: int | None = None,
                out: torch.Tensor | None = None):
    """One Loki decode step for one layer.

    q: (B, H, D) queries (not rotated; q' = q @ P[kvh] is computed inside, in fp32).
    P: (KVH, D, D) orthonormal PCA bases (columns sorted by variance).  Cache: see kv_cache.py.
    k_budget: int or (B,) int tensor: number of tokens kept per sequence (clipped to 1..lengths[b]; with
    strict=True a budget above a length raises, which costs one device->host sync).
    mode / reduce: see `loki_scores`.  scaling: defaults to 1/sqrt(D).
    streams: batch chunks run on parallel CUDA streams (see module doc; None: `choose_streams`).
    out: optional (B, H, D) output tensor (contiguous last dim).
    Returns out (B, H, D) in the cache dtype, or (out, idx) with return_indices=True.
    """
    B, KVH, S, D, d = check_cache(k_lr, k_rest, v)
    check_float(q, "q")
    check(q.dim() == 3 and q.shape[0] == B and q.shape[2] == D,
          f"q must be (B, H, D) with B={B}, D={D}, got {tuple(q.shape)}")
    check(q.shape[1] % KVH == 0, f"H={q.shape[1]} must be a multiple of KVH={KVH}")
    check_lengths(lengths, B, k_lr.device)
    check(mode in ("group", "head"), f"mode must be 'group' or 'head', got {mode!r}")
    check(path in PATHS, f"unknown path {path!r} (one of {', '.join(PATHS)})")
    if strict:
        check(bool((lengths <= S).all()), f"lengths exceed S_max={S}")
        _budget_args(k_budget, lengths, B, True, k_max)
    rows = KVH if mode == "group" else q.shape[1]
    if path == "auto":
        path = choose_path(B, rows, q.device, forced=bool(sink_tokens or local_window))
    if (sink_tokens or local_window) and path != "bracket":  # ("auto" resolved above)
        raise LokiInputError(f"sink_tokens/local_window need path='bracket' (got path={path!r})")
    n_chunks = choose_streams(B, rows, q.device) if streams is None else int(streams)
    check(n_chunks >= 1, f"streams must be >= 1, got {streams!r}")
    n_chunks = min(n_chunks, B)
    if n_chunks > 1:
        check(path == "bracket", f"streams > 1 needs path='bracket' (got path={path!r})")
        return _chunked(n_chunks, q, P, k_lr, k_rest, v, lengths, k_budget, mode, reduce, scaling, k_max,
                        return_indices, num_splits, sink_tokens, local_window, out)
    if path == "bracket":
        idx, q_rot = loki_select_bracket(q, k_lr, lengths, k_budget, P=P, mode=mode, reduce=reduce, scaling=scaling,
                                         strict=False, k_max=k_max, sink_tokens=sink_tokens,
                                         local_window=local_window)
    elif path == "fused":
        idx, q_rot = loki_select(q, k_lr, lengths, k_budget, P=P, mode=mode, reduce=reduce, scaling=scaling,
                                 strict=False, k_max=k_max)
    else:
        q_rot = rotate_q(q, P)
        scores = loki_scores(q_rot, k_lr, lengths, d=d, mode=mode, reduce=reduce, scaling=scaling)
        if path == "split":
            idx = topk_select(scores, lengths, k_budget, strict=False, k_max=k_max)
        else:
            check(isinstance(k_budget, int), "path='torch_topk' needs an int budget")
            kk = min(k_budget, S)
            vals, idx = torch.topk(scores, kk, dim=-1, sorted=False)
            idx = torch.where(torch.isinf(vals), torch.full_like(idx, -1), idx)
    out = sparse_decode_attention(q_rot, k_lr, k_rest, v, idx, scaling=scaling, num_splits=num_splits, out=out)
    return (out, idx) if return_indices else out


def _chunked(n_chunks, q, P, k_lr, k_rest, v, lengths, k_budget, mode, reduce, scaling, k_max, return_indices,
             num_splits, sink_tokens, local_window, out):
    """The bracket path over n_chunks slices of the batch, pipelined over streams: chunk i (on side stream i,
    chunk 0 on the current stream) starts when chunk i-1 has been scored, so that its bandwidth-bound scoring
    overlaps chunk i-1's latency-bound band select, and its band select chunk i-1's sparse attention."""
    B, H, D = q.shape
    _, _, KMAX = _budget_args(k_budget, lengths, B, False, k_max)
    if out is None:
        out = torch.empty(B, H, D, dtype=v.dtype, device=v.device)
    check(tuple(out.shape) == (B, H, D) and out.stride(-1) == 1, f"out must be ({B}, {H}, {D}), contiguous last dim")
    cuda = q.is_cuda
    cur = torch.cuda.current_stream(q.device) if cuda else None
    idxs, side, scored = [], [], None
    for i in range(n_chunks):
        b0, b1 = B * i // n_chunks, B * (i + 1) // n_chunks
        kb = k_budget[b0:b1] if isinstance(k_budget, torch.Tensor) else k_budget
        ctx = nullcontext()
        if cuda and i > 0:
            s = _side_stream(q.device, i)
            s.wait_stream(cur)  # inputs produced before this call
            s.wait_event(scored)
            side.append(s)
            ctx = torch.cuda.stream(s)
        with ctx:
            q_rot = torch.empty(b1 - b0, H, D, dtype=torch.float32, device=q.device)
            sel = dict(mode=mode, reduce=reduce, scaling=scaling, strict=False, k_max=KMAX, sink_tokens=sink_tokens,
                       local_window=local_window, q_rot_out=q_rot, classify="split",
                       workspace=torch.empty(bracket_workspace_size(b1 - b0, k_lr.shape[1] if mode == "group" else H,
                                                                    k_lr.shape[2]), dtype=torch.int32,
                                             device=q.device))
            args = (q[b0:b1], k_lr[b0:b1], lengths[b0:b1], kb)
            idx, _ = loki_select_bracket(*args, P=P, stages=2, **sel)
            if cuda:
                scored = torch.cuda.Event()
                scored.record()
            loki_select_bracket(*args, P=P, first_stage=2, idx_out=idx, **sel)
            sparse_decode_attention(q_rot, k_lr[b0:b1], k_rest[b0:b1], v[b0:b1], idx, scaling=scaling,
                                    num_splits=num_splits, out=out[b0:b1])
            if cuda and i > 0:
                idx.record_stream(cur)
        idxs.append(idx)
    for s in side:
        cur.wait_stream(s)
    return (out, torch.cat(idxs)) if return_indices else out
