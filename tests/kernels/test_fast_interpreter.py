"""kernels.testing.fast_interpreter: the test suite's speed-up of TRITON_INTERPRET=1 changes no result (bit for bit
against triton's interpreter as shipped) and leaves triton.language as it found it."""
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kernels import loki_decode
from kernels.testing import fast_interpreter, plain_interpreter, random_cache, random_orthonormal

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter only")


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _helper_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0)
    y = _twice(_twice(x)) + tl.sum(x, axis=0)          # nested helpers and one of triton's own (tl.core) combines
    tl.store(Y + offs, y, mask=m)
    tl.store(Y + BLOCK + tl.arange(0, 1), tl.max(x, axis=0) + tl.zeros([1], tl.float32))


def test_installed_by_the_test_suite():
    from triton.runtime import interpreter

    if os.environ.get("LOKI_PLAIN_INTERPRETER") == "1":
        pytest.skip("LOKI_PLAIN_INTERPRETER=1: the speed-up is off")
    assert getattr(interpreter._patch_lang, "_loki_fast", False), "tests/conftest.py did not install it"
    assert fast_interpreter() is True                   # idempotent
    assert getattr(interpreter._patch_lang, "_loki_fast", False)


def test_overflow_check_off_only_while_its_assert_is_a_no_op():
    """The integer-overflow check feeds device_assert only, which returns at once without options.debug: off under
    fast_interpreter, as shipped (on) under plain_interpreter."""
    from triton.runtime import interpreter

    if os.environ.get("LOKI_PLAIN_INTERPRETER") == "1":
        pytest.skip("LOKI_PLAIN_INTERPRETER=1: the speed-up is off")
    opts = interpreter.interpreter_builder.options
    assert opts.debug is False and opts.sanitize_overflow is False
    with plain_interpreter():
        assert interpreter.interpreter_builder.options.sanitize_overflow is True
    assert interpreter.interpreter_builder.options.sanitize_overflow is False
    # what makes it safe: without debug, device_assert builds nothing and raises nothing, even on a false condition
    sem = interpreter.interpreter_semantic
    false = tl.tensor(interpreter.TensorHandle(np.zeros(4, bool), tl.int1), tl.block_type(tl.int1, [4]))
    assert sem.device_assert(false, "never raised", None) is None


@triton.jit
def _int_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0)
    tl.store(Y + offs, x * 3 + (x - 7) * x, mask=m)    # int32 arithmetic that wraps around at these values


def test_integer_arithmetic_equal_with_and_without_the_overflow_check():
    x = torch.tensor([2**30, -2**30, 46341, -46341, 12345, 0, 1, -1], dtype=torch.int32)
    y_fast = torch.zeros_like(x)
    _int_kernel[(1,)](x, y_fast, x.numel(), BLOCK=8)
    y_plain = torch.zeros_like(x)
    with plain_interpreter():
        _int_kernel[(1,)](x, y_plain, x.numel(), BLOCK=8)
    assert torch.equal(y_fast, y_plain)


def _run_helper_kernel(x):
    y = torch.full((64 + 1,), float("nan"))
    _helper_kernel[(1,)](x, y, x.numel(), BLOCK=64)
    return torch.cat([y[:37], y[64:]])


def test_helper_kernel_equal_and_language_restored():
    x = torch.randn(37)
    fast = [_run_helper_kernel(x) for _ in range(2)]   # a second launch patches again from scratch
    with plain_interpreter():
        plain = _run_helper_kernel(x)
    assert all(torch.equal(f, plain) for f in fast)
    torch.testing.assert_close(plain[:37], x * 4 + x.sum(), rtol=0, atol=1e-5)
    assert plain[37].item() == x.max().item()
    # each launch's patch was undone: triton.language's builtins are builtins again
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange), "tl left patched after the launch"


@pytest.mark.parametrize("path", ["split", "bracket"])
def test_loki_decode_bit_for_bit(path):
    """The whole Loki step (rotation, scores, selection, sparse attention) with both interpreters: equal outputs and
    equal selections."""
    g = torch.Generator().manual_seed(7)
    B, KVH, G, S, D, d = 2, 2, 3, 96, 32, 8
    k_lr, k_rest, v, lengths = random_cache(B, KVH, S, D, d, torch.float16, "cpu", lengths=[96, 41], generator=g)
    q = torch.randn(B, KVH * G, D, generator=g).half()
    P = random_orthonormal(KVH, D, "cpu", generator=g)
    run = lambda: loki_decode(q, P, k_lr, k_rest, v, lengths, 0.25, path=path, return_indices=True)  # noqa: E731
    out_f, idx_f = run()
    with plain_interpreter():
        out_p, idx_p = run()
    assert torch.equal(out_f, out_p) and torch.equal(idx_f, idx_p)
