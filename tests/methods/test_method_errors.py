"""Bad input to the methods: one clear LokiError naming the problem."""

from __future__ import annotations

import pytest

from loki.common import LokiError
from loki.methods import METHODS, build_method
from method_refs import D, MOD, SCALE, causal, fake_model, make, qkv, random_basis


def test_every_method_is_registered_with_a_config():
    from loki.common import CONF_DIR

    assert set(METHODS) >= {"dense", "exact_topk", "loki", "pca_attn", "h2o", "sparq", "quest", "loki_h2o"}
    for name, cls in METHODS.items():
        import yaml

        conf = yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())
        assert conf.pop("name") == name
        assert set(conf) == set(cls.options), f"conf/method/{name}.yaml must list exactly the options of {name}"
        assert conf == {k: cls.options[k] for k in conf}, f"conf/method/{name}.yaml defaults differ from the class"


@pytest.mark.parametrize("opts,msg", [
    ({"name": "streaming"}, "unknown attention method"),
    ({"name": "h2o", "d": 16}, "do not apply to method 'h2o'"),
    ({"name": "pca_attn", "k": 0.25}, "do not apply to method 'pca_attn'"),
    ({"name": "quest", "r": 4}, "do not apply to method 'quest'"),
    ({"name": "sparq", "rope": "pre"}, "do not apply to method 'sparq'"),
    ({"name": "dense", "k": 0.5}, "do not apply to method 'dense'"),
    ({"name": "h2o", "recent": 1.5}, "recent must be"),
    ({"name": "loki", "slab_dtype": "int8"}, "unknown slab_dtype"),
    ({"name": "h2o", "selection": "layer"}, "selection must be"),
    ({"name": "sparq", "r": 0}, "r must be"),
    ({"name": "sparq", "r": 2.5}, "r must be"),
    ({"name": "sparq", "reallocation": "yes"}, "reallocation must be"),
    ({"name": "quest", "page_size": 0}, "page_size must be"),
    ({"name": "quest", "k": 1.5}, "must be <= 1"),
    ({"name": "loki_h2o", "k": 0.5, "cache": 0.25}, "cache budget"),
    ({"name": "loki_h2o", "cache": 0}, "k must be > 0"),
    ({"name": "pca_attn", "basis": "somewhere"}, "basis must be"),
])
def test_bad_options(opts, msg):
    with pytest.raises(LokiError, match=msg):
        build_method(opts, basis=random_basis())


def test_sparq_r_larger_than_head_dim():
    m = build_method({"name": "sparq", "r": D + 1})
    with pytest.raises(LokiError, match="larger than the head dim"):
        m.bind(fake_model())


@pytest.mark.parametrize("name", ["exact_topk", "h2o", "sparq", "quest", "loki_h2o"])
def test_token_budget_larger_than_the_context(name):
    q, k, v = qkv(40, T=8)
    extra = {"cache": 9} if name == "loki_h2o" else {}
    m, _ = make(name, k=9, k_mode="tokens", **extra)
    with pytest.raises(LokiError, match="larger than the context"):
        m.attend(MOD, q, k, v, causal(8), SCALE)


def test_evicting_method_without_its_earlier_state():
    """A decode step with no prefill before it cannot know what was evicted."""
    q, k, v = qkv(41, T=1, S=6)
    m, _ = make("h2o", k=0.5)
    with pytest.raises(LokiError, match="holds no cache state"):
        m.attend(MOD, q, k, v, causal(1, 6), SCALE)
