"""Session 19: `kernels.profile` (one step per point, for Nsight Compute) in the rows layout with a bf16 or fp8
scoring slab.  Usage (see kernels/profile.py for the ncu flags):
    ncu ... python kernels/bench_results/s19_probes/fp8_ncu.py {bf16,fp8} > ncu.csv"""
import sys

import torch

import kernels.bench as bench
import kernels.profile as profile

bench.LAYOUT = "rows"
bench.SLAB_DTYPE = torch.float8_e4m3fn if sys.argv[1] == "fp8" else None
profile.main(["--configs", "16:16384"])
