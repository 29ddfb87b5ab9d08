"""One Loki decode step per grid point, between cudaProfilerStart/Stop, for Nsight Compute (per-kernel counters).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --metrics "$(python -m kernels.profile --stall-metrics)" \\
        --csv --page details \\
        python -m kernels.profile --configs 16:16384,16:65536 > ncu.csv
    python -m kernels.profile --summarize ncu.csv       # one line per kernel: us, DRAM %, occupancy, stalls

Each point (batch, context, (d, k)) runs the bracket path (the default) a few times un-profiled, then once
profiled, followed by the dense flash-decoding kernel on the same cache as a bandwidth yardstick.  The order of
the profiled kernels is printed on stderr (ncu's output goes to stdout).

    python -m kernels.profile --timeline --configs 16:65536 [--variant NAME] [--json F]

(session 13) prints each kernel's start and end within one Loki step instead, from the CUDA activity records of
torch.profiler (CUPTI) over replays of a CUDA graph holding a few steps: unlike ncu this keeps the kernels'
overlap (programmatic dependent launch) and their real clocks.  Times are medians over the replays, relative to the
step's first kernel start.
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
            sl = case.slab(k_lr)
            for _ in range(warmup):
                loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False, slab=sl)
                dense_decode_attention(q_rot, k_lr, k_rest, v, L, strict=False)
            torch.cuda.synchronize()
            print(f"point B={B} S={S} d={d} k={k}: loki step, then dense", file=sys.stderr)
            cudart.cudaProfilerStart()
            loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False, slab=sl)
            dense_decode_attention(q_rot, k_lr, k_rest, v, L, strict=False)
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


def timeline(configs, dk=DK, steps=4, replays=5):
    """Per point: [(kernel, start_us, end_us)] of one Loki step (medians over `replays` replays of a CUDA graph of
    `steps` steps; the last step of each replay is read, so that the graph's first launch latency is not in it)."""
    import json
    import os
    import statistics
    import tempfile

    out = {}
    for B, S in configs:
        for dfrac, kfrac in dk:
            d, k = D // dfrac, S // kfrac
            case = Case(B, S, d, 1)
            (k_lr, k_rest, v), L, q, P = case.copies[0], case.lengths, case.q, case.P
            sl = case.slab(k_lr)  # (a row layout's slab copy, which the scoring pass reads; None in "split")
            for _ in range(3):
                loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False, slab=sl)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(steps):
                    loki_decode(q, P, k_lr, k_rest, v, L, k, strict=False, slab=sl)
            g.replay()
            torch.cuda.synchronize()
            per_replay = []
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    g.replay()
                    torch.cuda.synchronize()
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "trace.json")
                prof.export_chrome_trace(path)
                with open(path) as f:
                    ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel" and e.get("ph") == "X"]
            ev.sort(key=lambda e: e["ts"])
            n_step = len(ev) // (replays * steps)
            for rr in range(replays):
                step = ev[(rr * steps + steps - 1) * n_step:(rr * steps + steps) * n_step]
                t0 = step[0]["ts"]
                # (the kernel's name and, where a step uses more than one stream, its stream)
                tagged = len({_stream(e) for e in step}) > 1
                per_replay.append([(e["name"].split("(")[0][:40] + (f" [s{_stream(e)}]" if tagged else ""),
                                    e["ts"] - t0, e["ts"] + e["dur"] - t0) for e in step])
            rows = []
            for i, (name, _, _) in enumerate(per_replay[0]):
                rows.append((name, statistics.median(r[i][1] for r in per_replay),
                             statistics.median(r[i][2] for r in per_replay)))
            key = f"B={B} S={S} d={d} k={k}"
            out[key] = rows
            print(f"{key}: {len(rows)} kernels per step", flush=True)
            for name, a, b in rows:
                print(f"  {name:48s} start {a:8.1f}  end {b:8.1f}  dur {b - a:8.1f} us", flush=True)
            del g, case, k_lr, k_rest, v
            torch.cuda.empty_cache()
    return out


def _stream(e):
    return e.get("args", {}).get("stream")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="16:16384,16:65536", help="comma list of B:S")
    ap.add_argument("--summarize", default=None, help="print a per-kernel table of an ncu --csv details file")
    ap.add_argument("--stall-metrics", action="store_true", help="print the stall-reason metrics for ncu --metrics")
    ap.add_argument("--variant", default=None, help="profile under one kernels.bench VARIANTS entry (module defaults)")
    ap.add_argument("--timeline", action="store_true", help="kernel start / end within a step (torch.profiler)")
    ap.add_argument("--json", default=None, help="--timeline: also write the rows to this JSON file")
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
    if a.timeline:
        res = timeline(parse_configs(a.configs))
        if a.json:
            import json
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    run(parse_configs(a.configs))


if __name__ == "__main__":
    main()
