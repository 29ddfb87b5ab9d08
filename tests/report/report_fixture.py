"""A small, synthetic but well-formed results folder (every input the report reads), so the report, the
notebooks and the W&B logging are tested in seconds without running a model.

Values follow closed formulas (``ppl_of``...) so tests can recompute what every figure must show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

EXP = "smoke"
MODEL, CALIB, CORPUS = "smollm2-135m", "lee_news", "enwiki_sample"
HEAD_DIM, LAYERS, KV_HEADS, HEADS = 64, 4, 3, 9  # GQA: G = 3 query heads per KV head
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOKI_DEFAULTS = {"basis": "offline", "d": 16, "d_variance": None, "dense_layers": 0, "group_reduce": "max",
                 "k": 0.25, "k_mode": "prefix", "local_window": 0, "rope": "post", "selection": "head",
                 "sink_tokens": 0, "sparse_prefill": True}
TOPK_DEFAULTS = {"k": 0.25, "k_mode": "prefix", "sink_tokens": 0, "local_window": 0, "dense_layers": 0,
                 "sparse_prefill": True}

# (eval, tag, method, options)
POINTS = [("perplexity", "dense", "dense", {})]
POINTS += [("perplexity", f"exact_topk-k{k}", "exact_topk", {"k": k}) for k in (0.25, 0.5)]
POINTS += [("perplexity", f"loki-d{d}-k{k}", "loki", {"d": d, "k": k}) for d in (8, 16) for k in (0.25, 0.5)]
POINTS += [("perplexity", "loki-d16-k0.25-ropepre", "loki", {"d": 16, "k": 0.25, "rope": "pre"})]
POINTS += [("perplexity", "loki-d16-k0.25-selectiongroup", "loki", {"d": 16, "k": 0.25, "selection": "group"})]
POINTS += [("selection", "exact_topk-k0.25", "exact_topk", {"k": 0.25})]
POINTS += [("selection", f"loki-d{d}-k{k}", "loki", {"d": d, "k": k}) for d in (8, 16) for k in (0.25, 0.5)]
POINTS += [("passkey", "dense", "dense", {}), ("passkey", "loki-d16-k0.25", "loki", {"d": 16, "k": 0.25})]


def ppl_of(method, d, k, rope="post"):
    if method == "dense":
        return 20.0
    base = 20.0 * (1 + 0.08 / k)
    return base if method == "exact_topk" else base * (1 + 2.0 / d) * (1.1 if rope == "pre" else 1.0)


def recall_of(method, d, k, layer):
    if method == "exact_topk":
        return 1.0
    return round(min(1.0, 0.5 + d / 64 + k / 2 - 0.03 * layer), 6)


def accuracy_of(method, d, k):
    return 1.0 if method == "dense" else 0.8


def options_for(method, opts):
    if method == "dense":
        return {}
    base = dict(LOKI_DEFAULTS if method == "loki" else TOPK_DEFAULTS)
    base.update(opts)
    return base


def config_for(ev, method, options):
    return {
        "experiment_name": EXP, "results_dir": f"results/{EXP}", "seed": 0, "threads": 1, "device": "auto",
        "model": {"name": MODEL, "path": f"resources/models/{MODEL}", "dtype": "float32"},
        "calib": {"name": CALIB, "path": f"resources/corpora/{CALIB}.txt"},
        "data": {"name": CORPUS, "path": f"resources/corpora/{CORPUS}.txt"},
        "eval": {"name": ev, "window": 128, "num_windows": 2, "batch_size": 1},
        "method": {"name": method, **options},
        "pca_path": f"results/{EXP}/pca/{MODEL}/{CALIB}/pca.safetensors",
        "wandb": {"mode": "offline", "project": "loki", "dir": f"results/{EXP}"},
    }


def metrics_for(ev, method, opts):
    options = options_for(method, opts)
    d, k = options.get("d"), options.get("k")
    m = {"experiment": EXP, "model": MODEL, "corpus": CORPUS, "eval": ev, "method": method, "options": options,
         "d": d, "k": k, "attention_calls": 8, "seconds": 1.5, "git_commit": COMMIT,
         "config": config_for(ev, method, options)}
    if ev == "perplexity":
        ppl = ppl_of(method, d, k, options.get("rope", "post"))
        m.update(ppl=ppl, nll=math.log(ppl), tokens=254, window=128, num_windows=2)
        if k is not None:  # the K/V rows each KV head read, as the methods count them (a group's union)
            m.update(kept_fraction=k, kv_rows_fraction=min(1.0, k * (1.0 if options.get("selection") == "group" else 1.8)))
        elif method == "dense":
            m.update(kept_fraction=1.0, kv_rows_fraction=1.0)
    elif ev == "selection":
        per_layer = [{"layer": i, "recall": recall_of(method, d, k, i), "attention_mass": 0.9 - 0.01 * i,
                      "output_rel_error": 0.01 * (i + 1)} for i in range(LAYERS)]
        # (the selection eval runs fewer windows than the config's num_windows: it records the count it ran)
        m.update(recall=sum(e["recall"] for e in per_layer) / LAYERS, attention_mass=0.885,
                 output_rel_error=0.025, per_layer=per_layer, window=128, num_windows=1)
    else:
        m.update(accuracy=accuracy_of(method, d, k), per_case=[{"depth": 0.5, "correct": True}], cases=1,
                 max_length=512, decode_only=False, accuracy_by_length={"512": 1.0})
    return m


def rank_rows():
    rows = []
    for side in ("pre", "post"):
        for layer in range(LAYERS):
            for h in range(KV_HEADS):
                for t in (0.8, 0.9, 0.95):
                    r = int(10 + 5 * layer + 3 * h + (6 if side == "post" else 0) + 40 * (t - 0.8))
                    rows.append((side, layer, h, t, r, HEAD_DIM))
    return rows


def make_results(root: Path, experiment_dir: str = f"results/{EXP}", kernels: bool = True, transfer: bool = True,
                 decode: bool = True) -> Path:
    """Write the fixture under ``root``; returns the results folder."""
    root = Path(root)
    res = root / experiment_dir
    for ev, tag, method, opts in POINTS:
        p = res / "evaluate" / ev / tag / "metrics.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(metrics_for(ev, method, opts), indent=2, sort_keys=True) + "\n")
    pca = res / "pca" / MODEL / CALIB
    pca.mkdir(parents=True, exist_ok=True)
    (pca / "rank.csv").write_text("side,layer,head,threshold,rank,head_dim\n"
                                  + "".join(f"{s},{l},{h},{t},{r},{D}\n" for s, l, h, t, r, D in rank_rows()))
    if transfer:  # the transfer stage fits a basis on each of its corpora: a second rank figure
        other = res / "pca" / MODEL / CORPUS
        other.mkdir(parents=True, exist_ok=True)
        (other / "rank.csv").write_text((pca / "rank.csv").read_text())
    (pca / "pca.json").write_text(json.dumps({"fingerprint": {"head_dim": HEAD_DIM, "name": MODEL, "num_heads": HEADS,
                                                              "num_kv_heads": KV_HEADS},
                                              "fitted_on": {"corpus": CALIB, "tokens": 1024, "seq_len": 256}}))
    if transfer:
        (res / "transfer").mkdir(parents=True, exist_ok=True)
        lines = ["fit_corpus,eval_corpus,side,d,explained_variance"]
        for f in (CALIB, CORPUS):
            for e in (CALIB, CORPUS):
                for side in ("pre", "post"):
                    for d in (8, 16):
                        lines.append(f"{f},{e},{side},{d},{transfer_ev(f, e, side, d)}")
        (res / "transfer" / "transfer.csv").write_text("\n".join(lines) + "\n")
    if decode:
        (res / "bench").mkdir(parents=True, exist_ok=True)
        rows = [{"method": "dense", "d": None, "k": None, "batch": 1, "context": c, "tokens_per_s": 50.0,
                 "speedup": 1.0} for c in (1024, 4096)]
        rows += [{"method": "loki", "d": 8, "k": 0.5, "batch": b, "context": c, "tokens_per_s": 60.0 + c / 1024,
                  "speedup": decode_speedup(b, c), "selection": "head"} for b in (1, 4) for c in (1024, 4096)]
        # the same (d, k) with group selection, faster: a head-selection result must not take its figure
        rows += [{"method": "loki", "d": 8, "k": 0.5, "batch": 4, "context": 4096, "tokens_per_s": 99.0,
                  "speedup": 9.0, "selection": "group"}]
        # as loki.bench writes them: a dense_flash line; a batch without a dense reference (speedup null)
        rows += [{"method": "dense_flash", "d": None, "k": None, "batch": 1, "context": c, "tokens_per_s": 55.0,
                  "speedup": 1.1} for c in (1024, 4096)]
        rows += [{"method": "loki", "d": 8, "k": 0.5, "batch": 8, "context": 8192, "tokens_per_s": 70.0,
                  "speedup": None, "k_mode": "prefix", "selection": "head"}]
        (res / "bench" / "decode.json").write_text(json.dumps(rows, indent=1))
    if kernels:
        kd = root / "kernels" / "measured"
        kd.mkdir(parents=True, exist_ok=True)
        loki = []
        for B, S in ((16, 4096), (16, 16384), (1, 65536)):  # a full grid: batch 1 reaches the largest context
            for dfrac, kfrac in ((4, 4), (4, 8), (8, 16)):
                d, k = 128 // dfrac, S // kfrac
                loki.append({"batch": B, "context": S, "d": d, "k": k, "d_frac": f"D/{dfrac}", "k_frac": f"1/{kfrac}",
                             "total_ms": 0.1, "speedup_vs_sdpa": kernel_speedup(S, dfrac, kfrac),
                             "ideal_ratio": 2 * 128 / (d + 2 * k / S * 128)})
        (kd / "h200.json").write_text(json.dumps({"info": {"device": "NVIDIA H200", "head_dim": 128, "heads": 32,
                                                           "kv_heads": 8}, "loki": loki, "dense": []}, indent=1))
        (kd / "smoke.json").write_text(json.dumps({"info": {"device": "cpu-interpreter", "head_dim": 64},
                                                   "loki": [], "dense": []}))
    return res


def transfer_ev(fit, ev, side, d):
    return round(0.45 + d / 80 + (0.15 if fit == ev else 0.0) + (0.05 if side == "pre" else 0.0), 4)


def decode_speedup(batch, context):
    return round(1.2 + 0.1 * batch + context / 8192, 4)


def kernel_speedup(context, dfrac, kfrac):
    d, k = 1 / dfrac, 1 / kfrac
    return round(2 / (d + 2 * k) * (0.6 + context / 65536), 4)


SWEEP = """\
# the report fixture's grid (tests/report/report_fixture.py POINTS)
experiment: smoke
model: smollm2-135m
calib_corpus: lee_news
eval_corpus: enwiki_sample
transfer_corpora: [lee_news, enwiki_sample]
threads: 1
evals: [perplexity]
grid:
  dense:
    - {evals: [perplexity, passkey]}
  exact_topk:
    - {k: [0.25, 0.5]}
    - {k: 0.25, evals: [selection]}
  loki:
    - {d: [8, 16], k: [0.25, 0.5], evals: [perplexity, selection]}
    - {d: 16, k: 0.25, rope: pre}
    - {d: 16, k: 0.25, selection: group}
    - {d: 16, k: 0.25, evals: [passkey]}
"""
# run Snakemake with these: only the report (and `all`) may run; every other input is the fixture's
ALLOWED_RULES = ["--allowed-rules", "report", "all"]


def make_workdir(root: Path, repo: Path) -> Path:
    """A copy of the workflow (Snakefile, workflow/, conf/) next to the fixture results, for Snakemake with
    ``ALLOWED_RULES``: the upstream rules are not run, their outputs are the fixture's files. Returns the sweep
    config file to pass with ``--configfile``."""
    import shutil

    root, repo = Path(root), Path(repo)
    for f in ("Snakefile", "environment.yml"):
        shutil.copy(repo / f, root / f)
    for d in ("workflow", "conf"):
        shutil.copytree(repo / d, root / d, ignore=shutil.ignore_patterns("__pycache__", ".snakemake*"))
    for ev in ("selection", "passkey"):  # evals of the fixture, in case conf/eval does not have them
        p = root / "conf" / "eval" / f"{ev}.yaml"
        if not p.exists():
            p.write_text(f"name: {ev}\n")
    sweep = root / "fixture_sweep.yaml"
    sweep.write_text(SWEEP)
    make_results(root)
    return sweep
