"""Helpers for tests and benchmarks: random caches, orthonormal P, selection checks."""
from __future__ import annotations

import contextlib
import dataclasses

import torch


def random_orthonormal(kv_heads: int, D: int, device="cpu", generator=None) -> torch.Tensor:
    """(KVH, D, D) fp32 orthonormal matrices (row-major contiguous)."""
    a = torch.randn(kv_heads, D, D, generator=generator, dtype=torch.float64)
    qm, _ = torch.linalg.qr(a)
    return qm.to(torch.float32).contiguous().to(device)


def random_cache(B, KVH, S, D, d, dtype, device, lengths=None, generator=None):
    """Random rotated cache (k_lr, k_rest, v, lengths) with values ~ N(0, 1) (positions >= length are random too)."""
    k_lr = torch.randn(B, KVH, S, d, generator=generator).to(dtype).to(device)
    k_rest = torch.randn(B, KVH, S, D - d, generator=generator).to(dtype).to(device)
    v = torch.randn(B, KVH, S, D, generator=generator).to(dtype).to(device)
    if lengths is None:
        lengths = torch.full((B,), S, dtype=torch.int32)
    lengths = torch.as_tensor(lengths, dtype=torch.int32).to(device)
    return k_lr, k_rest, v, lengths


def rows_copy(k_lr, k_rest, v, lengths=None, kv: bool = True):
    """The same cache values in a row layout (`kv_cache.allocate_cache_rows`): (k_lr, k_rest, v, lengths, slab);
    lengths copied where given, else zeros."""
    from .kv_cache import allocate_cache_rows
    B, KVH, S, d = k_lr.shape
    rows = allocate_cache_rows(B, KVH, S, v.shape[-1], d, dtype=k_lr.dtype, device=k_lr.device, kv=kv)
    for dst, src in zip(rows, (k_lr, k_rest, v, lengths, k_lr)):
        if src is not None:
            dst.copy_(src)
    return rows


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    assert not torch.isnan(x).any(), "NaN in output"
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def check_selection(idx: torch.Tensor, ref_scores: torch.Tensor, lengths, budgets, tol: float):
    """Check a selection against float64 reference scores.

    For every row: the first k_b entries are distinct valid positions, the rest are -1, and the selected set is a
    top-k_b set of the reference scores up to `tol` (every selected score >= the k_b-th largest - tol, every
    unselected one <= it + tol).  Where the gap at the boundary exceeds 2*tol the set must equal the reference
    top-k exactly.  Returns (rows checked, rows compared exactly).
    """
    idx = idx.long().cpu()
    ref = ref_scores.double().cpu()
    B, G, KMAX = idx.shape
    exact = 0
    for b in range(B):
        n, kb = int(lengths[b]), int(budgets[b])
        for r in range(G):
            row = idx[b, r]
            assert (row[kb:] == -1).all(), f"row ({b},{r}): padding beyond k_b={kb} is not -1: {row[kb:]}"
            sel = row[:kb]
            assert ((sel >= 0) & (sel < n)).all(), f"row ({b},{r}): index out of [0, {n}): {sel}"
            assert sel.unique().numel() == kb, f"row ({b},{r}): duplicate indices"
            if kb == 0:
                continue
            vals = ref[b, r, :n]
            srt = vals.sort(descending=True).values
            vk = srt[kb - 1].item()
            mask = torch.zeros(n, dtype=torch.bool)
            mask[sel] = True
            assert vals[mask].min().item() >= vk - tol, f"row ({b},{r}): selected a score below the k-th"
            if kb < n:
                assert vals[~mask].max().item() <= vk + tol, f"row ({b},{r}): missed a score above the k-th"
                if srt[kb - 1].item() - srt[kb].item() > 2 * tol:
                    want = torch.topk(vals, kb).indices.sort().values
                    assert torch.equal(sel.sort().values, want), f"row ({b},{r}): selection differs"
                    exact += 1
            else:
                exact += 1
    return B * G, exact


def capture_graph(fn, n_calls: int = 1) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``n_calls`` calls of fn(), captured after two warm-up calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_calls):
            fn()
    return g


_PLAIN: dict = {}   # (object, attribute) -> triton's own, replaced by fast_interpreter


@contextlib.contextmanager
def plain_interpreter():
    """Triton's interpreter as shipped, for the duration (undoes fast_interpreter; tests compare the two)."""
    fast = {key: getattr(*key) for key in _PLAIN}
    for (obj, name), value in _PLAIN.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name), value in fast.items():
            setattr(obj, name, value)


def fast_interpreter() -> bool:
    """Make ``TRITON_INTERPRET=1`` skip redundant work on every call of a ``@triton.jit`` helper from a kernel.

    The interpreter patches ``triton.language`` (``inspect.getmembers`` over the module, ~1.5 ms) once per kernel
    launch, and again on *every* device-function call inside the kernel, where the modules are already patched (the
    nested patch finds no builtin left to wrap and resets the same stateless attributes; triton 3.9
    ``interpreter.py``: ``InterpretedFunction.__call__`` -> ``_patch_lang``). In this project's kernels that is
    ~40% of the interpreter's time. This skips the nested patch when every ``triton.language`` module the helper
    sees is already patched by the launch in progress; the launch's own patch and restore are unchanged. It also
    memoizes ``_get_np_dtype`` (a pure function of the triton dtype that builds a dict on every call), and turns off
    the integer-overflow check whose only consumer, ``device_assert``, does nothing while ``options.debug`` is off.

    Only for the test suite (tests/conftest.py calls it). Returns False, changing nothing, where the interpreter
    does not have the expected functions (another triton version). A device function called from Python outside a
    launch is patched as before; a helper whose module sees a ``triton.language`` module the kernel's does not
    (``tl.core`` in triton's own combine functions) is patched as before the first time in each launch.
    """
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover
        return False
    orig = getattr(interp, "_patch_lang", None)
    grid_cls = getattr(interp, "GridExecutor", None)
    if orig is None or grid_cls is None or not all(hasattr(interp, a) for a in ("tl", "_LangPatchScope")):
        return False
    if getattr(orig, "_loki_fast", False):
        return True
    tl, launch_call = interp.tl, grid_cls.__call__
    state = {"starting": False, "patched": None}    # patched: ids of the modules the launch in progress patched

    seen: dict = {}

    def langs_of(fn) -> frozenset:
        got = seen.get(fn)
        if got is None:
            got = seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return got

    def _patch_lang(fn):
        langs = langs_of(fn)
        if state["starting"]:                       # the launch's own patch (GridExecutor.__call__)
            state["starting"] = False
            scope = orig(fn)
            state["patched"] = set(langs)
            return scope
        if state["patched"] is None:
            return orig(fn)                         # outside a launch: as triton does
        if langs <= state["patched"]:
            return interp._LangPatchScope()         # a device-function call, already patched: nothing to do
        scope = orig(fn)                            # a helper that sees another module (triton's own combine
        state["patched"] |= langs                   # functions see tl.core): patched as triton does, never undone
        return scope

    def launch(self, *args, **kwargs):
        state["starting"], state["patched"] = True, None
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            state["starting"], state["patched"] = False, None

    _patch_lang._loki_fast = True
    _PLAIN.update({(interp, "_patch_lang"): orig, (grid_cls, "__call__"): launch_call})
    interp._patch_lang = _patch_lang
    grid_cls.__call__ = launch

    np_dtype = getattr(interp, "_get_np_dtype", None)
    if np_dtype is not None:                        # it builds a 19-entry dict on every call (~30 us): memoize
        cache: dict = {}

        def _get_np_dtype(tt_dtype):
            try:
                return cache[tt_dtype]
            except KeyError:
                cache[tt_dtype] = got = np_dtype(tt_dtype)
                return got
            except TypeError:                       # unhashable: as is
                return np_dtype(tt_dtype)

        _PLAIN[(interp, "_get_np_dtype")] = np_dtype
        interp._get_np_dtype = _get_np_dtype

    builder = getattr(interp, "interpreter_builder", None)
    opts = getattr(builder, "options", None)
    if dataclasses.is_dataclass(opts) and getattr(opts, "sanitize_overflow", False) \
            and getattr(opts, "debug", None) is False:
        # the overflow check of every integer add / sub / mul (semantic.binary_op_sanitize_overflow_impl: int64
        # copies, two compares and an and, ~25% of the interpreter's time in the bracket kernels) ends in
        # device_assert, which returns at once without options.debug (never set by the interpreter): its result is
        # thrown away. Off while debug is off; the compiled kernels have it off too unless debugging.
        _PLAIN[(builder, "options")] = opts
        builder.options = dataclasses.replace(opts, sanitize_overflow=False)
    return True
