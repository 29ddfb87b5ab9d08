"""GPU acceptance (skipped without CUDA): the kernel path and the torch reference path give the same greedy
tokens (32 steps, wherever the logits are not tied) and logits within bf16 tolerance; CUDA-graph replays
teacher-forced on the eager tokens agree with them the same way. Run on the device: python -m loki.bench_core --accept."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_kernels_vs_reference_on_gpu():
    from loki.bench_core import GPU_GRAPH_TOL, GPU_REF_TOL, acceptance

    rep = acceptance("cuda", steps=32)
    for name, v in rep["variants"].items():
        assert v["graph_matches_eager"], name
        assert v["untied_agree"] == v["untied_steps"], (name, v)
        # the bf16 model's measured noise (loki.bench_core.acceptance's docstring)
        assert v["logit_tol"] == GPU_REF_TOL and v["graph_logit_rel_err"] < GPU_GRAPH_TOL, (name, v)
        assert v["max_logit_rel_err"] < v["logit_tol"], (name, v)
    assert rep["passed"]
