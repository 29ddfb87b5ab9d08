"""Stage 5: gather every result of an experiment into one tidy table and draw the report's figures.

    python -m loki.report experiment=smoke
    python -m loki.report experiment=default ++report.kernels_dir=kernels/measured

Reads (``results/<exp>/`` = ``cfg.results_dir``):

* ``evaluate/<eval>/<tag>/metrics.json`` (required; one row each),
* ``pca/<model>/<calib>/rank.csv`` and ``pca.json`` (key rank per layer; head dim),
* ``transfer/transfer.csv`` (calibration-transfer matrix),
* ``bench/decode.json`` (decode speed) and ``<kernels_dir>/*.json`` (``python -m kernels.bench --json``),

the last three optional: a figure is drawn only when its data exists, and ``report/tables/contents.html``
says which figures were drawn and which are missing (and why). A result file that is missing (a job folder
without ``metrics.json``, or a path in ``report.expect`` that does not exist) or malformed stops the stage
with an error naming it.

Writes:

* ``summary.csv`` / ``summary.parquet``: the tidy table, one row per (model, corpus, eval, method, options),
  with d, k, every metric, the ideal byte ratio, the git commit and the resolved config (JSON) of each row;
* ``heatmap.png``: the perplexity heatmap over (d, k) (a copy of ``report/quality/heatmap_perplexity.png``);
* ``report/<category>/<name>.png`` (+ ``<name>.csv``, the data drawn) and ``report/<category>/<name>.html``
  tables, one folder per category of ``snakemake --report`` (see ``workflow/rules/report.smk``).

Outputs are deterministic: rerunning on unchanged results rewrites nothing (files are replaced only when
their bytes change; PNGs carry no date or software version).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loki.app import stage
from loki.common import atomic_path, changed_options, fail, method_defaults

CATEGORIES = {  # folder under report/ -> category name in the HTML report
    "tables": "Results",
    "rank": "Key rank",
    "quality": "Quality over (d, k)",
    "frontier": "Accuracy vs speed",
    "selection": "Selection quality",
    "transfer": "Calibration transfer",
    "speed": "Speed",
}
ID_COLS = ["experiment", "model", "calib", "corpus", "eval", "method", "variant", "d", "k", "k_mode", "tag"]
METRIC_COLS = ["ppl", "nll", "tokens", "recall", "attention_mass", "output_rel_error", "accuracy"]
TAIL_COLS = ["head_dim", "kv_groups", "byte_ratio", "byte_ratio_measured", "seconds", "git_commit", "options", "per_layer", "per_case", "config", "result"]
REQUIRED = {"experiment": str, "model": str, "corpus": str, "eval": str, "method": str, "options": dict,
            "git_commit": str, "config": dict}
EVAL_REQUIRED = {"perplexity": ("ppl", "nll", "tokens"),
                 "selection": ("recall", "attention_mass", "output_rel_error", "per_layer"),
                 "passkey": ("accuracy",), "needle": ("accuracy",),
                 "passkey_decode": ("accuracy",), "needle_decode": ("accuracy",),
                 "lm_eval": ("results",)}  # (lm_eval's accuracy is null where no task reports acc)
RANK_COLS = ["side", "layer", "head", "threshold", "rank", "head_dim"]
TRANSFER_COLS = ["fit_corpus", "eval_corpus", "side", "d", "explained_variance"]
DECODE_KEYS = ["method", "d", "k", "batch", "context", "tokens_per_s", "speedup"]
KERNEL_KEYS = ["batch", "context", "d", "k", "speedup_vs_sdpa", "ideal_ratio"]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(path, problem: str, producer: str):
    return fail(f"result file {path} is malformed: {problem}.", f"delete it and rerun {producer}.")


# ----------------------------------------------------------------------------------------------------------
# evaluation results -> tidy table

def load_metrics(path: Path) -> dict:
    """One metrics.json, checked: provenance keys, the eval's own metrics, per-layer entries."""
    producer = "its evaluate job (snakemake reruns it)"
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not readable JSON ({type(e).__name__}: {e})", producer) from e
    if not isinstance(m, dict):
        raise _bad(path, f"top level is a {type(m).__name__}, not an object", producer)
    for key, typ in REQUIRED.items():
        if key not in m:
            raise _bad(path, f"key '{key}' is missing", producer)
        if not isinstance(m[key], typ):
            raise _bad(path, f"'{key}' is a {type(m[key]).__name__}, expected {typ.__name__}", producer)
    for key in ("d", "k"):
        if key not in m:
            raise _bad(path, f"key '{key}' is missing (null for methods without it)", producer)
        if m[key] is not None and not _is_num(m[key]):
            raise _bad(path, f"'{key}' = {m[key]!r} is not a number", producer)
    for key in EVAL_REQUIRED.get(m["eval"], ()):
        if key not in m:
            raise _bad(path, f"eval '{m['eval']}' result has no '{key}'", producer)
        if key not in ("per_layer", "results") and not _is_num(m[key]):
            raise _bad(path, f"'{key}' = {m[key]!r} is not a number", producer)
    if "per_layer" in m:
        pl = m["per_layer"]
        if not isinstance(pl, list) or not all(isinstance(e, dict) and _is_num(e.get("layer")) and
                                                _is_num(e.get("recall")) for e in pl):
            raise _bad(path, "'per_layer' must be a list of {layer, recall, attention_mass, output_rel_error}", producer)
    if "per_case" in m and not isinstance(m["per_case"], list):
        raise _bad(path, "'per_case' must be a list", producer)
    return m


def _jv(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _variants(rows: list[dict]) -> None:
    """``variant``: the options (besides d, k) that differ from conf/method/<method>.yaml, e.g. 'rope=pre'."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        defaults, among = method_defaults(method), None
        if defaults is None:  # unknown method: the options that vary between its rows
            keys = {k for r in rs for k in r["_options"]}
            defaults, among = {}, {k for k in keys if len({_jv(r["_options"].get(k)) for r in rs}) > 1}
        for r in rs:
            opts = r["_options"]
            # (a decode_only eval prefills densely whatever the method's sparse_prefill: not a variant of the method)
            diff = changed_options(opts, defaults, r["_decode_only"], among)
            r["variant"] = ",".join(f"{k}={_jv(opts[k])}" for k in diff)


def _shape(m: dict, results_dir: Path, cache: dict) -> tuple[float, float]:
    """(head dim, query heads per KV head) of the row's model: metrics.json's ``model_shape``, else the pca.json
    fingerprint, else rank.csv (head dim only), else the model's config.json; nan where none says."""
    if isinstance(m.get("model_shape"), dict):
        ms = m["model_shape"]
        try:
            return float(ms["head_dim"]), float(ms["num_heads"]) / float(ms["num_kv_heads"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
    cfg = m["config"]
    pca = cfg.get("pca_path")
    model = cfg.get("model") or {}
    key = (pca, model.get("path"))
    if key in cache:
        return cache[key]
    hd = groups = None
    if pca:
        p = Path(pca)
        if not p.is_absolute() and not p.exists() and (results_dir / "pca").exists():
            # results moved: resolve results/<exp>/pca/<model>/<calib>/ under the given results_dir
            parts = p.parts
            if "pca" in parts:
                p = results_dir.joinpath(*parts[parts.index("pca"):])
        meta, rank = p.with_name("pca.json"), p.with_name("rank.csv")
        try:
            if meta.exists():
                fp = json.loads(meta.read_text()).get("fingerprint", {})
                hd = fp.get("head_dim")
                if fp.get("num_heads") and fp.get("num_kv_heads"):
                    groups = fp["num_heads"] / fp["num_kv_heads"]
            if hd is None and rank.exists():
                import pandas as pd

                hd = int(pd.read_csv(rank, usecols=["head_dim"]).head_dim.max())
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            hd = groups = None
    if (hd is None or groups is None) and model.get("path"):
        c = Path(model["path"]) / "config.json"
        try:
            mc = json.loads(c.read_text())
            hd = hd or mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"]
            groups = groups or mc["num_attention_heads"] / (mc.get("num_key_value_heads") or mc["num_attention_heads"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            pass
    cache[key] = (float(hd) if hd else float("nan"), float(groups) if groups else float("nan"))
    return cache[key]


def _as_fraction(v, m: dict) -> float | None:
    """A budget option (k, cache) as a fraction of the context: k_mode=tokens divides by the eval window."""
    if v is None or not _is_num(v):
        return None
    if m["options"].get("k_mode") == "tokens":
        window = m.get("window") or (m["config"].get("eval") or {}).get("window")
        return float(v) / float(window) if window else None
    return float(v)


def _measured_rows(m: dict) -> float | None:
    """The K/V rows each KV head read / visible keys, as the method counted them (``kv_rows_fraction``; the decode
    steps' where the eval ran any); None for results written before it was counted."""
    for key in ("kv_rows_fraction_decode", "kv_rows_fraction"):
        v = m.get(key)
        if _is_num(v):
            return float(v)
    return None


def _ratio_options(m: dict) -> dict:
    opts = dict(m["options"])
    if "cache" in opts:
        opts["cache"] = _as_fraction(opts["cache"], m)
    return opts


def _tag(f: Path, results_dir: Path) -> str:
    """The result's name in the table: its job folder (``evaluate/<eval>/<tag>``), or in a Hydra multirun folder the
    job folder's path under it (``3``, ``<time>/3``)."""
    if f.parent.parent.parent.name == "evaluate":
        return f.parent.name
    try:
        return str(f.parent.resolve().relative_to(results_dir.resolve()))
    except ValueError:
        return f.parent.name


def collect(results_dir, expect=None):
    """The tidy table of every ``evaluate/<eval>/<tag>/metrics.json`` (or exactly ``expect``); a Hydra multirun folder
    (``multirun/<exp>/<time>``: job folders ``<n>/`` with ``.hydra/``) is read too, its failed points skipped.

    Returns the table; ``table.attrs['ignored']`` lists result folders that were not expected (or failed).
    """
    import pandas as pd

    from loki.figures import byte_ratio

    results_dir = Path(results_dir)
    found = sorted(results_dir.glob("evaluate/*/*/metrics.json"))
    job_dirs = sorted(p for p in results_dir.glob("evaluate/*/*") if p.is_dir())
    ignored = []
    if not found and expect is None and not (results_dir / "evaluate").is_dir():
        # a Hydra multirun folder: multirun/<exp>/<time>/<n>/ (or multirun/<exp>/, several sweeps), each job folder
        # holding .hydra/ and metrics.json, or error.txt where the point failed (the sweep reported it)
        job_dirs = sorted(p.parent for pat in ("*/.hydra", "*/*/.hydra") for p in results_dir.glob(pat))
        failed = [p for p in job_dirs if (p / "error.txt").is_file() and not (p / "metrics.json").is_file()]
        ignored = [f"{p.relative_to(results_dir)} (failed point: {p / 'error.txt'})" for p in failed]
        job_dirs = [p for p in job_dirs if p not in failed]
        found = [p / "metrics.json" for p in job_dirs if (p / "metrics.json").is_file()]
    if expect is not None:
        files = [Path(p) for p in expect]
        files = [p if p.is_absolute() or p.exists() else results_dir / p for p in files]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise fail(f"expected result file(s) missing: {', '.join(map(str, missing[:5]))}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + ".",
                       "run their evaluate jobs first (snakemake --cores 2 runs what is missing).")
        want = {p.resolve() for p in files}
        ignored = [str(p.relative_to(results_dir)) for p in job_dirs if (p / "metrics.json").resolve() not in want]
    else:
        files = found
        incomplete = [p for p in job_dirs if not (p / "metrics.json").is_file()]
        if incomplete:
            raise fail(f"result file {incomplete[0] / 'metrics.json'} is missing"
                       + (f" (and {len(incomplete) - 1} more job folders have none)" if len(incomplete) > 1 else "")
                       + "; its evaluate job failed or has not finished.",
                       "rerun it (snakemake --cores 2), or delete the folder if the point is no longer wanted.")
    if not files:
        raise fail(f"no evaluation results under {results_dir}: neither evaluate/<eval>/<tag>/metrics.json (the DAG's "
                   "layout) nor <n>/metrics.json job folders of a Hydra multirun (multirun/<experiment>/<time>/).",
                   "run the evaluate stage first, and pass the folder that holds them (results_dir=results/<exp>, or "
                   "results_dir=multirun/<exp>/<time> for a sweep).")
    rows, hd_cache = [], {}
    for f in sorted(set(files)):
        m = load_metrics(f)
        cfg = m["config"]
        try:
            rel = str(f.resolve().relative_to(results_dir.resolve()))
        except ValueError:
            rel = str(f)
        row = {
            "experiment": m["experiment"], "model": m["model"],
            "calib": (cfg.get("calib") or {}).get("name"), "corpus": m["corpus"], "eval": m["eval"],
            "method": m["method"], "d": m["d"], "k": m["k"], "k_mode": m["options"].get("k_mode"),
            "tag": _tag(f, results_dir), "_options": m["options"],
            "_decode_only": bool((cfg.get("eval") or {}).get("decode_only")),
        }
        for key, v in m.items():
            if key in row or key in ("options", "config", "git_commit", "per_layer", "per_case", "k_mode", "model_shape"):
                continue
            row[key] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        hd, groups = _shape(m, results_dir, hd_cache)
        rows_read = _measured_rows(m)
        row.update({
            "head_dim": hd,
            "kv_groups": groups,
            "byte_ratio": byte_ratio(m["method"], m["d"], _as_fraction(m["k"], m), hd, _ratio_options(m), groups),
            # the same with the K/V rows each KV head read, measured (decode steps where the eval has any)
            "byte_ratio_measured": (float("nan") if rows_read is None else
                                    byte_ratio(m["method"], m["d"], _as_fraction(m["k"], m), hd, _ratio_options(m),
                                               groups, rows=rows_read)),
            "git_commit": m["git_commit"],
            "options": json.dumps(m["options"], sort_keys=True),
            "per_layer": json.dumps(m["per_layer"], sort_keys=True) if "per_layer" in m else None,
            "per_case": json.dumps(m["per_case"], sort_keys=True) if "per_case" in m else None,
            "config": json.dumps(cfg, sort_keys=True, separators=(",", ":")),
            "result": rel,
        })
        rows.append(row)
    _variants(rows)
    seen = {}
    for r in rows:
        # a point: the model, both corpora, the eval with its settings, the seed, the method with its options (a Hydra
        # sweep over corpus@calib, eval.window or seed gives distinct points, told apart by their `tag` folders)
        cfg = json.loads(r["config"])
        key = (r["model"], r["calib"], r["corpus"], r["eval"], json.dumps(cfg.get("eval"), sort_keys=True),
               cfg.get("seed"), r["method"], r["options"])
        if key in seen:
            raise fail(f"two result files for the same point ({r['eval']}, {r['method']}, {r['options']}, calibrated "
                       f"on {r['calib']}, with the same eval settings and seed): {seen[key]} and {r['result']}.",
                       "delete the one that is stale, or leave one of them out of results_dir.")
        seen[key] = r["result"]
        del r["_options"], r["_decode_only"]
    extra = sorted({k for r in rows for k in r} - set(ID_COLS) - set(METRIC_COLS) - set(TAIL_COLS))
    cols = ID_COLS + METRIC_COLS + extra + TAIL_COLS
    df = pd.DataFrame(rows, columns=cols)
    for c in ["d", "k", "head_dim", "kv_groups", "byte_ratio", "byte_ratio_measured"] + METRIC_COLS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in extra:
        if all(v is None or _is_num(v) for v in df[c]):
            df[c] = pd.to_numeric(df[c]).astype("float64")
    df["variant"] = df["variant"].fillna("")
    df = df.sort_values(["eval", "method", "variant", "d", "k", "tag"], na_position="first", kind="stable")
    df = df.reset_index(drop=True)
    df.attrs["ignored"] = ignored
    return df


def load_tidy(results_dir):
    """The tidy table for notebooks and ad-hoc analysis.

    ``summary.parquet`` where it exists: the table the report stage wrote from exactly the results its DAG expects, so
    it agrees with ``summary.csv`` and the figures, leaves out result folders of points no longer in the sweep, and
    reads while a rerun of the DAG has jobs in flight. Else ``collect`` over every ``evaluate/<eval>/<tag>/
    metrics.json`` (checked). ``attrs['source']`` says which; ``attrs['stale']`` lists result files written after the
    parquet (rerun the report stage to take them in)."""
    import pandas as pd

    results_dir = Path(results_dir)
    pq = results_dir / "summary.parquet"
    if not pq.is_file():
        df = collect(results_dir)
        df.attrs.update(source=f"{results_dir}/evaluate/*/*/metrics.json (no summary.parquet: the report stage has "
                               "not run here)", stale=[])
        return df
    try:
        df = pd.read_parquet(pq)
    except Exception as e:  # (pyarrow raises its own types)
        raise _bad(pq, f"not readable ({type(e).__name__}: {e})", "the report stage (snakemake report)") from e
    missing = [c for c in ID_COLS if c not in df.columns]
    if missing:
        raise _bad(pq, f"columns {missing} are missing", "the report stage (snakemake report)")
    written = pq.stat().st_mtime
    df.attrs = {"source": str(pq),
                "stale": sorted(str(f.relative_to(results_dir)) for f in results_dir.glob("evaluate/*/*/metrics.json")
                                if f.stat().st_mtime > written)}
    return df


# ----------------------------------------------------------------------------------------------------------
# optional inputs

def _read_csv(path: Path, columns: list[str], producer: str):
    """``path`` read as a CSV with at least ``columns`` and one row (else a ``_bad`` error naming ``producer``)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise _bad(path, f"not a readable CSV ({type(e).__name__}: {e})", producer) from e
    missing = [c for c in columns if c not in df.columns]
    if missing or df.empty:
        raise _bad(path, f"columns {missing} missing" if missing else "no rows", producer)
    return df


def load_ranks(results_dir) -> dict:
    """{(model, calib): rank table} from every ``pca/<model>/<calib>/rank.csv``."""
    import pandas as pd

    out = {}
    for p in sorted(Path(results_dir).glob("pca/*/*/rank.csv")):
        df = _read_csv(p, RANK_COLS, "fit_pca")
        if not all(pd.api.types.is_numeric_dtype(df[c]) for c in RANK_COLS[1:]):
            raise _bad(p, "layer/head/threshold/rank/head_dim must be numbers", "fit_pca")
        meta = {}
        if (p.parent / "pca.json").exists():
            try:
                meta = json.loads((p.parent / "pca.json").read_text())
            except json.JSONDecodeError as e:
                raise _bad(p.parent / "pca.json", f"not valid JSON ({e})", "fit_pca") from e
        df.attrs["meta"] = meta
        df.attrs["source"] = str(p)
        out[(p.parent.parent.name, p.parent.name)] = df
    return out


def load_transfer(results_dir):
    import pandas as pd

    p = Path(results_dir) / "transfer" / "transfer.csv"
    if not p.exists():
        return None
    df = _read_csv(p, TRANSFER_COLS, "the transfer stage")
    if not (pd.api.types.is_numeric_dtype(df.d) and pd.api.types.is_numeric_dtype(df.explained_variance)):
        raise _bad(p, "d and explained_variance must be numbers", "the transfer stage")
    df.attrs["source"] = str(p)
    return df


def load_decode(results_dir):
    """Rows of ``bench/decode.json`` (python -m loki.bench): method, d (dims), k, batch, context, tokens_per_s,
    speedup over dense at the same batch and context (null where dense was not run: kept, not plotted)."""
    import pandas as pd

    from loki.figures import speed_key

    p = Path(results_dir) / "bench" / "decode.json"
    if not p.exists():
        return None
    producer = "the decode benchmark (python -m loki.bench)"
    try:
        rows = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _bad(p, f"not readable JSON ({type(e).__name__}: {e})", producer) from e
    if not isinstance(rows, list) or not rows:
        raise _bad(p, "expected a non-empty list of rows", producer)
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or any(k not in r for k in DECODE_KEYS):
            raise _bad(p, f"row {i} lacks one of {DECODE_KEYS}", producer)
        if not all(_is_num(r[k]) for k in ("batch", "context", "tokens_per_s")):
            raise _bad(p, f"row {i}: batch/context/tokens_per_s must be numbers", producer)
        if not all(r[k] is None or _is_num(r[k]) for k in ("d", "k", "speedup", "head_dim") if k in r):
            raise _bad(p, f"row {i}: d/k/speedup must be numbers or null", producer)
    # variant: the line's label beside method, d, k (the selection: a head and a group run of one (d, k) differ)
    df = pd.DataFrame([{k: r[k] for k in DECODE_KEYS} | {"variant": r.get("variant", "") or (
                                                             f"{r['selection']} selection" if r.get("selection") else ""),
                                                         "selection": r.get("selection"),
                                                         "speed_key": speed_key(r.get("options")),
                                                         "head_dim": r.get("head_dim")} for r in rows])
    for c in ("d", "k", "speedup", "tokens_per_s", "head_dim"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    df.attrs["source"] = str(p)
    return df


def load_kernels(kernels_dir):
    """Rows of every ``python -m kernels.bench --json`` file; smoke (CPU interpreter) runs are skipped."""
    import pandas as pd

    if kernels_dir is None or not Path(kernels_dir).is_dir():
        return None, []
    rows, notes = [], []
    for p in sorted(Path(kernels_dir).glob("*.json")):
        producer = "python -m kernels.bench --json"
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _bad(p, f"not readable JSON ({type(e).__name__}: {e})", producer) from e
        if not isinstance(res, dict) or not isinstance(res.get("info"), dict) or not isinstance(res.get("loki"), list):
            raise _bad(p, "expected an object with 'info' and 'loki' (kernels/bench.py format)", producer)
        info = res["info"]
        if not _is_num(info.get("head_dim")):
            raise _bad(p, "info.head_dim is missing", producer)
        if info.get("device") == "cpu-interpreter":
            notes.append(f"{p.name}: CPU-interpreter smoke run (no timing meaning), not used")
            continue
        for i, r in enumerate(res["loki"]):
            if not isinstance(r, dict) or not all(_is_num(r.get(k)) for k in KERNEL_KEYS):
                raise _bad(p, f"loki row {i} lacks one of {KERNEL_KEYS}", producer)
            D = float(info["head_dim"])
            rows.append({"source": p.name, "device": str(info.get("device", "?")), "head_dim": D,
                         "batch": int(r["batch"]), "context": int(r["context"]),
                         "d_frac": r.get("d_frac") or f"{r['d'] / D:g}D", "k_frac": r.get("k_frac") or f"{r['k'] / r['context']:g}",
                         "d_rel": round(r["d"] / D, 6), "k_rel": round(r["k"] / r["context"], 6),
                         "speedup": float(r["speedup_vs_sdpa"]), "ideal_ratio": float(r["ideal_ratio"]),
                         "total_ms": r.get("total_ms")})
    if not rows:
        return None, notes
    return pd.DataFrame(rows), notes


def speed_table(tidy, decode, kernels):
    """Measured speedup per (method, d, k, selection) of the tidy table: decode benchmark first, then the kernel
    benchmark.  A point matches a measurement of the same selection only (``head``: one top-k per query head, reading
    up to G*k rows per KV head; ``group``: one per KV head): the kernel benchmark's Loki rows are group selection
    (``kernels/``' GQA-native path), so a ``selection=head`` point keeps its ideal byte ratio.

    A point matches a measurement only where its options of ``loki.common.MEASURED_AT`` (dense layers, sink / local
    tokens, basis, RoPE side, d per head, slab dtype) are those the measurement ran (``speed_key``): the kernel
    benchmark runs none of them, a decode row records its own. Other points keep their ideal byte ratio.

    From several decode rows for one point, the one at the largest context (then the largest batch) is used; from
    several kernel rows, the one at the largest batch (then the largest context): a full kernel grid also holds batch
    1 at 128K, and batch 16 is the batch its acceptance is set at.
    """
    import pandas as pd

    from loki.figures import selection_of, speed_key

    out = []
    points = tidy[["method", "d", "k", "head_dim", "options"]].drop_duplicates()
    points = points.assign(selection=[selection_of(m, o) for m, o in zip(points.method, points.options)],
                           speed_key=[speed_key(o) for o in points.options])
    points = points.drop(columns="options").drop_duplicates()
    same = lambda a, b: (pd.isna(a) and pd.isna(b)) or (not pd.isna(a) and not pd.isna(b) and abs(a - b) < 1e-9)
    dims = lambda d, D: d * D if (not pd.isna(d) and 0 < d < 1 and not pd.isna(D)) else d
    dec = decode[decode.speedup.notna()] if decode is not None else None
    for _, p in points.iterrows():
        sel = p.selection if isinstance(p.selection, str) else None  # (a missing one reads back as NaN)
        if dec is not None:
            d_t = dims(p.d, p.head_dim)

            def d_match(r):  # by d/D where the row has its head dim (another model's shape), else by dims
                if pd.isna(r.d) or pd.isna(d_t):
                    return pd.isna(r.d) and pd.isna(d_t)
                if not pd.isna(r.head_dim) and not pd.isna(p.head_dim):
                    return abs(r.d / r.head_dim - d_t / p.head_dim) < 1e-9
                return abs(r.d - d_t) < 1e-9

            sel_ok = dec.selection.apply(lambda v: (v if isinstance(v, str) else None) == sel)
            m = dec[(dec.method == p.method) & dec.k.apply(lambda v: same(v, p.k)) & sel_ok
                    & (dec.speed_key == p.speed_key)]
            m = m[[d_match(r) for r in m.itertuples()]] if len(m) else m
            if len(m):
                r = m.sort_values(["context", "batch"], kind="stable").iloc[-1]
                out.append({"method": p.method, "d": p.d, "k": p.k, "selection": sel, "speed_key": p.speed_key,
                            "speedup": float(r.speedup), "speed_source": "decode",
                            "speed_detail": f"decode, {sel + ' selection, ' if sel else ''}"
                                            f"batch {int(r.batch)}, context {int(r.context)}"})
                continue
        if kernels is not None and p.method == "loki" and sel == "group" and not p.speed_key and not pd.isna(p.d) \
                and not pd.isna(p.k) and not pd.isna(p.head_dim):
            d_rel = round(dims(p.d, p.head_dim) / p.head_dim, 6)
            m = kernels[(kernels.d_rel == d_rel) & (kernels.k_rel == round(p.k, 6))]
            if len(m):
                r = m.sort_values(["batch", "context", "source"], ascending=[True, True, False], kind="stable").iloc[-1]
                out.append({"method": p.method, "d": p.d, "k": p.k, "selection": sel, "speed_key": "",
                            "speedup": float(r.speedup), "speed_source": "kernel",
                            "speed_detail": f"kernel vs SDPA (group selection), {r.device}, batch {r.batch}, "
                                            f"context {r.context}"})
    return pd.DataFrame(out, columns=["method", "d", "k", "selection", "speed_key", "speedup", "speed_source",
                                      "speed_detail"])


# ----------------------------------------------------------------------------------------------------------
# the report

@dataclass
class Figure:
    category: str      # folder under report/
    name: str          # file stem
    title: str
    data: object       # the DataFrame drawn
    sources: list


@dataclass
class Report:
    tidy: object
    figures: list = field(default_factory=list)
    tables: dict = field(default_factory=dict)       # (category, name) -> (title, DataFrame)
    contents: object = None                          # DataFrame: what was drawn, what is missing
    notes: list = field(default_factory=list)
    changed: list = field(default_factory=list)


def _values(col) -> list[str]:
    """The distinct values of a column, as short strings (ints without '.0'), sorted."""
    vals = sorted({float(v) for v in col.dropna()}) if all(_is_num(v) for v in col.dropna()) else \
        sorted({str(v) for v in col.dropna()})
    return [(str(int(v)) if v.is_integer() else f"{v:g}") if isinstance(v, float) else v for v in vals]


def protocol(tidy, eval_name=None) -> str:
    t = tidy if eval_name is None else tidy[tidy["eval"] == eval_name]
    if t.empty:
        return ""
    parts = [f"model {', '.join(sorted(t.model.unique()))}", f"eval corpus {', '.join(sorted(t.corpus.unique()))}"]
    # what the runs recorded in metrics.json (not the config: the selection eval caps the windows, retrieval evals
    # have none), every distinct value where the rows differ
    if "window" in t and t.window.notna().any():
        wins = "/".join(_values(t.window))
        n = "/".join(_values(t.num_windows)) if "num_windows" in t and t.num_windows.notna().any() else ""
        parts.append(f"window {wins}" + (f" x {n}" if n else ""))
    if "cases" in t and t.cases.notna().any():
        parts.append(f"{'/'.join(_values(t.cases))} cases"
                     + (f" up to {'/'.join(_values(t.max_length))} tokens"
                        if "max_length" in t and t.max_length.notna().any() else ""))
    if "decode_only" in t and t.decode_only.notna().any():
        flags = {bool(v) for v in t.decode_only.dropna()}
        parts.append("decode-only sparsity (prompt prefilled densely)" if flags == {True} else
                     "sparse prefill" if flags == {False} else "decode-only and sparse-prefill runs")
    if "tokens" in t and t.tokens.notna().any():
        parts.append(f"{int(t.tokens.max())} tokens")
    calib = sorted(c for c in t.calib.dropna().unique())
    if calib:
        parts.append(f"PCA on {', '.join(calib)}")
    commits = sorted({c[:7] + ("-dirty" if c.endswith("-dirty") else "") for c in t.git_commit})
    parts.append(f"git {', '.join(commits)}")
    return " | ".join(parts)


def _contents_row(category, name, status, sources, note=""):
    return {"category": CATEGORIES[category], "figure": name, "status": status, "data": "; ".join(sources),
            "note": note}


def build(results_dir, out_dir, expect=None, kernels_dir=None) -> Report:
    """Read everything, draw every figure whose data exists into ``out_dir/<category>/``."""
    import pandas as pd

    from loki import figures as F

    pyplot = F.plt()
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    tidy = collect(results_dir, expect)  # read and check every input before drawing anything
    ranks = load_ranks(results_dir)
    transfer = load_transfer(results_dir)
    decode = load_decode(results_dir)
    kernels, knotes = load_kernels(kernels_dir)
    rep = Report(tidy=tidy)
    exp = ", ".join(sorted(tidy.experiment.unique()))
    contents = []
    rd = lambda p: str(Path(p).relative_to(results_dir)) if Path(p).is_relative_to(results_dir) else str(p)

    def add(category, name, title, fig_data, sources, note=""):
        fig, data = fig_data
        F.save_png(fig, out_dir / category / f"{name}.png", data, title)
        pyplot.close(fig)
        rep.figures.append(Figure(category, name, title, data, sources))
        contents.append(_contents_row(category, f"{name}.png", "drawn", sources, note))

    # key rank per layer
    for (model, calib), df in ranks.items():
        fo = df.attrs["meta"].get("fitted_on", {})
        how = f"IncrementalPCA per (layer, KV head, side) on {fo.get('tokens', '?')} tokens of {calib}" + \
              (f" (sequences of {fo['seq_len']})" if fo.get("seq_len") else "")
        add("rank", f"rank_{model}_{calib}", f"{exp}: key rank per layer, {model}, pre- vs post-RoPE",
            F.draw_rank(df, f"{exp}: rank of the keys per layer, {model} on {calib}, pre- vs post-RoPE",
                        f"{how}; band = min..max over KV heads"), [rd(df.attrs["source"])])
    if not ranks:
        contents.append(_contents_row("rank", "rank_<model>_<calib>.png", "missing", [],
                                      "no pca/<model>/<calib>/rank.csv (run fit_pca)"))

    # quality over (d, k), per eval
    evals = sorted(tidy["eval"].unique())
    for ev in evals:
        mm = F.main_metric(ev, [c for c in tidy.columns if tidy.loc[tidy["eval"] == ev, c].notna().any()])
        if mm is None:
            contents.append(_contents_row("quality", f"heatmap_{ev}.png", "missing", [], f"eval '{ev}' has no known metric"))
            continue
        metric, direction, label = mm
        srcs = [f"summary.csv (eval={ev})"]
        if F.heatmap_data(tidy, ev, metric).empty:
            contents.append(_contents_row("quality", f"heatmap_{ev}.png", "missing", srcs, "no sparse (k) results"))
        else:
            add("quality", f"heatmap_{ev}", f"{exp}: {label} over (d, k), eval {ev}",
                F.draw_heatmaps(tidy, ev, metric, direction, label, f"{exp}: {label} over (d, k), eval {ev}",
                                protocol(tidy, ev)), srcs)

    # accuracy versus speed
    rep.notes += knotes
    speed = speed_table(tidy, decode, kernels)
    speed_srcs = ([rd(decode.attrs["source"])] if decode is not None else []) + \
                 (sorted(f"{Path(kernels_dir).as_posix()}/{s}" for s in kernels.source.unique()) if kernels is not None else [])
    for ev in evals:
        mm = F.main_metric(ev, [c for c in tidy.columns if tidy.loc[tidy["eval"] == ev, c].notna().any()])
        if mm is None:
            continue
        metric, direction, label = mm
        data = F.frontier_data(tidy, speed, ev, metric, direction)
        if data.empty:
            contents.append(_contents_row("frontier", f"frontier_{ev}.png", "missing", [], "no point has a speed figure"))
            continue
        n_ideal = int((data.speed_source == "ideal").sum())
        note = f"{n_ideal} of {len(data)} points use the ideal byte ratio (no GPU figure)" if n_ideal else "all measured"
        rows = tidy[(tidy["eval"] == ev) & tidy[metric].notna()]
        omitted = sorted(set(rows.tag) - set(data.tag))
        if omitted:
            note += f"; omitted (no speed figure, no byte-ratio model): {', '.join(omitted)}"
        title = f"{exp}: {label} vs speedup, eval {ev}"
        add("frontier", f"frontier_{ev}", title, F.draw_frontier(data, direction, label, title, protocol(tidy, ev),
                                                                 omitted), [f"summary.csv (eval={ev})"] + speed_srcs, note)
        rep.tables[("frontier", f"frontier_{ev}")] = (title, data)

    # selection recall per layer
    if "selection" in evals and not F.selection_layers(tidy).empty:
        title = f"{exp}: selection quality per layer (eval selection)"
        add("selection", "selection_per_layer", title, F.draw_selection(tidy, title, protocol(tidy, "selection")),
            ["summary.csv (eval=selection, per_layer)"])
    else:
        contents.append(_contents_row("selection", "selection_per_layer.png", "missing", [],
                                      "no eval=selection results with per_layer (add selection to the sweep's evals)"))

    # calibration transfer
    if transfer is not None:
        title = f"{exp}: calibration transfer, explained variance of a basis fitted on one corpus, on another"
        add("transfer", "transfer", title, F.draw_transfer(transfer, title, "diagonal (bold): basis fitted and "
                                                           "evaluated on the same corpus"), [rd(transfer.attrs["source"])])
    else:
        contents.append(_contents_row("transfer", "transfer.png", "missing", [], "no transfer/transfer.csv"))

    # speed
    if kernels is not None:
        title = "Loki decode kernels: speedup over SDPA (python -m kernels.bench)"
        add("speed", "kernel_speedup", title, F.draw_kernel_speed(kernels, title, "dashed: ideal byte ratio; "
                                                                  "attention only, one decode step"),
            sorted(f"{Path(kernels_dir).as_posix()}/{s}" for s in kernels.source.unique()))
    else:
        contents.append(_contents_row("speed", "kernel_speedup.png", "missing", [],
                                      f"no GPU kernel benchmark in {kernels_dir}/*.json"
                                      + (f" ({'; '.join(knotes)})" if knotes else "")))
    if decode is not None:
        title = f"{exp}: decode speedup over dense (bench/decode.json)"
        n_null = int(decode.speedup.isna().sum())
        add("speed", "decode_speedup", title, F.draw_decode_speed(decode, title), [rd(decode.attrs["source"])],
            f"{n_null} rows without a dense reference (speedup null) not shown" if n_null else "")
    else:
        contents.append(_contents_row("speed", "decode_speedup.png", "missing", [], "no bench/decode.json"))

    for ign in tidy.attrs.get("ignored", []):
        rep.notes.append(f"ignored {ign}: not among the expected results")
    rep.contents = pd.DataFrame(contents, columns=["category", "figure", "status", "data", "note"])
    return rep


# ----------------------------------------------------------------------------------------------------------
# writing

HTML_STYLE = ("body{font-family:system-ui,sans-serif;font-size:13px;margin:12px;color:#222}"
              "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}"
              "th{background:#f0f0f0;position:sticky;top:0}td.l,th.l{text-align:left}"
              "tr:nth-child(even){background:#fafafa}p{color:#555}")
TABLE_COLS = ["eval", "model", "corpus", "method", "variant", "d", "k", "k_mode"] + METRIC_COLS + \
             ["kv_rows_fraction", "byte_ratio", "byte_ratio_measured", "seconds", "git_commit", "tag"]


def html_table(df, title: str, note: str = "") -> str:
    """A small self-contained HTML page holding one table (read back by the tests with html.parser)."""
    import html

    import numpy as np
    import pandas as pd

    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "<td></td>"
        if isinstance(v, (bool, np.bool_)):
            return f"<td>{'yes' if v else 'no'}</td>"
        if isinstance(v, (float, np.floating)):
            return f"<td>{float(v):.6g}</td>"
        if isinstance(v, (int, np.integer)):
            return f"<td>{int(v)}</td>"
        return f'<td class="l">{html.escape(str(v))}</td>'

    text = [not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    left = ' class="l"'
    head = "".join(f"<th{left if t else ''}>{html.escape(str(c))}</th>" for c, t in zip(df.columns, text))
    body = "\n".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in df.itertuples(index=False, name=None))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n<h3>{html.escape(title)}</h3>\n"
            + (f"<p>{html.escape(note)}</p>\n" if note else "")
            + f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n</body></html>\n")


def _write_if_changed(src: Path, dst: Path) -> bool:
    data = src.read_bytes()
    if dst.is_file() and dst.read_bytes() == data:
        return False
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    return True


def write(rep: Report, results_dir, staged: Path) -> list[str]:
    """Tables into ``staged``, then everything from ``staged`` into ``results_dir``; returns changed files."""
    import pandas as pd

    results_dir = Path(results_dir)
    tidy = rep.tidy
    exp = ", ".join(sorted(tidy.experiment.unique()))
    shown = [c for c in TABLE_COLS if c in tidy.columns and tidy[c].notna().any()]
    t = tidy[shown].copy()
    t["git_commit"] = t.git_commit.str.slice(0, 7) + t.git_commit.str.endswith("-dirty").map({True: "-dirty", False: ""})
    tables = {("tables", "results"): (f"{exp}: every result ({len(tidy)} rows)",
                                      t, "One row per (model, corpus, eval, method, options); byte_ratio = ideal "
                                         "decode speedup from bytes read, e.g. Loki 2D/(d+2kD) with selection=group, "
                                         "2D/(d+2GkD) with selection=head (G query heads per KV head, kv_groups); "
                                         "kv_rows_fraction = K/V rows each KV head read / context, measured (a row "
                                         "kept by several heads of a group counted once, dense layers and forced "
                                         "tokens included), and byte_ratio_measured the same ratio with those rows "
                                         "in place of k or Gk. "
                                         "Full table with options and resolved config: "
                                         "summary.csv / summary.parquet."),
              ("tables", "contents"): (f"{exp}: report contents",
                                       rep.contents, "; ".join(rep.notes) if rep.notes else "")}
    for (cat, name), (title, df) in rep.tables.items():
        tables[(cat, name)] = (title, df, "speed_source: decode / kernel = measured on a GPU (matched by method, d, k, "
                                          "selection and the options the measurement ran: dense layers, sink / "
                                          "local tokens, basis, RoPE side; the kernel figures are group selection "
                                          "with none of them); ideal = byte "
                                          "ratio, no GPU figure: with the K/V rows the method measured where the "
                                          "result has them, r in the formula, else with k or Gk (speed_detail: the "
                                          "formula, G = query heads per KV head); reference = dense")
    for (cat, name), (title, df, note) in tables.items():
        p = staged / "report" / cat / f"{name}.html"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(html_table(df, title, note))
    tidy.to_csv(staged / "summary.csv", index=False, lineterminator="\n")
    tidy.to_parquet(staged / "summary.parquet", index=False)
    heat = staged / "report" / "quality" / "heatmap_perplexity.png"
    if heat.exists():
        shutil.copyfile(heat, staged / "heatmap.png")
    else:
        from loki import figures as F

        pyplot = F.plt()
        fig, ax = pyplot.subplots(figsize=(6.4, 2.4))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{exp}: no perplexity results over (d, k)\nsee report/tables/contents.html",
                ha="center", va="center")
        F.save_png(fig, staged / "heatmap.png", pd.DataFrame({"note": ["no perplexity results"]}), "no data")
        (staged / "heatmap.csv").unlink()
        pyplot.close(fig)
    for cat in CATEGORIES:
        (staged / "report" / cat).mkdir(parents=True, exist_ok=True)
    changed = []
    for src in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = src.relative_to(staged)
        if _write_if_changed(src, results_dir / rel):
            changed.append(str(rel))
    for cat in CATEGORIES:  # stale files of an earlier report (a figure whose data went away)
        d = results_dir / "report" / cat
        d.mkdir(parents=True, exist_ok=True)
        for p in sorted(d.iterdir()):
            if p.is_file() and not p.name.startswith(".") and not (staged / "report" / cat / p.name).exists():
                p.unlink()
                changed.append(f"-{p.relative_to(results_dir)}")
    return changed


def make_report(results_dir, expect=None, kernels_dir="kernels/measured") -> Report:
    """Build and write the whole report for one results folder (what the stage does, without W&B)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise fail(f"results_dir={results_dir} is not a folder: there are no results to report on.",
                   "point results_dir at a pipeline's results folder (results/<experiment>) or a sweep's "
                   "(multirun/<...>), after its evaluate jobs have run.")
    with tempfile.TemporaryDirectory(prefix=".report.", dir=results_dir) as tmp:
        staged = Path(tmp)
        rep = build(results_dir, staged / "report", expect=expect, kernels_dir=kernels_dir)
        rep.changed = write(rep, results_dir, staged)
    return rep


def log_wandb(run, rep: Report, results_dir) -> None:
    """The tidy table as a W&B Table, every figure as a W&B Image (key ``figures/<category>/<name>``)."""
    import wandb

    results_dir = Path(results_dir)
    payload = {"results": wandb.Table(dataframe=rep.tidy.drop(columns=["config"]))}
    for (cat, name), (title, df) in rep.tables.items():
        payload[f"tables/{name}"] = wandb.Table(dataframe=df)
    for f in rep.figures:
        payload[f"figures/{f.category}/{f.name}"] = wandb.Image(str(results_dir / "report" / f.category / f"{f.name}.png"),
                                                                caption=f.title)
    run.log(payload)
    run.summary.update({"report/rows": len(rep.tidy), "report/figures": len(rep.figures),
                        "report/missing": int((rep.contents.status == "missing").sum())})


@stage
def main(cfg) -> None:
    from omegaconf import OmegaConf

    from loki.tracking import wandb_run

    res = Path(cfg.results_dir)
    rcfg = OmegaConf.to_container(cfg.report, resolve=True) if cfg.get("report") is not None else {}
    expect = rcfg.get("expect")
    if isinstance(expect, str):  # the Snakemake rule passes its inputs space-separated
        expect = expect.replace(",", " ").split()
    rep = make_report(res, expect=expect, kernels_dir=rcfg.get("kernels_dir", "kernels/measured"))
    with wandb_run(cfg, "report", name="report") as run:
        if run is not None:
            log_wandb(run, rep, res)
    t = rep.tidy
    print(t[["eval", "method", "variant", "d", "k"] + [c for c in ("ppl", "recall", "accuracy") if t[c].notna().any()]
            + ["byte_ratio"]].to_string(index=False))
    print(rep.contents[["category", "figure", "status", "note"]].to_string(index=False))
    for n in rep.notes:
        print(f"[report] note: {n}")
    print(f"[report] {len(t)} rows, {len(rep.figures)} figures -> {res / 'summary.csv'}, {res / 'report'}/ "
          f"({len(rep.changed)} files changed)")


if __name__ == "__main__":
    main()
