import os

import torch

if not torch.cuda.is_available():  # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("KERNELS_VARIANT"):  # run the suite under a kernels.bench.VARIANTS entry (module defaults)
    from kernels.bench import apply_variant  # noqa: E402
    apply_variant(os.environ["KERNELS_VARIANT"])

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# CPU (interpreter): fp32 and fp16; GPU: bf16 (the production dtype).
DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
# relative-error tolerance of the attention output per dtype (the output is rounded to the dtype)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(1234)
    return g
