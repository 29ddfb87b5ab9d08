"""One Loki decode step per grid point, between cudaProfilerStart/Stop, for Nsight Compute (per-kernel counters).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --metrics "$(python -m kernels.profile --stall-metrics)" \\
        --csv --page details \\
        python -m kernels.profile --configs 16:16384,16:65536 > ncu.csv
    python -m kernels.profile --summarize ncu.csv       # one line per kernel: us, DRAM %, occupancy, stalls

Each point (batch, context, (d, k)) runs the bracket path (the default) a few times un-profiled, then once
profiled, followed by the dense flash-decoding kernel on the same cache as a bandwidth yardstick.  The order of
the profiled kernels is printed on stderr (ncu's output goes to stdout).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

import torch

from .attention import dense_decode_attention
from .bench import D, Case, parse_configs
from .loki import loki_decode

DK = ((4, 4), (4, 8), (8, 16))  # (D/d, 1/k)


def run(configs, dk=DK, warmup=3):
    cudart = torch.cuda.cudart()
    for B, S in configs:
        for dfrac, kfrac in dk:
            d, k = D // dfrac, S // kfrac
            case = Case(B, S, d, 1)  # the benchmark's random cache, q and P
            (k_lr, k_rest, v), L, q, P, q_rot = case.copies[0], case.lengths, case.q, case.P, case.q_rot
            for _ in range(warmup):
                loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False)
                dense_decode_attention(q_rot, k_lr, k_rest, v, L)
            torch.cuda.synchronize()
            print(f"point B={B} S={S} d={d} k={k}: loki step, then dense", file=sys.stderr)
            cudart.cudaProfilerStart()
            loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False)
            dense_decode_attention(q_rot, k_lr, k_rest, v, L)
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
            del case, k_lr, k_rest, v
            torch.cuda.empty_cache()


METRICS = {  # ncu "details" rows kept by --summarize: (section, metric name) -> column
    "Duration": "us", "DRAM Throughput": "dram%", "Memory Throughput": "mem%", "Achieved Occupancy": "occ%",
    "Theoretical Occupancy": "th_occ%", "Registers Per Thread": "regs", "Grid Size": "grid",
    "Block Size": "block", "Warp Cycles Per Issued Instruction": "cyc/issue",
}
STALLS = ("long_scoreboard", "barrier", "membar", "short_scoreboard", "wait", "lg_throttle", "math_pipe_throttle",
          "no_instruction", "mio_throttle", "not_selected", "selected", "drain", "branch_resolving", "dispatch_stall")
STALL_METRICS = ",".join(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS)


def summarize(path):
    """One line per profiled kernel of an `ncu --csv --page details` file."""
    rows = defaultdict(dict)
    names = {}
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for r in csv.DictReader(lines):
        key = int(r["ID"])
        names[key] = r["Kernel Name"]
        col = METRICS.get(r["Metric Name"])
        if r["Metric Name"].startswith("smsp__average_warps_issue_stalled_"):
            col = "stall:" + r["Metric Name"][len("smsp__average_warps_issue_stalled_"):].split("_per_")[0]
        if col:
            v = float(r["Metric Value"].replace(",", "")) if r["Metric Value"] else float("nan")
            if col == "us" and r["Metric Unit"] in ("nsecond", "ns"):
                v /= 1e3
            elif col == "us" and r["Metric Unit"] in ("msecond", "ms"):
                v *= 1e3
            rows[key][col] = v
    cols = list(dict.fromkeys(METRICS.values()))
    print(f"{'id':>4} {'kernel':40s} " + " ".join(f"{c:>9s}" for c in cols) + "  top stalls (cycles per issue)")
    for key in sorted(rows):
        st = sorted(((v, c[6:]) for c, v in rows[key].items() if c.startswith("stall:")), reverse=True)[:4]
        print(f"{key:>4} {names[key][:40]:40s} " + " ".join(f"{rows[key].get(c, float('nan')):9.1f}" for c in cols)
              + "  " + ", ".join(f"{n} {v:.1f}" for v, n in st))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="16:16384,16:65536", help="comma list of B:S")
    ap.add_argument("--summarize", default=None, help="print a per-kernel table of an ncu --csv details file")
    ap.add_argument("--stall-metrics", action="store_true", help="print the stall-reason metrics for ncu --metrics")
    ap.add_argument("--variant", default=None, help="profile under one kernels.bench VARIANTS entry (module defaults)")
    a = ap.parse_args(argv)
    if a.stall_metrics:
        print(STALL_METRICS)
        return
    if a.summarize:
        summarize(a.summarize)
        return
    if a.variant:
        from .bench import apply_variant
        apply_variant(a.variant)
    run(parse_configs(a.configs))


if __name__ == "__main__":
    main()
