"""Every method inside a tiny random-weight Llama, through transformers' AttentionInterface: prefill and the
decode path of ``generate`` with a DynamicCache."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from loki.attention import attach
from loki.methods import build_method
from loki.modeling import load_model

SPARSE = {
    "exact_topk": {"k": 0.2},
    "loki": {"d": 4, "k": 0.2, "basis": "online"},
    "pca_attn": {"d": 2, "basis": "online"},
    "h2o": {"k": 0.2},
    "sparq": {"r": 4, "k": 0.2},
    "quest": {"k": 0.2, "page_size": 4},
    "loki_h2o": {"d": 4, "k": 0.2, "cache": 0.4, "basis": "online"},
}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_model_dir), "dtype": "float64"}))


def logits(model, x):
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_method_runs_in_the_model(model, name):
    x = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    attach(model, build_method({"name": "dense"}))
    ref = logits(model, x)
    m = build_method({"name": name, **SPARSE[name]})
    attach(model, m)
    out = logits(model, x)
    assert m.calls == model.config.num_hidden_layers
    assert (out - ref).abs().max() > 1e-4, f"{name} at a small budget must change the logits"
    if name != "pca_attn":
        full = {**SPARSE[name], "k": 1.0, **({"cache": 1.0} if name == "loki_h2o" else {})}
        attach(model, build_method({"name": name, **full}))
        torch.testing.assert_close(logits(model, x), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["h2o", "loki_h2o", "quest"])
def test_generate_decode_only_with_dynamic_cache(model, name):
    """sparse_prefill=false: a dense prompt, then each generated token through the method's decode path."""
    from transformers import DynamicCache

    x = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    m = build_method({"name": name, **SPARSE[name], "sparse_prefill": False})
    attach(model, m)
    with torch.inference_mode():
        out = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=2,
                             cache=DynamicCache(config=model.config))
    assert out.shape == (1, 28)
    assert m.calls == 2 * 4  # prefill + 3 decode steps, 2 layers
    st = m.stats()
    assert st["kept_fraction"] < 1.0  # the decode steps were sparse
    if name != "quest":  # evicting methods: the cache after the last step is bounded
        import math

        frac = {"h2o": 0.2, "loki_h2o": 0.4}[name]
        seen = [24, 25, 26, 27]  # keys after the prompt and after each decode step
        want = sum(math.ceil(frac * n) for n in seen) / sum(seen)
        assert st["cache_fraction"] == pytest.approx(want, rel=1e-12)
        assert st["cache_peak_tokens"] == 24  # the dense prompt held every key before the cut
