"""Compile a kernel of this package for an NVIDIA target on a machine without a GPU, and read its Triton GPU IR.

    python -m kernels.ir classify               # facts of the classify kernel (one-key-per-thread and not)
    python -m kernels.ir attention              # the flash-decoding kernel, dense and sparse, d = 32
    python -m kernels.ir classify --dump DIR    # also write each variant's .ttgir and .ptx to DIR
    python -m kernels.ir all --json             # every preset's facts as JSON (the tests read this)

Triton's NVIDIA backend, ptxas included, ships in the `triton` wheel, so `triton.compile` builds sm_90 code here
(run without TRITON_INTERPRET: the interpreter replaces the kernels' JIT functions).  Two facts of the IR decide
much of a memory-bound kernel's speed and are invisible in the interpreter:

* ``ttg.convert_layout``: a tensor moved between register layouts, through shared memory.  The classify kernel
  had six per 1024 keys (pointers, keys and masks of its scattered stores); `BRACKET_CLASSIFY_SCALAR` removes
  them (session 7, kernels/NOTES.md "v9").
* ``ttg.async_wait {num = N}`` in a software-pipelined loop: N copies stay in flight while the loop computes;
  N = 0 drains them all at every iteration.  The dense flash-decoding loop waits with N = 3.  Until session 7 the
  sparse loop also async-copied each tile's indices in the iteration of its gathers (14 copies, two round trips per
  iteration, N = 0); in sessions 8-9 they were plain loads one iteration ahead (6 copies, one round trip, still
  N = 0 at 2 stages); since session 10 (one 16-bit dot each, 3 stages) the loop waits with N = 3 too.

Each preset also reports ``registers`` and ``local_bytes`` (spills; `cuobjdump -res-usage`, session 10), and
``ptx_instructions`` and ``sass_instructions`` (the cubin disassembled with the wheel's cuobjdump): for an issue-bound kernel the SASS count per block is the cost (session 9: a 35% shorter PTX listing
of the classify kernel executed only 6% fewer SASS instructions on the H200).

The IR is that of the installed Triton (3.9 here; the H200 machine has 3.6), so check a finding on the GPU.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys

ARCH = 90  # H100 / H200

# per preset: kernel (module, name), pointer dtypes, constexprs, launch options, args not divisible by 16
PRESETS = {
    "classify_scalar": dict(kernel=("kernels.bracket", "_bracket_classify_kernel"), ptr="*i32",
                            constexprs=dict(BLOCK_C=1024, SCALAR=True), num_warps=4, num_stages=3, odd=("R",)),
    "classify_blocked": dict(kernel=("kernels.bracket", "_bracket_classify_kernel"), ptr="*i32",
                             constexprs=dict(BLOCK_C=1024, SCALAR=False), num_warps=4, num_stages=3, odd=("R",)),
}
_ATTN = dict(kernel=("kernels.attention", "_flash_decode_kernel"),
             ptr={"q_ptr": "*fp32", "klr_ptr": "*bf16", "krs_ptr": "*bf16", "v_ptr": "*bf16", "idx_ptr": "*i32",
                  "len_ptr": "*i32", "o_ptr": "*bf16", "mp_ptr": "*fp32", "lp_ptr": "*fp32", "op_ptr": "*fp32",
                  "cnt_ptr": "*i32", "rdy_ptr": "*i32"},
             constexprs=dict(SPLIT=True, FOLD=True, NS_PAD=4, FOLD_VEC=True, HPR_P2=4, HPR=4, G_PAD=16, D=128, D_LR=32,
                             BLOCK_DL=32, BLOCK_DR=128, BLOCK_D=128, BLOCK_N=64, K_FP32=False, HAS_REST=True,
                             AHEAD=False, HILO=True),
             num_warps=4, num_stages=3, odd=("R", "G", "H", "NSPLIT", "TPS"), fp32=("qk_scale",))
PRESETS["attention_dense"] = dict(_ATTN, constexprs=dict(_ATTN["constexprs"], DENSE=True))
# the sparse loop as in sessions 1-7 (indices loaded in the iteration of their gathers, 3 stages), in session 8-9
# (indices one iteration ahead, ~fp32 split dots, 2 stages) and since session 10 (one 16-bit dot each, 3 stages:
# SPARSE_CONFIG), and that under a 128-register cap (an option)
PRESETS["attention_sparse_s7"] = dict(_ATTN, constexprs=dict(_ATTN["constexprs"], DENSE=False))
PRESETS["attention_sparse_s8"] = dict(_ATTN, constexprs=dict(_ATTN["constexprs"], DENSE=False, AHEAD=True),
                                      num_stages=2)
PRESETS["attention_sparse"] = dict(_ATTN, constexprs=dict(_ATTN["constexprs"], DENSE=False, AHEAD=True, HILO=False),
                                   num_stages=3)
PRESETS["attention_sparse_r128"] = dict(PRESETS["attention_sparse"], options=dict(maxnreg=128))
# session 11: the sparse loop split at the rows' ready indices, with a programmatic-dependent-launch wait between
PRESETS["attention_sparse_early"] = dict(PRESETS["attention_sparse"],
                                         constexprs=dict(PRESETS["attention_sparse"]["constexprs"], EARLY=True,
                                                         PDL=True))
# session 13: 128-token tiles at 2 stages (kernels.loki.ATTN_WIDE_* at d >= 17), and the whole-K-row tiles of a row
# layout (attention.WIDEN_ROWS: d = D, no k_rest tile), at 64 / 3 stages and 128 / 2
_EARLY = PRESETS["attention_sparse_early"]
PRESETS["attention_sparse_early_bn128"] = dict(_EARLY, constexprs=dict(_EARLY["constexprs"], BLOCK_N=128),
                                               num_stages=2)
_ROWS = dict(_EARLY["constexprs"], D_LR=128, BLOCK_DL=128, HAS_REST=False)
PRESETS["attention_sparse_early_rows"] = dict(_EARLY, constexprs=_ROWS)
PRESETS["attention_sparse_early_rows_bn128"] = dict(_EARLY, constexprs=dict(_ROWS, BLOCK_N=128), num_stages=2)
# session 10: the classify kernel with its L2 eviction hints (BRACKET_CACHE_HINTS)
PRESETS["classify_hints"] = dict(PRESETS["classify_scalar"],
                                 constexprs=dict(PRESETS["classify_scalar"]["constexprs"], HINTS=True))
# session 11: several consecutive keys per thread, scanned in the thread, stores in inline PTX (BRACKET_CLASSIFY_VEC)
_VEC = dict(kernel=("kernels.bracket", "_bracket_classify_vec_kernel"), ptr="*i32", num_warps=4, num_stages=3,
            odd=("R", "NBLK", "EXPECT"))
PRESETS["classify_vec4"] = dict(_VEC, constexprs=dict(BLOCK_C=1024, KPT=4, ASM=True))
PRESETS["classify_vec4_2048"] = dict(_VEC, constexprs=dict(BLOCK_C=2048, KPT=4, ASM=True))
PRESETS["classify_vec4_noasm"] = dict(_VEC, constexprs=dict(BLOCK_C=1024, KPT=4, ASM=False))
PRESETS["classify_vec4_nb2"] = dict(_VEC, constexprs=dict(BLOCK_C=1024, KPT=4, ASM=True, NB=2))
PRESETS["classify_vec4_nb4"] = dict(_VEC, constexprs=dict(BLOCK_C=1024, KPT=4, ASM=True, NB=4))
# the band select (one program per row, 8 warps) at a 8192-key register block, with and without its positions
# loaded together with the keys (BRACKET_BAND_IDX_FIRST, session 11)
_FINISH = dict(kernel=("kernels.bracket", "_bracket_finish_kernel"),
               ptr={"qrot_ptr": "*fp32", "klr_ptr": "*bf16", "ws_ptr": "*i32", "br_ptr": "*i32", "out_ptr": "*i32",
                    "len_ptr": "*i32", "kb_ptr": "*i32"},
               constexprs=dict(KB_MODE=2, HPR=4, G_PAD=16, D_LR=32, BLOCK_DL=32, BLOCK_N=256, BLOCK_S=2048,
                               K_FP32=False, REDUCE_MAX=True, KEYS_WRITTEN=True, BAND_REG=8192, EARLY=True),
               num_warps=8, num_stages=3, odd=("R", "G", "FRAC_Q", "K_INT", "FORCED", "SINK", "LOCAL"),
               fp32=("scale",), i64=("FRAC_Q",))
PRESETS["finish_8192"] = _FINISH
PRESETS["finish_8192_idx_first"] = dict(_FINISH, constexprs=dict(_FINISH["constexprs"], IDX_FIRST=True))
PRESETS["finish_8192_asm"] = dict(_FINISH, constexprs=dict(_FINISH["constexprs"], ASM=True))
PRESETS["finish_8192_idx_first_asm"] = dict(_FINISH, constexprs=dict(_FINISH["constexprs"], IDX_FIRST=True, ASM=True))
# session 12: under a register cap (BRACKET_FINISH_MAXNREG), so that two attention programs fit beside it
PRESETS["finish_8192_idx_first_asm_r112"] = dict(PRESETS["finish_8192_idx_first_asm"], options=dict(maxnreg=112))
PRESETS["finish_8192_idx_first_asm_r96"] = dict(PRESETS["finish_8192_idx_first_asm"], options=dict(maxnreg=96))
# the scoring kernel (d = 32, its grid's column 0 writing the brackets), and with the session-11 option
# BRACKET_ROTATE_PDL (launched during the rotation: slab tiles prefetched into L2, then a griddepcontrol wait)
_SCORES = dict(kernel=("kernels.bracket", "_bracket_scores_kernel"),
               ptr={"qrot_ptr": "*fp32", "klr_ptr": "*bf16", "ws_ptr": "*i32", "br_ptr": "*i32", "ac_ptr": "*i32",
                    "out_ptr": "*i32", "len_ptr": "*i32", "kb_ptr": "*i32"},
               constexprs=dict(ZERO_AC=True, KB_MODE=2, HPR=4, G_PAD=16, D_LR=32, BLOCK_DL=32, BLOCK_N=128, TILES=4,
                               K_FP32=False, REDUCE_MAX=True, CLASSIFY=False, OVERLAP=1, SAMPLE=1024, SUB=128,
                               STAGES=3),
               num_warps=4, num_stages=3, odd=("R", "G", "FRAC_Q", "K_INT", "FORCED", "SINK", "LOCAL", "TPP", "NCOL"),
               fp32=("scale", "nsig"), i64=("FRAC_Q",))
PRESETS["scores_d32"] = _SCORES
PRESETS["scores_d32_rotate_pdl"] = dict(_SCORES, constexprs=dict(_SCORES["constexprs"], PDL=True, PREFETCH=2))
# session 13: BRACKET_FLOW (a one-dimensional grid in row order, each program counting itself in its row's record)
PRESETS["scores_d32_flow"] = dict(_SCORES, constexprs=dict(_SCORES["constexprs"], FLOW=True, FLOW_PDL=True))
PRESETS["scores_d16"] = dict(_SCORES, constexprs=dict(_SCORES["constexprs"], D_LR=16, BLOCK_DL=16, BLOCK_N=256,
                                                       TILES=2))
# session 19: an fp8 (e4m3) slab, widened to fp16 in the tile (`scores._score_tile`), against fp16 halves of q'
PRESETS["scores_d32_fp8"] = dict(_SCORES, ptr=dict(_SCORES["ptr"], klr_ptr="*fp8e4nv"),
                                 constexprs=dict(_SCORES["constexprs"], FLOW=True, FLOW_PDL=True))
PRESETS["classify_vec4_flow"] = dict(_VEC, constexprs=dict(BLOCK_C=1024, KPT=4, ASM=True, FLOW=True))
GROUPS = {"finish": ("finish_8192", "finish_8192_idx_first", "finish_8192_asm", "finish_8192_idx_first_asm",
                     "finish_8192_idx_first_asm_r112", "finish_8192_idx_first_asm_r96"),
          "scores": ("scores_d32", "scores_d32_rotate_pdl", "scores_d32_flow", "scores_d16", "scores_d32_fp8"),
          "classify": ("classify_scalar", "classify_blocked", "classify_hints", "classify_vec4", "classify_vec4_2048",
                       "classify_vec4_noasm", "classify_vec4_nb2", "classify_vec4_nb4", "classify_vec4_flow"),
          "attention": ("attention_dense", "attention_sparse", "attention_sparse_s8", "attention_sparse_s7",
                        "attention_sparse_r128", "attention_sparse_early", "attention_sparse_early_bn128",
                        "attention_sparse_early_rows", "attention_sparse_early_rows_bn128")}


def compile_preset(name: str):
    """triton.compile of preset `name` for sm_ARCH; returns the CompiledKernel."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.ir compiles real kernels: run it without TRITON_INTERPRET=1")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    p = PRESETS[name]
    kern = getattr(importlib.import_module(p["kernel"][0]), p["kernel"][1])
    sig, attrs = {}, {}
    constexprs = dict(p["constexprs"])
    for i, (arg, par) in enumerate(inspect.signature(kern.fn).parameters.items()):
        if arg not in constexprs and par.default is not inspect.Parameter.empty:
            constexprs[arg] = par.default  # a constexpr with a default (e.g. a session's optional flag)
        if arg in constexprs:
            sig[arg] = "constexpr"
            continue
        if arg.endswith("_ptr"):
            sig[arg] = p["ptr"][arg] if isinstance(p["ptr"], dict) else p["ptr"]
        else:
            sig[arg] = "fp32" if arg in p.get("fp32", ()) else "i64" if arg in p.get("i64", ()) else "i32"
        if not sig[arg].startswith("fp") and arg not in p.get("odd", ()):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton's launcher assumes of 16-aligned pointers / ints
    src = ASTSource(fn=kern, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                          options=dict(num_warps=p["num_warps"], num_stages=p["num_stages"], **p.get("options", {})))


def facts(ttgir: str) -> dict:
    """Counts read off a TTGIR listing: layout conversions, async copies and the waits' `num` (in order)."""
    return {"convert_layout": len(re.findall(r"ttg\.convert_layout", ttgir)),
            "async_copy": len(re.findall(r"ttg\.async_copy_global_to_local", ttgir)),
            "async_wait_num": [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+)", ttgir)],
            "blocked_layouts": len(re.findall(r"^#blocked\d* = ", ttgir, flags=re.M))}


def ptx_instructions(ptx: str) -> int:
    """PTX instructions of a listing (lines that are not directives, labels, braces or comments).  Session 9: a
    proxy only; ptxas can shrink a listing's scan a lot (35% fewer PTX instructions measured 6% fewer executed SASS
    instructions, kernels/NOTES.md "v11")."""
    return sum(1 for ln in ptx.splitlines()
               if ln.strip() and not re.match(r"\s*(//|\.|\$L|[{})])", ln))


def cuobjdump_tool() -> str | None:
    """PATH's cuobjdump, or the one Triton's NVIDIA backend ships; None where there is neither."""
    import shutil

    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return shutil.which("cuobjdump") or (bundled if os.path.isfile(bundled) else None)


def _cuobjdump(cubin: bytes | None, flag: str) -> str | None:
    """`cuobjdump <flag>` of a cubin (`cuobjdump_tool`), or None where it is not available or fails."""
    import subprocess
    import tempfile

    tool = cuobjdump_tool()
    if not cubin or not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, flag, f.name], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def sass_instructions(cubin: bytes | None) -> int | None:
    """SASS instructions of a cubin (cuobjdump from Triton's NVIDIA backend), or None where it is not available.
    What the SM issues; ncu's executed-instruction count divided by the blocks' warps is about this times the loop
    trips."""
    out = _cuobjdump(cubin, "-sass")
    return None if out is None else len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", out, flags=re.M))


def resource_usage(cubin: bytes | None) -> dict:
    """Registers per thread and local-memory (spill) bytes of a cubin's kernel (`cuobjdump -res-usage`); {} where
    the tool is not available."""
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", _cuobjdump(cubin, "-res-usage") or "")
    return {"registers": int(m.group(1)), "local_bytes": int(m.group(2))} if m else {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=sorted(GROUPS) + sorted(PRESETS) + ["all"])
    ap.add_argument("--dump", default=None, help="write <preset>.ttgir and <preset>.ptx to this folder")
    ap.add_argument("--json", action="store_true", help="print {preset: facts} as JSON")
    a = ap.parse_args(argv)
    names = list(PRESETS) if a.what == "all" else GROUPS.get(a.what, (a.what,))
    out = {}
    for name in names:
        ck = compile_preset(name)
        out[name] = facts(ck.asm["ttgir"])
        out[name]["shared_bytes"] = int(ck.metadata.shared)
        out[name]["ptx_instructions"] = ptx_instructions(ck.asm["ptx"])
        n_sass = sass_instructions(ck.asm.get("cubin"))
        if n_sass is not None:
            out[name]["sass_instructions"] = n_sass
        out[name].update(resource_usage(ck.asm.get("cubin")))
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(a.dump, f"{name}.{ext}"), "w") as f:
                    f.write(ck.asm[ext])
    if a.json:
        print(json.dumps(out))
    else:
        for name, f in out.items():
            print(f"{name:18s} " + "  ".join(f"{k}={v}" for k, v in f.items()))


if __name__ == "__main__":
    sys.exit(main())
