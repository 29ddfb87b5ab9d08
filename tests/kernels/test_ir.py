"""The kernels' Triton GPU IR for sm_90, compiled on this machine (`kernels.ir`): performance properties that the
interpreter cannot show.  One subprocess (the interpreter, which conftest.py turns on without a GPU, replaces the
kernels' JIT functions)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def ir_facts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.ir", "all", "--json"], env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0 and "backends" in res.stderr and "nvidia" in res.stderr.lower():
        pytest.skip(f"this Triton cannot compile for NVIDIA targets: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_classify_has_no_layout_conversions(ir_facts):
    """One key per thread (BRACKET_CLASSIFY_SCALAR, the default): the keys, positions and masks of the scattered
    stores stay in one layout.  The 16-byte-vector layout the key load would otherwise get costs six shared-memory
    conversions per block (measured 2-4 us slower per step on the H200, kernels/NOTES.md "v9")."""
    assert ir_facts["classify_scalar"]["convert_layout"] == 0
    assert ir_facts["classify_scalar"]["blocked_layouts"] == 1
    assert ir_facts["classify_blocked"]["convert_layout"] > 0


def test_early_attention_keeps_its_pipeline(ir_facts):
    """The sparse loop split at the rows' ready indices (session 11, kernels.loki.ATTN_EARLY) is two loops with a
    griddepcontrol wait between them: each keeps the single loop's copies in flight (async_wait num=3), and they share
    its shared memory (two programs per SM, as before)."""
    one, two = ir_facts["attention_sparse"], ir_facts["attention_sparse_early"]
    assert two["async_wait_num"] == one["async_wait_num"] * 2
    assert two["shared_bytes"] == one["shared_bytes"]


def test_vec_classify_stores_keep_their_layout(ir_facts):
    """The vec classify kernel (BRACKET_CLASSIFY_VEC, the default since session 11): with its scattered stores in
    inline PTX (`_store_if`) they stay in the 4-keys-per-thread layout (the two conversions left are the per-thread
    sums' scan), where tl.store's coalescing adds six more; and it issues fewer SASS instructions per 1024 keys than
    the session-7 kernel (measured 32 -> 22 us at 64K on the H200, kernels/NOTES.md "v13")."""
    vec, plain = ir_facts["classify_vec4"], ir_facts["classify_vec4_noasm"]
    assert vec["convert_layout"] <= 2 < plain["convert_layout"]
    if "sass_instructions" in vec:
        assert vec["sass_instructions"] < 0.8 * ir_facts["classify_scalar"]["sass_instructions"]
    # the band select as configured since session 11 (stores through the same helper, positions loaded with the
    # keys): fewer registers at a 8192-key block (Triton 3.9: 103 against 159; the H200's 3.6: 151 against 193 under
    # ncu; there the stores alone take 212, `h200_pytest_s11h.log`)
    if "registers" in ir_facts["finish_8192_idx_first_asm"]:
        assert ir_facts["finish_8192_idx_first_asm"]["registers"] < ir_facts["finish_8192"]["registers"]


def test_instruction_counts_are_reported(ir_facts):
    """Every preset reports its PTX instruction count and, where the Triton wheel's cuobjdump runs, its SASS count
    (what the SM issues; session 9 found PTX a poor proxy for it: kernels/NOTES.md "v11")."""
    from kernels.ir import cuobjdump_tool

    # where cuobjdump exists (it ships with Triton's NVIDIA backend), the SASS / register facts the other tests guard
    # with `if "registers" in ...` must be there, so those guards cannot silently skip their claims
    has_tool = cuobjdump_tool() is not None
    for name, f in ir_facts.items():
        assert f["ptx_instructions"] > 50, name
        if has_tool:
            assert f["sass_instructions"] > 50 and f["registers"] > 0 and "local_bytes" in f, name


def test_dense_attention_loop_keeps_copies_in_flight(ir_facts):
    """The dense flash-decoding loop is software-pipelined: its first wait leaves copies in flight (num > 0).  The
    sparse loop's gathers are async copies too (`python -m kernels.ir attention`; NOTES.md "v9", "v10" and "v12")."""
    dense, sparse = ir_facts["attention_dense"], ir_facts["attention_sparse"]
    assert dense["async_copy"] > 0 and dense["async_wait_num"][0] > 0
    assert sparse["async_copy"] > 0


def test_sparse_attention_indices_are_not_copied_per_iteration(ir_facts):
    """Session 8: the indices are plain loads one iteration ahead of their gathers, so only the K/V gathers are async
    copies (sessions 1-7: the indices too, once per register layout that used them; measured 1-3% slower per step)."""
    assert ir_facts["attention_sparse_s8"]["async_copy"] < ir_facts["attention_sparse_s7"]["async_copy"]
    assert ir_facts["attention_sparse_s8"]["shared_bytes"] <= ir_facts["attention_sparse_s7"]["shared_bytes"]
    assert ir_facts["attention_sparse"]["async_copy"] < ir_facts["attention_sparse_s7"]["async_copy"]


def test_sparse_attention_default_keeps_a_tile_in_flight(ir_facts):
    """Session 10's default (SPARSE_CONFIG: one 16-bit dot each, 3 stages): the indices-ahead loop's first wait
    leaves copies in flight (the next tile's gathers overlap this tile's dots), where session 8's 2-stage loop drained
    them; single dots also need fewer registers than the ~fp32 split ones (kernels/NOTES.md "v12")."""
    new, s8 = ir_facts["attention_sparse"], ir_facts["attention_sparse_s8"]
    assert new["async_wait_num"][0] > 0 and s8["async_wait_num"][0] == 0
    if "registers" in new and "registers" in s8:
        assert new["registers"] < s8["registers"]
        assert new["local_bytes"] == 0 and ir_facts["attention_sparse_r128"]["registers"] <= 128


def test_fp8_slab_scores_keep_their_pipeline(ir_facts):
    """An fp8 slab (session 19, opt-in): the scoring loop widens each tile to fp16 and keeps the 16-bit slab's
    software pipeline (the same copies in flight), with no spills."""
    fp8, bf16 = ir_facts["scores_d32_fp8"], ir_facts["scores_d32_flow"]
    assert fp8["async_wait_num"] == bf16["async_wait_num"] and fp8["async_copy"] == bf16["async_copy"]
    assert fp8.get("local_bytes", 0) == 0
