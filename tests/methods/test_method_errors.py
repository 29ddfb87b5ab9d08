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


@pytest.mark.parametrize("opts,msg", [
    ({"name": "loki", "sink_tokens": -3}, "sink_tokens must be an int >= 0"),
    ({"name": "exact_topk", "local_window": 2.5}, "local_window must be an int >= 0"),
    ({"name": "quest", "dense_layers": "two"}, "dense_layers must be an int >= 0"),
    ({"name": "h2o", "sink_tokens": True}, "sink_tokens must be an int >= 0"),
    ({"name": "loki", "sparse_prefill": "maybe"}, "sparse_prefill must be true or false"),
])
def test_bad_shared_options(opts, msg):
    with pytest.raises(LokiError, match=msg):
        build_method(opts, basis=random_basis())


@pytest.mark.parametrize("name", ["loki", "exact_topk", "pca_attn"])
def test_dense_layers_covering_the_model(name):
    """dense_layers >= the model's layers would silently be dense attention under the method's name."""
    m = build_method({"name": name, "dense_layers": 1}, basis=random_basis())
    with pytest.raises(LokiError, match="makes all 1 layers of this model dense"):
        m.bind(fake_model())


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


@pytest.mark.parametrize("name", ["loki", "pca_attn"])
@pytest.mark.parametrize("d,dims", [(16, 16), (1, 1), (0.25, 4), (0.0625, 1), (0.99, 16)])
def test_d_is_an_int_of_dims_or_a_fraction_below_one(name, d, dims):
    """The rule of conf/method/loki.yaml: an int counts dims, a float in (0, 1) is a fraction of the head dim (16)."""
    m = build_method({"name": name, "d": d}, basis=random_basis())
    m.bind(fake_model())
    assert m.dims == dims


@pytest.mark.parametrize("d", [1.0, 16.0, 2.5, 0, -0.5, True, "16"])
def test_d_ambiguous_or_not_a_number_is_refused(d):
    """1.0 could mean one dim or the whole head dim, 16.0 is dims written as a fraction: refused, with the rule."""
    with pytest.raises(LokiError, match=r"(?s)loki: d must be an int >= 1 \(dims\) or a float in \(0, 1\).*"
                                        r"How to fix: write dims as an int"):
        build_method({"name": "loki", "d": d}, basis=random_basis())


def test_d_fraction_that_rounds_to_no_dims_is_refused():
    m = build_method({"name": "loki", "d": 0.01}, basis=random_basis())
    with pytest.raises(LokiError, match=r"(?s)d=0.01 of the head dim 16 rounds to 0 dims.*fraction >= 1/16"):
        m.bind(fake_model())


@pytest.mark.parametrize("r", [1.0, 16.0, 2.5, 0, True, "16"])
def test_sparq_r_follows_the_d_rule(r):
    """sparq's r once read 1.0 as one component and 16.0 as 16: refused as loki's d is, with the rule."""
    with pytest.raises(LokiError, match=r"(?s)sparq: r must be an int >= 1 \(query components\) or a float in \(0, 1\)"):
        build_method({"name": "sparq", "r": r})


@pytest.mark.parametrize("r, dims", [(16, 16), (1, 1), (0.25, 4), (0.5, 8)])
def test_sparq_r_dims(r, dims):
    m = build_method({"name": "sparq", "r": r})
    m.bind(fake_model())
    assert m.dims == dims


def test_sparq_r_fraction_that_rounds_to_no_components_is_refused():
    m = build_method({"name": "sparq", "r": 0.01})
    with pytest.raises(LokiError, match=r"(?s)r=0.01 is 0.16 of this model's 16 head dims, which rounds to 0"):
        m.bind(fake_model())


@pytest.mark.parametrize("dv", ["abc", 0, 1.5, True])
def test_d_variance_must_be_a_number_in_0_1(dv):
    with pytest.raises(LokiError, match=f"loki: d_variance must be a number in \\(0, 1\\], got {dv!r}"):
        build_method({"name": "loki", "d_variance": dv}, basis=random_basis())


@pytest.mark.parametrize("slab", ["None", "none", "null"])
def test_slab_dtype_none_as_a_string_says_write_null(slab):
    with pytest.raises(LokiError, match=f"(?s)slab_dtype='{slab}' is a string, not null.*method.slab_dtype=null"):
        build_method({"name": "loki", "slab_dtype": slab}, basis=random_basis())
