"""Small shared helpers for the Loki Triton kernels (no project dependencies)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (Triton >= 3.4, sm_90+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

# int32 fields per score row of the bracket path's records (lo, hi, #above, #band, budget, 3 unused; bracket.py),
# which the sparse attention's early start reads (attention.py, session 11)
BRACKET_RECORD = tl.constexpr(8)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class LokiInputError(ValueError):
    """Raised (before any launch) when an op gets inputs it does not support."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise LokiInputError(msg)


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_available(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with programmatic dependent launch (sm_90+, a Triton with
    gdc_wait / gdc_launch_dependents, not the interpreter)."""
    if gdc_wait is None or is_interpreter() or device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel, launched with launch_pdl=True, start while this one runs (griddepcontrol)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel (which triggered this one early) has finished and its writes are visible."""
    if PDL:
        gdc_wait()


def check_float(t: torch.Tensor, name: str) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dtype in FLOAT_DTYPES, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    check_interpretable(t, name)


def check_interpretable(t: torch.Tensor, name: str) -> None:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) has no bfloat16 arithmetic: its tl.dot on bf16 tiles returns
    garbage (1e10 off on a 16x16 product, triton 3.9), silently.  Refused there; the GPU runs bf16."""
    check(not (t.dtype == torch.bfloat16 and is_interpreter()),
          f"{name} is bfloat16, which Triton's CPU interpreter (TRITON_INTERPRET=1) cannot compute with; use float16 "
          "or float32 on the CPU (bfloat16 runs on the GPU)")


# what the scoring pass may read (session 19): the cache's float dtypes, or an fp8 (e4m3) slab copy of a 16-bit cache
SLAB_FP8 = torch.float8_e4m3fn


def check_slab_dtype(t: torch.Tensor, name: str) -> None:
    """The tensor a scoring pass reads: a float cache dtype, or an fp8 e4m3 slab (tiles widened to fp16 exactly;
    the scores are then exact for the fp8 values, which differ from the cache's by e4m3 rounding)."""
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dtype in FLOAT_DTYPES or t.dtype == SLAB_FP8,
          f"{name} must be float32, float16, bfloat16 or (a slab) float8_e4m3fn, got {t.dtype}")
    check_interpretable(t, name)
    if t.dtype == SLAB_FP8 and t.is_cuda:
        cap = torch.cuda.get_device_capability(t.device)
        check(cap >= (8, 9), f"an fp8 {name} needs a GPU with fp8 conversions (sm_89+), got sm_{cap[0]}{cap[1]}; "
                             f"use a 16-bit slab")


def check_last_contiguous(t: torch.Tensor, name: str) -> None:
    check(t.stride(-1) == 1 or t.shape[-1] == 1,
          f"{name} must be contiguous in its last dimension (stride {tuple(t.stride())}); call .contiguous()")


def check_same_device(name_tensors) -> None:
    """All given tensors (None skipped) on one device; the error names the first that differs from the first."""
    first = None
    for n, t in name_tensors:
        if t is None:
            continue
        if first is None:
            first = (n, t.device)
        check(t.device == first[1], f"{n} is on {t.device} but {first[0]} is on {first[1]}; all inputs must share a "
                                    f"device")


def check_pow2(x, name: str, minimum: int = 1, zero_ok: bool = False) -> None:
    """A tuning argument that becomes a tile size (None: the default)."""
    if x is None or (zero_ok and x == 0):
        return
    check(isinstance(x, int) and not isinstance(x, bool) and x >= minimum and x & (x - 1) == 0,
          f"{name} must be a power of 2 >= {minimum}{' (or 0)' if zero_ok else ''}, got {x!r}")


def check_lengths_range(lengths: torch.Tensor, S: int, what: str = "S_max") -> None:
    """lengths in 0..S (reads them on the host: one device sync; callers do it only with strict=True)."""
    check(bool((lengths >= 0).all()), f"lengths must be >= 0, got {lengths.tolist()}")
    check(bool((lengths <= S).all()), f"lengths exceed {what}={S}: {lengths.tolist()}")


def check_basis(P: torch.Tensor, KVH: int, D: int, device) -> None:
    """A PCA basis for a cache of KVH heads of dim D: float, (KVH, D, D), contiguous last dim, on the cache's device."""
    check_float(P, "P")
    check(tuple(P.shape) == (KVH, D, D), f"P must have shape (KVH, D, D) = {(KVH, D, D)} (one basis per KV head of "
                                         f"the cache), got {tuple(P.shape)}")
    check_last_contiguous(P, "P")
    check(P.device == torch.device(device), f"P is on {P.device}, expected {device}")


def rotation_out(out: torch.Tensor | None, name: str, B: int, H: int, D: int, device) -> torch.Tensor:
    """The fp32 (B, H, D) buffer q' = q @ P is written to: a caller's (checked) or a new one."""
    if out is None:
        return torch.empty(B, H, D, dtype=torch.float32, device=device)
    check_out(out, name, (B, H, D), (torch.float32,), device)
    return out


def check_out(t: torch.Tensor, name: str, shape: tuple, dtypes: tuple, device) -> None:
    """A caller-supplied output buffer: the exact shape, an allowed dtype, the device, a contiguous last dimension
    (the kernels write through its other strides).  A wrong one would be written out of bounds, so it is refused."""
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} must be {' or '.join(str(x).replace('torch.', '') for x in dtypes)}, "
                             f"got {t.dtype}")
    check(t.device == torch.device(device), f"{name} is on {t.device}, expected {device}")
    check_last_contiguous(t, name)


def check_cache(k_lr: torch.Tensor, k_rest: torch.Tensor, v: torch.Tensor):
    """Validate the rotated KV cache layout; returns (B, KVH, S_max, D, d)."""
    for n, t in (("k_lr", k_lr), ("k_rest", k_rest), ("v", v)):
        check_float(t, n)
        check(t.dim() == 4, f"{n} must be 4-D (B, KVH, S_max, dim), got shape {tuple(t.shape)}")
        check_last_contiguous(t, n)
    check(k_lr.dtype == k_rest.dtype == v.dtype,
          f"k_lr, k_rest and v must share a dtype, got {k_lr.dtype}, {k_rest.dtype}, {v.dtype}")
    B, KVH, S, d = k_lr.shape
    D = v.shape[-1]
    check(tuple(v.shape[:3]) == (B, KVH, S), f"v shape {tuple(v.shape)} does not match k_lr {tuple(k_lr.shape)}")
    check(1 <= d <= D, f"low-rank dim d={d} (k_lr's last dim) must be in 1..D={D} (v's last dim)")
    check(tuple(k_rest.shape) == (B, KVH, S, D - d),
          f"k_rest must have shape {(B, KVH, S, D - d)} (D - d = {D} - {d}), got {tuple(k_rest.shape)}")
    check_same_device([("k_lr", k_lr), ("k_rest", k_rest), ("v", v)])
    return B, KVH, S, D, d


def check_lengths(lengths: torch.Tensor, B: int, device, name: str = "lengths") -> None:
    check(isinstance(lengths, torch.Tensor), f"{name} must be a tensor of shape (B,)")
    check(lengths.dtype in INDEX_DTYPES, f"{name} must be int32 or int64, got {lengths.dtype}")
    check(tuple(lengths.shape) == (B,), f"{name} must have shape ({B},), got {tuple(lengths.shape)}")
    check(lengths.device == device, f"{name} is on {lengths.device}, expected {device}")
    check(lengths.is_contiguous(), f"{name} must be contiguous")


def fraction_ratio(frac: float) -> tuple[int, int]:
    """A fractional budget as num / den (den < 2^31): the nearest such fraction to the float, which for a fraction
    written in decimal is that decimal (0.56 -> 14 / 25).  Budgets are ceil(n * num / den) in integers
    (``ceil_fraction``): in float64, 0.56 * 25 = 14.000000000000002 would round up to 15."""
    from fractions import Fraction  # noqa: PLC0415

    r = Fraction(float(frac)).limit_denominator((1 << 31) - 1)
    return r.numerator, r.denominator


def ceil_fraction(n, frac: float):
    """ceil(frac * n) for an int or an integer tensor n, exact (``fraction_ratio``); a tensor comes back int64."""
    num, den = fraction_ratio(frac)
    if isinstance(n, torch.Tensor):
        return torch.div(n.long() * num + (den - 1), den, rounding_mode="floor")
    return (int(n) * num + den - 1) // den


def fraction_arg(frac: float) -> int:
    """``fraction_ratio`` packed into one int64 kernel argument, num << 32 | den (``_budget_of`` unpacks it)."""
    num, den = fraction_ratio(frac)
    return (num << 32) | den


def default_scaling(D: int, scaling):
    return float(D) ** -0.5 if scaling is None else float(scaling)
