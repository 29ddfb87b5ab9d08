"""Triton decode kernels for Loki (low-rank keys for efficient sparse attention).

Importable with torch and triton alone.  See kernels/README.md for the layout and the API contract.
"""
from ._utils import LokiInputError
from .attention import dense_decode_attention, sparse_decode_attention
from .bracket import forced_count, fraction_budget, loki_select_bracket
from .kv_cache import allocate_cache, allocate_cache_rows, append_kv, prefill_kv
from .loki import loki_decode
from .scores import loki_scores, rotate_q
from .topk import loki_select, topk_select

__all__ = [
    "LokiInputError",
    "allocate_cache",
    "allocate_cache_rows",
    "append_kv",
    "prefill_kv",
    "rotate_q",
    "loki_scores",
    "topk_select",
    "loki_select",
    "loki_select_bracket",
    "forced_count",
    "fraction_budget",
    "sparse_decode_attention",
    "dense_decode_attention",
    "loki_decode",
]
