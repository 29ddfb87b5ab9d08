"""Fixtures for the generation tests: a tiny random Llama, a basis fitted on its keys, the embedded model."""
import os

import torch

if not torch.cuda.is_available():  # the kernel-path test runs Triton in its interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
from gen_helpers import TINY, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_basis(tiny):
    from loki.generation import fit_basis

    g = torch.Generator().manual_seed(1)
    return fit_basis(tiny, torch.randint(0, TINY["vocab_size"], (2, 96), generator=g))


def lee_news_text() -> str:
    """The `lee_news` corpus as `loki.prepare` writes it (gensim's lee_background.cor, LF line ends), read from the
    gensim wheel directly so that the tests do not write into resources/ while a DAG test may be using it."""
    from loki.resources import _gensim_datapath

    return _gensim_datapath("lee_background.cor").read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    """(model, tokenizer, basis) of the embedded SmolLM2-135M, fp32 (prepared on first use: tests/conftest.py)."""
    from omegaconf import OmegaConf

    from loki.generation import fit_basis
    from loki.modeling import load_model, load_tokenizer

    mc = OmegaConf.create({"name": "smollm2-135m", "path": str(embedded_model_dir), "dtype": "float32"})
    model, tok = load_model(mc), load_tokenizer(mc)
    text = lee_news_text()[:20000]
    calib = tok(text[4000:], return_tensors="pt").input_ids[:, :256]
    return model, tok, fit_basis(model, calib), text
