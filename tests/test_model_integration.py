"""The methods inside a real transformers model (tiny, random weights), through AttentionInterface."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest
import torch
from loki_testutils import REPO
from omegaconf import OmegaConf

from loki.attention import attach
from loki.common import LokiError
from loki.methods import build_method
from loki.modeling import load_model


@pytest.fixture()
def model(tiny_model_dir):
    return load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_model_dir), "dtype": "float64"}))


def logits(model, x):
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False).logits


def test_loki_registered_and_really_runs(model):
    from transformers import AttentionInterface

    assert "loki" in AttentionInterface._global_mapping
    x = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    dense = build_method({"name": "dense"})
    attach(model, dense)
    ref = logits(model, x)
    sdpa = load_model(OmegaConf.create({"name": "tiny", "path": str(model.name_or_path), "dtype": "float64"}))
    torch.testing.assert_close(ref, logits(sdpa, x), rtol=1e-9, atol=1e-9)  # our dense == transformers' sdpa
    assert dense.calls == model.config.num_hidden_layers

    m = build_method({"name": "loki", "d": 4, "k": 0.1, "basis": "online"})
    attach(model, m)
    assert model.config._attn_implementation == "loki"
    out = logits(model, x)
    assert m.calls == model.config.num_hidden_layers, "every layer must go through the loki method"
    assert (out - ref).abs().max() > 1e-3, "loki at small k must differ from dense (else it silently fell back)"

    full = build_method({"name": "loki", "d": 4, "k": 1.0, "basis": "online"})
    attach(model, full)
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-9, atol=1e-9)


def test_dense_layers_and_decode_only_options(model):
    x = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    attach(model, build_method({"name": "dense"}))
    ref = logits(model, x)
    attach(model, build_method({"name": "exact_topk", "k": 0.1, "sparse_prefill": False}))
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-9, atol=1e-9)
    m = build_method({"name": "exact_topk", "k": 0.1, "dense_layers": 1})  # layer 0 dense, layer 1 sparse
    attach(model, m)
    out = logits(model, x)
    assert not torch.allclose(out, ref), "layer 1 is sparse: the logits move"
    attach(model, build_method({"name": "exact_topk", "k": 0.1}))  # both layers sparse
    assert not torch.allclose(out, logits(model, x)), "dense_layers=1 keeps layer 0 dense: not the all-sparse logits"
    with pytest.raises(LokiError, match="makes all 2 layers of this model dense"):
        attach(model, build_method({"name": "exact_topk", "k": 0.1, "dense_layers": 2}))


def test_generate_with_cache_uses_method(model):
    x = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    m = build_method({"name": "exact_topk", "k": 1.0})
    attach(model, m)
    with torch.inference_mode():
        out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=2)
    attach(model, build_method({"name": "dense"}))
    with torch.inference_mode():
        ref = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert torch.equal(out, ref)
    assert m.calls == 2 * 5, "prefill + 4 decode steps, 2 layers each"


def test_plain_pytest_imports_our_kernels_not_the_test_folder():
    """`pytest tests/kernels/...` (the entry point, not `python -m pytest`): the test folder tests/kernels/ is a
    namespace package named `kernels` and, without the repository root first on sys.path (pyproject's pytest
    `pythonpath`), shadowed the package ("cannot import name 'LokiInputError' from 'kernels' (unknown location)")."""
    import sys

    exe = Path(sys.executable).with_name("pytest")
    if not exe.exists():
        pytest.skip(f"no pytest entry point beside {sys.executable}")
    res = subprocess.run([str(exe), "--collect-only", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kv_cache.py"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "tests collected" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_hf_kernels_package_not_confused_with_ours():
    """Our top-level `kernels` package must not be taken for Hugging Face's `kernels` hub package.

    What protects us (checked here, so that a change on either side fails this test, not a user's import):
    transformers finds a top-level `kernels` and maps it to *our* distribution (`loki-pipeline`), then accepts it
    only inside its version window (`KERNELS_MIN_VERSION`, 0.18.2 in transformers 5.x).  Our version is far below
    it, so `is_kernels_available()` is False and `hub_kernels` never runs `from kernels import LayerRepository, ...`
    (which our package would fail with an ImportError inside transformers).  Installing HF's `kernels` beside this
    project is not supported: both are the top-level name `kernels`, and whichever comes first on sys.path wins."""
    import importlib.metadata as md

    import transformers.utils.import_utils as iu
    from packaging.version import Version

    ours = importlib.import_module("kernels")
    assert not hasattr(ours, "__version__")
    assert not hasattr(ours, "LayerRepository")  # none of HF kernels' API
    dists = md.packages_distributions().get("kernels", [])
    assert dists == ["loki-pipeline"], f"top-level `kernels` comes from {dists}: is HF's kernels installed too?"
    available, version = iu._is_package_available("kernels", return_version=True)
    assert available and version == md.version("loki-pipeline")
    assert Version(version) < Version(iu.KERNELS_MIN_VERSION), (
        f"loki-pipeline {version} is inside transformers' window for HF kernels (>= {iu.KERNELS_MIN_VERSION}): "
        f"transformers would import our kernels/ as HF's package")
    assert iu.is_kernels_available() is False
    import transformers.integrations.hub_kernels as hk

    importlib.reload(hk)
    assert not hasattr(hk, "_kernels_kernelize"), "transformers imported our kernels/ as HF's kernels package"
