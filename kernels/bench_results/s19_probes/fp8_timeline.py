"""Session 19: the 16K step's kernel timeline with the fp8 scoring slab (rows layout), at the defaults and with the
rotation PDL at d = 32 (`BRACKET_ROTATE_PDL_MAX_D = 32`).  Usage: PYTHONPATH=. python this.py OUT_PREFIX"""
import sys

import torch

import kernels.bench as bench
import kernels.bracket as bracket
import kernels.profile as profile

out = sys.argv[1]
bench.LAYOUT, bench.SLAB_DTYPE = "rows", torch.float8_e4m3fn
print("=== fp8 slab, defaults", flush=True)
profile.main(["--timeline", "--configs", "16:16384", "--json", f"{out}_fp8.json"])
bracket.BRACKET_ROTATE_PDL_MAX_D = 32
print("=== fp8 slab, rotation PDL at d = 32", flush=True)
profile.main(["--timeline", "--configs", "16:16384", "--json", f"{out}_fp8_pdl32.json"])
bench.SLAB_DTYPE, bracket.BRACKET_ROTATE_PDL_MAX_D = None, 16
print("=== bf16 slab, defaults", flush=True)
profile.main(["--timeline", "--configs", "16:16384", "--json", f"{out}_bf16.json"])
