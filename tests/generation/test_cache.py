"""LokiCache + the cached Loki method on a tiny random Llama (CPU, torch reference path)."""
import pytest
import torch

from gen_helpers import cast_copy, dense_generate, eval_time_generate, left_pad, selection_mismatch
from loki.cache import LokiCache, decode_budget, max_budget
from loki.common import LokiError
from loki.generation import attach_cached_loki, cache_kwarg, generate, make_cache

V = 300


def _ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_keys_are_stored_in_pca_coordinates(tiny, tiny_basis):
    """After the prefill the cache holds K' = K @ P (k_lr | k_rest), V as is; bytes = dense + bases + lengths."""
    from transformers import DynamicCache

    ids = _ids(2, 24)
    tiny.set_attn_implementation("sdpa")
    dyn = DynamicCache(config=tiny.config)
    with torch.no_grad():
        tiny(input_ids=ids, use_cache=True, **{cache_kwarg(tiny): dyn})
    m = attach_cached_loki(tiny, {"d": 5, "k": 0.25}, basis=tiny_basis)
    cache = LokiCache(tiny, batch_size=2, max_cache_len=32)
    with torch.no_grad():
        tiny(input_ids=ids, use_cache=True, **{cache_kwarg(tiny): cache})
    for i, layer in enumerate(cache.layers):
        K, Vv = dyn.layers[i].keys, dyn.layers[i].values
        P = m.P[i]
        assert layer.k_lr.shape == (2, 2, 32, 5) and layer.k_rest.shape == (2, 2, 32, 11)
        rot = torch.cat([layer.k_lr[:, :, :24], layer.k_rest[:, :, :24]], -1)
        torch.testing.assert_close(rot, torch.matmul(K.double(), P.double()).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.matmul(rot.double(), P.double().transpose(-1, -2)).float(), K,
                                   rtol=1e-5, atol=1e-5)  # orthonormal: the keys come back
        torch.testing.assert_close(layer.v[:, :, :24], Vv, rtol=1e-5, atol=1e-6)
        if i == 0:  # same input, same projection: identical
            assert torch.equal(layer.v[:, :, :24], Vv)
        assert layer.lengths.tolist() == [24, 24]
    dense = 2 * 2 * (2 * 2 * 32 * 16) * 4  # layers x (K + V) x (B KVH S D) x fp32
    assert cache.nbytes() == dense + 2 * (2 * 16 * 16 * 4) + 2 * (2 * 4)  # + bases + lengths
    assert cache.get_seq_length() == 24 and cache.get_max_length() == 32


OPTIONS = [
    {"d": 4, "k": 0.25},                                                        # paper: per-head selection
    {"d": 0.5, "k": 0.3, "selection": "group", "group_reduce": "max"},
    {"d": 6, "k": 7, "k_mode": "tokens", "selection": "group", "group_reduce": "mean",
     "sink_tokens": 2, "local_window": 3},
    {"d": 4, "k": 0.2, "k_mode": "window", "dense_layers": 1, "rope": "post"},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_matches_evaluation_time_method(tiny, tiny_basis, opts):
    """Same selections at every decode step and layer, same greedy tokens as the evaluation-time loki."""
    ids = _ids(1, 40, seed=3)
    ref, ev, ref_sel = eval_time_generate(tiny, opts, tiny_basis, ids, n=12, record=True)
    m = attach_cached_loki(tiny, opts, basis=tiny_basis)
    m.record_selections = True
    out = generate(tiny, ids, max_new_tokens=12)
    assert torch.equal(out, ref)
    bad, tot = selection_mismatch(ref_sel, m.selections)
    assert tot > 0 and bad == 0
    L = 2
    assert m.prefill_calls == L and m.decode_calls == L * 11 and m.kernel_calls == 0  # the Loki path ran
    assert len(m.selections) == L - int(opts.get("dense_layers", 0))


def test_selection_actually_sparse(tiny, tiny_basis):
    """At k < 1 the decode steps keep ceil(k n) keys, not all of them (no silent dense fallback)."""
    ids = _ids(1, 40, seed=4)
    m = attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    m.record_selections = True
    generate(tiny, ids, max_new_tokens=4)
    # every layer recorded its 3 decode steps (a dense fallback records nothing, so an empty dict must fail here)
    assert sorted(m.selections) == [0, 1] and all(len(steps) == 3 for steps in m.selections.values())
    for layer, steps in m.selections.items():
        for t, keep in enumerate(steps):
            n = 41 + t
            assert keep.shape[-1] == n
            assert (keep.sum(-1) == -(-n // 4)).all()  # ceil(n / 4) per head


def test_equals_dense_when_k_covers_the_context(tiny, tiny_basis):
    ids = _ids(2, 30, seed=5)
    ref = dense_generate(tiny, ids, n=10)
    attach_cached_loki(tiny, {"d": 4, "k": 1.0}, basis=tiny_basis)
    assert torch.equal(generate(tiny, ids, max_new_tokens=10), ref)


def test_ragged_batch_equals_per_sequence_runs(tiny, tiny_basis):
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (37, 21, 30)]
    ids, am = left_pad(seqs)
    opts = {"d": 4, "k": 0.25, "selection": "group", "sink_tokens": 1, "local_window": 2}
    m = attach_cached_loki(tiny, opts, basis=tiny_basis)
    out = generate(tiny, ids, am, max_new_tokens=10)
    for i, s in enumerate(seqs):
        single = generate(tiny, s[None], max_new_tokens=10)
        assert torch.equal(out[i], single[0]), i
    # per-sequence lengths after the prefill: padding dropped
    cache = LokiCache(tiny, batch_size=3, max_cache_len=50)
    generate(tiny, ids, am, max_new_tokens=2, cache=cache)
    assert cache.lengths.tolist() == [37 + 1, 21 + 1, 30 + 1]
    assert cache.get_seq_length() == 37 + 1  # positions seen, padding included (what generate tracks)
    assert m.decode_calls > 0


def test_budget_helpers():
    n = torch.tensor([1, 8, 9, 0])
    assert decode_budget(n, 0.25, "prefix").tolist() == [1, 2, 3, 0]
    assert decode_budget(n, 0.25, "window").tolist() == [1, 2, 3, 0]
    assert decode_budget(n, 5, "tokens").tolist() == [1, 5, 5, 0]
    assert max_budget(100, 0.125, "prefix", 2, 3) == 13 + 5
    assert max_budget(10, 50, "tokens", 0, 0) == 10


# ------------------------------------------------------------------------------------------- bad input


def test_prompt_longer_than_the_cache(tiny, tiny_basis):
    attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    cache = LokiCache(tiny, batch_size=1, max_cache_len=16)
    with pytest.raises(LokiError, match="prompt has 20 tokens but the LokiCache holds 16"):
        generate(tiny, _ids(1, 20), max_new_tokens=2, cache=cache)


def test_cache_full_while_decoding(tiny, tiny_basis):
    attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    cache = LokiCache(tiny, batch_size=1, max_cache_len=22)
    with pytest.raises(LokiError, match="LokiCache is full"):
        generate(tiny, _ids(1, 20), max_new_tokens=8, cache=cache)


def test_basis_for_another_model(tiny):
    from gen_helpers import tiny_llama
    from loki.generation import fit_basis

    other = tiny_llama(seed=1, num_key_value_heads=4)
    basis = fit_basis(other, _ids(1, 32))
    with pytest.raises(LokiError, match="PCA file .* was made for model"):
        attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=basis)


def test_cache_reused_across_incompatible_configs(tiny, tiny_basis):
    attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    cache = LokiCache(tiny, batch_size=1, max_cache_len=40)
    generate(tiny, _ids(1, 12), max_new_tokens=2, cache=cache)
    attach_cached_loki(tiny, {"d": 8, "k": 0.5}, basis=tiny_basis)  # another configuration
    cache.reset()
    with pytest.raises(LokiError, match="this LokiCache was made for .*'d': 4.* but the model now runs .*'d': 8"):
        generate(tiny, _ids(1, 12), max_new_tokens=2, cache=cache)
    # a cache of one batch size used with another
    m = attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    cache = LokiCache(tiny, batch_size=2, max_cache_len=40)
    with pytest.raises(LokiError, match="holds batch=2"):
        generate(tiny, _ids(1, 12), max_new_tokens=2, cache=cache)
    # the model switched back to dense attention: the cache refuses rather than decode densely
    cache = LokiCache(tiny, batch_size=1, max_cache_len=40)
    tiny.set_attn_implementation("sdpa")
    with pytest.raises(LokiError, match="now runs .*sdpa"):
        generate(tiny, _ids(1, 12), max_new_tokens=2, cache=cache)
    assert m.decode_calls == 0
    # a used cache without reset: one prefill per cache
    attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    cache = LokiCache(tiny, batch_size=1, max_cache_len=40)
    generate(tiny, _ids(1, 12), max_new_tokens=2, cache=cache)
    with pytest.raises(LokiError, match="-token forward after its prefill"):
        generate(tiny, _ids(1, 12), max_new_tokens=2, cache=cache)


def test_method_without_its_cache(tiny, tiny_basis):
    attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    with pytest.raises(LokiError, match="ran without a LokiCache"), torch.no_grad():
        tiny.generate(input_ids=_ids(1, 12), attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=2,
                      do_sample=False, pad_token_id=0)
    tiny.set_attn_implementation("sdpa")
    with pytest.raises(LokiError, match="needs the model to run the cached Loki method"):
        LokiCache(tiny, batch_size=1, max_cache_len=8)


@pytest.mark.parametrize("opts,msg", [
    ({"basis": "online"}, "needs an offline basis"),
    ({"d_variance": 0.9}, "d_variance"),
    ({"backend": "cuda"}, "unknown backend"),
    ({"k": 0}, "k must be > 0"),
    ({"colour": 1}, "do not apply"),
])
def test_bad_options(tiny, tiny_basis, opts, msg):
    with pytest.raises(LokiError, match=msg):
        attach_cached_loki(tiny, {"d": 4, "k": 0.25, **opts}, basis=tiny_basis)


def test_unsupported_decoding_modes(tiny, tiny_basis):
    attach_cached_loki(tiny, {"d": 4, "k": 0.25}, basis=tiny_basis)
    with pytest.raises(LokiError, match="holds batch=1"):  # beams widen the batch before the prefill
        generate(tiny, _ids(1, 12), max_new_tokens=2, num_beams=2, max_cache_len=40)
    cache = LokiCache(tiny, batch_size=1, max_cache_len=40)
    for call in (lambda: cache.reorder_cache(torch.tensor([0])), lambda: cache.crop(-1),
                 lambda: cache.batch_repeat_interleave(2)):
        with pytest.raises(LokiError, match="LokiCache does not support"):
            call()


def test_kernels_backend_needs_cuda_or_interpreter(tiny, tiny_basis, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attach_cached_loki(tiny, {"d": 4, "k": 0.25, "backend": "kernels"}, basis=tiny_basis)
    with pytest.raises(LokiError, match="needs the Triton interpreter"):
        LokiCache(tiny, batch_size=1, max_cache_len=8)


def test_rows_layout_matches_split(tiny, tiny_basis):
    """LokiCache(layout="rows") (session 14): whole key rows with k_lr / k_rest as their views and a copy of k_lr
    (the slab the scoring pass reads), kept equal to k_lr through the prefill, the left-padding drop and every decode
    step; the same selections, tokens and logits as the split layout; d / (2D) more bytes.  Unknown layouts refused."""
    from loki.bench_core import greedy_loop

    seqs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 11)]
    ids, am = left_pad(seqs)
    runs = {}
    for layout in ("split", "rows"):
        m = attach_cached_loki(tiny, {"d": 5, "k": 0.25, "selection": "group"}, basis=tiny_basis)
        m.record_selections = True
        cache = LokiCache(tiny, batch_size=2, max_cache_len=24, layout=layout)
        toks, logits = greedy_loop(tiny, cache, ids, am, 4)
        runs[layout] = (toks, logits, m.selections, cache)
    (ts, ls, ss, cs), (tr, lr, sr, cr) = runs["split"], runs["rows"]
    assert torch.equal(ts, tr)
    torch.testing.assert_close(lr, ls, rtol=0, atol=0)
    assert selection_mismatch(ss, sr) == (0, selection_mismatch(ss, ss)[1]) and selection_mismatch(ss, ss)[1] > 0
    for a, b in zip(cs.layers, cr.layers):
        assert b.layout == "rows" and b.slab is not None and a.slab is None and not b.k_lr.is_contiguous()
        assert b.k_lr.data_ptr() + 5 * b.k_lr.element_size() == b.k_rest.data_ptr()  # one row per token
        assert torch.equal(a.lengths, b.lengths) and b.lengths.tolist() == [20, 14]
        for i, n in enumerate((20, 14)):  # (prompt + 3 fed tokens: the 4th is only returned)
            assert torch.equal(b.slab[i, :, :n], b.k_lr[i, :, :n])
            for x, y in ((a.k_lr, b.k_lr), (a.k_rest, b.k_rest), (a.v, b.v)):
                assert torch.equal(x[i, :, :n], y[i, :, :n])
    n_layers = len(cs.layers)
    assert cr.nbytes() - cs.nbytes() == n_layers * 2 * 2 * 24 * 5 * 4  # L x (B KVH S_max d) x fp32
    with pytest.raises(LokiError, match="unknown layout"):
        LokiCache(tiny, batch_size=1, max_cache_len=8, layout="padded")


def test_fp8_slab_cache_reference_path(tiny, tiny_basis):
    """method slab_dtype=fp8 (the kernels' opt-in e4m3 scoring slab, session 19): the rows-layout cache holds the
    scored dims rounded to e4m3 from the fp32 rotated keys, ragged prefill and decode steps keep it in step with
    k_lr, and the reference decode scores against it (negating the slab turns the top-k into the bottom-k)."""
    from loki.bench_core import greedy_loop
    from loki.cache import reference_decode

    model = cast_copy(tiny, torch.bfloat16)
    d = 5
    m = attach_cached_loki(model, {"d": d, "k": 0.25, "slab_dtype": "fp8"}, basis=tiny_basis)
    m.record_selections = True
    ids, am = left_pad([_ids(1, 22, seed=3)[0], _ids(1, 15, seed=4)[0]])
    cache = LokiCache(model, batch_size=2, max_cache_len=30, layout="rows")
    greedy_loop(model, cache, ids, am, 4)
    n = [22 + 3, 15 + 3]
    assert sum(len(v) for v in m.selections.values()) > 0
    for layer in cache.layers:
        assert layer.slab.dtype == torch.float8_e4m3fn and layer.lengths.tolist() == n
        for i, ni in enumerate(n):  # e4m3 of the bf16 keys' fp32 values: within e4m3's half ulp (2**-4 relative)
            ref = layer.k_lr[i, :, :ni].float()
            got = layer.slab[i, :, :ni].float()
            assert torch.all((got - ref).abs() <= ref.abs() * 2 ** -4 + 2 ** -10)
    # the reference decode reads the slab: its selection is the top-k of q'[:d] . slab
    layer = cache.layers[1]
    q = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    scaling = 16 ** -0.5
    m.selections = {}

    def manual():
        qr = torch.matmul(q.float().view(2, 2, 2, 16), layer.P[None])[..., :d]
        s = torch.einsum("bkgd,bksd->bkgs", qr, layer.slab[:, :, :max(n)].float()).reshape(2, 4, -1)
        want = torch.zeros_like(s, dtype=torch.bool)
        for b, nb in enumerate(n):
            kb = int(decode_budget(torch.tensor([nb]), 0.25, "prefix")[0])
            want[b].scatter_(-1, s[b, :, :nb].topk(kb, -1).indices, True)
        return want

    reference_decode(m, layer, q, scaling, dense=False)
    keep1 = m.selections[layer.layer_idx][-1]
    assert torch.equal(keep1[..., :max(n)], manual())
    layer.slab.copy_((-layer.slab.float()).to(torch.float8_e4m3fn))
    reference_decode(m, layer, q, scaling, dense=False)
    keep2 = m.selections[layer.layer_idx][-1]
    assert torch.equal(keep2[..., :max(n)], manual()) and not torch.equal(keep1, keep2)


def test_fp8_slab_cache_errors(tiny, tiny_basis):
    """slab_dtype=fp8 needs the rows layout (the LokiCache's default then) and a 16-bit cache: one clear error each,
    naming the fix."""
    attach_cached_loki(tiny, {"d": 5, "k": 0.25, "slab_dtype": "fp8"}, basis=tiny_basis)
    with pytest.raises(LokiError, match="16-bit caches"):
        LokiCache(tiny, batch_size=1, max_cache_len=16, layout="rows")
    model = cast_copy(tiny, torch.bfloat16)
    attach_cached_loki(model, {"d": 5, "k": 0.25, "slab_dtype": "fp8"}, basis=tiny_basis)
    with pytest.raises(LokiError, match="layout='rows'"):
        LokiCache(model, batch_size=1, max_cache_len=16, layout="split")
    assert LokiCache(model, batch_size=1, max_cache_len=16).layout == "rows"  # (the default then: what it needs)
    assert make_cache(model, 1, 16).layout == "rows"
    out = generate(model, _ids(1, 6), max_new_tokens=3)
    assert out.shape == (1, 3)


def test_cache_of_another_dtype_than_the_model(tiny, tiny_basis):
    """LokiCache(dtype=float16) under a float32 model: the cache holds fp16, the decode steps hand the model fp32
    back (they crashed in o_proj), and the logits stay close to the fp32 cache's; a non-float cache dtype is refused
    before anything is allocated."""
    from loki.bench_core import greedy_loop

    ids = _ids(1, 20, seed=8)
    am = torch.ones_like(ids)
    attach_cached_loki(tiny, {"d": 4, "k": 0.5}, basis=tiny_basis)
    full = LokiCache(tiny, batch_size=1, max_cache_len=30)
    tok32, log32 = greedy_loop(tiny, full, ids, am, 4)
    half = LokiCache(tiny, batch_size=1, max_cache_len=30, dtype=torch.float16)
    tok16, log16 = greedy_loop(tiny, half, ids, am, 4, forced=tok32)
    assert all(layer.k_lr.dtype == torch.float16 for layer in half.layers)
    assert half.lengths.tolist() == [20 + 3]
    assert (log16 - log32).abs().max() < 5e-2 * log32.abs().max()
    with pytest.raises(LokiError, match="dtype torch.float64 is not a cache dtype"):
        LokiCache(tiny, batch_size=1, max_cache_len=30, dtype=torch.float64)
