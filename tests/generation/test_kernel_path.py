"""The Triton kernel path of the cached Loki step equals the torch reference path (same selections, same
tokens, outputs within fp32 rounding). On the CPU the kernels run in Triton's interpreter (slow: tiny shapes)."""
import os

import pytest
import torch

from gen_helpers import cast_copy, left_pad, selection_mismatch
from loki.cache import LokiCache
from loki.generation import attach_cached_loki

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(model, opts, basis, ids, am, backend, steps, layout="split"):
    m = attach_cached_loki(model, {**opts, "backend": backend}, basis=basis)
    m.record_selections = True
    cache = LokiCache(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + steps + 1, layout=layout)
    from loki.bench_core import greedy_loop

    toks, logits = greedy_loop(model, cache, ids, am, steps)
    return toks, logits, m, cache


@pytest.mark.parametrize("opts", [
    {"d": 4, "k": 0.25},  # per head (the bracket path, kernels.loki_decode's default)
    {"d": 6, "k": 5, "k_mode": "tokens", "selection": "group", "group_reduce": "mean", "sink_tokens": 1,
     "local_window": 2, "dense_layers": 1},  # dense layer (flash-decoding), forced tokens (bracket path)
], ids=["head", "group-forced-dense1"])
@pytest.mark.parametrize("layout", ["split", "rows"])
def test_kernels_match_reference(tiny, tiny_basis, opts, layout):
    """The kernel path in either LokiCache layout ("rows", session 14: the kernels write and score the slab copy,
    the attention reads whole K rows) against the reference path in the split layout."""
    model = tiny.to(DEV)
    seqs = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 13)]
    ids, am = left_pad(seqs)
    ids, am = ids.to(DEV), am.to(DEV)
    tk, lk, mk, ck = _run(model, opts, tiny_basis, ids, am, "kernels", 2, layout)
    tr, lr, mr, cr = _run(model, opts, tiny_basis, ids, am, "reference", 2)
    assert mk.kernel_calls == mk.decode_calls > 0 and mr.kernel_calls == 0
    assert torch.equal(tk, tr)
    torch.testing.assert_close(lk, lr, rtol=1e-4, atol=1e-4)
    bad, tot = selection_mismatch(mr.selections, mk.selections)
    assert tot > 0 and bad == 0
    for a, b in zip(ck.layers, cr.layers):  # same cache contents (rotated keys within fp32 rounding)
        assert torch.equal(a.lengths, b.lengths) and a.lengths.tolist() == [21, 14]
        for i, n in enumerate((21, 14)):
            torch.testing.assert_close(a.k_lr[i, :, :n], b.k_lr[i, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.k_rest[i, :, :n], b.k_rest[i, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.v[i, :, :n], b.v[i, :, :n], rtol=1e-5, atol=1e-5)
            if layout == "rows":  # the scoring pass's copy, written by the same kernels
                assert torch.equal(a.slab[i, :, :n], a.k_lr[i, :, :n])


@pytest.mark.parametrize("opts", [
    {"d": 4, "k": 0.25},
    {"d": 6, "k": 5, "k_mode": "tokens", "selection": "group", "sink_tokens": 1, "local_window": 2},
], ids=["head", "group-forced"])
def test_fp8_slab_kernels_match_reference(tiny, tiny_basis, opts):
    """slab_dtype=fp8 (the kernels' opt-in e4m3 scoring slab) in a 16-bit model: the kernel path writes the e4m3 slab
    and scores against it exactly as the reference path does (same selections, same tokens, equal slabs)."""
    model = cast_copy(tiny, torch.float16, DEV)
    opts = {**opts, "slab_dtype": "fp8"}
    seqs = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 13)]
    ids, am = left_pad(seqs)
    ids, am = ids.to(DEV), am.to(DEV)
    tk, lk, mk, ck = _run(model, opts, tiny_basis, ids, am, "kernels", 2, "rows")
    tr, lr, mr, cr = _run(model, opts, tiny_basis, ids, am, "reference", 2, "rows")
    assert mk.kernel_calls == mk.decode_calls > 0 and mr.kernel_calls == 0
    bad, tot = selection_mismatch(mr.selections, mk.selections)
    assert tot > 0 and bad == 0
    assert torch.equal(tk, tr)
    torch.testing.assert_close(lk, lr, rtol=2e-3, atol=2e-3)
    diff = total = 0
    for a, b in zip(ck.layers, cr.layers):
        assert a.slab.dtype == b.slab.dtype == torch.float8_e4m3fn
        for i, n in enumerate((21, 14)):
            # both paths' writers round their fp32 rotated keys to e4m3; the keys themselves carry each path's fp16
            # noise (a padded prefill, the decoded token from its own hidden state), so a key near a rounding
            # boundary may land one e4m3 step apart (measured: 3 of 560 and 4 of 840 values)
            x, y = a.slab[i, :, :n].float(), b.slab[i, :, :n].float()
            assert torch.all((x - y).abs() <= torch.maximum(x.abs(), y.abs()) * 2 ** -3 + 2 ** -9)
            diff += int((x != y).sum())
            total += x.numel()
    assert diff <= total // 50, (diff, total)
