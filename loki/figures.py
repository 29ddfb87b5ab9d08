"""The report's figures. Every ``draw_*`` function takes tidy frames, draws one figure and returns
``(fig, data)``: ``data`` is exactly what was plotted (one row per mark or cell), so tests compare it
with the tidy table and the report embeds it in the PNG (text chunk ``Loki-Data``, CSV) and beside it
(``<name>.csv``).

Speed on the frontier: measured where a GPU figure exists, else the ideal byte ratio of one decode step.
Per key/value head and cached token, dense attention reads the key row and the value row, ``2D``
elements (``D`` = head dim). Loki reads ``d`` rotated key dims of every cached token to score it, then the
full key and value rows of the kept fraction ``k`` of the tokens: ``d + 2kD`` per token on average. Both
scale with the context length ``S``, which cancels:

    byte ratio (Loki vs dense) = 2D * S / ((d + 2kD) * S) = 2D / (d + 2kD)

e.g. D=128, d=32, k=1/4: 256 / (32 + 64) = 2.67. Exact top-k scores with the full key (d = D):
2 / (1 + 2k). Dense is 1. The ratio ignores the query, the (B, H, S) score buffer, the top-k indices,
sink/local tokens and dense layers (all O(S) or smaller, not O(S*D)), so it is an upper bound on a
memory-bound kernel's speedup. It equals ``kernels/bench.py``'s ``ideal_ratio`` (dense_bytes / loki_bytes).

GQA (G query heads share a KV head): a method that selects per query head (loki / h2o / loki_h2o with
``selection=head``, and exact_topk, sparq and quest, which always do) gives each of the G heads its own k
rows, so a kernel gathering each head's rows reads G*k rows of K and V per KV head: ``d + 2GkD`` (the group's
union lies between k and G*k rows; G*k is what is counted, and for G = 1 the two agree). ``selection=group``
picks one set per KV head (what ``kernels/``' GQA-native kernels run): ``d + 2kD``. The tidy table's
``byte_ratio_measured`` puts the measured rows instead (``kv_rows_fraction``: each KV head's union, counted by the
method while it ran): what a kernel that reads a row once for its whole group would read. The frontier's ideal x
is that measured ratio where a result has it, else ``byte_ratio``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from loki.common import MEASURED_AT

# eval -> (headline metric, "lower" | "higher" is better, axis label)
MAIN_METRIC = {
    "perplexity": ("ppl", "lower", "perplexity"),
    "selection": ("recall", "higher", "top-k recall (vs exact top-k)"),
    "passkey": ("accuracy", "higher", "passkey accuracy"),
    "needle": ("accuracy", "higher", "needle accuracy"),
    "passkey_decode": ("accuracy", "higher", "passkey accuracy (decode-only sparsity)"),
    "needle_decode": ("accuracy", "higher", "needle accuracy (decode-only sparsity)"),
    "lm_eval": ("accuracy", "higher", "lm-eval accuracy (mean acc over tasks)"),
}
FALLBACK_METRICS = (("accuracy", "higher", "accuracy"), ("recall", "higher", "recall"), ("ppl", "lower", "perplexity"))
LEGEND = {"decode": "measured (decode)", "kernel": "measured (kernel)", "reference": "reference",
          "ideal": "ideal bytes, no GPU figure"}
DPI = 110


def plt():
    """pyplot, headless (Agg) unless running in a Jupyter kernel (the notebooks show figures inline)."""
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def method_colors(pyplot, methods) -> dict:
    """The same colour for a method in every figure (dense, exact_topk, loki first)."""
    known = ["dense", "exact_topk", "loki"]
    order = known + sorted(set(methods) - set(known))
    tab = pyplot.get_cmap("tab10").colors
    return {m: tab[i % 10] for i, m in enumerate(order)}


def subplots(pyplot, *args, **kw):
    return pyplot.subplots(*args, layout="constrained", **kw)


def main_metric(eval_name: str, columns) -> tuple[str, str, str] | None:
    if eval_name in MAIN_METRIC:
        return MAIN_METRIC[eval_name]
    for m in FALLBACK_METRICS:
        if m[0] in columns:
            return m
    return None


def fmt_num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{int(v)}" if float(v).is_integer() else f"{v:g}"


def point_label(method: str, variant: str, d, k) -> str:
    parts = [method + (f" [{variant}]" if variant else "")]
    if d is not None and not pd.isna(d):
        parts.append(f"d={fmt_num(d)}")
    if k is not None and not pd.isna(k):
        parts.append(f"k={fmt_num(k)}")
    return " ".join(parts)


def save_png(fig, path: Path, data: pd.DataFrame, title: str) -> None:
    """Deterministic PNG (no software/date metadata) carrying its plotted data as CSV."""
    from loki.common import atomic_path

    buf = io.StringIO()
    data.to_csv(buf, index=False, lineterminator="\n")
    meta = {"Software": None, "Title": title, "Loki-Data": buf.getvalue()}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata=meta)
    with atomic_path(Path(path).with_suffix(".csv")) as tmp:
        tmp.write_text(buf.getvalue())


def png_data(path_or_bytes) -> pd.DataFrame:
    """The data frame a report PNG was drawn from (its ``Loki-Data`` text chunk)."""
    from PIL import Image

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    with Image.open(src) as im:
        im.load()
        text = im.text.get("Loki-Data")
    if text is None:
        raise ValueError("PNG has no Loki-Data chunk")
    return pd.read_csv(io.StringIO(text))


def _title(fig, title: str, protocol: str = "") -> None:
    """Title, and under it the protocol line (model, corpus, tokens, commit), wrapped to the figure's width."""
    import textwrap

    width = max(60, int(fig.get_figwidth() * 13))
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(protocol, width)), fontsize=9.5)


def _context_axis(ax, pyplot) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(pyplot.FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))


def k_axis(ax, pyplot, label: str = "k (kept fraction)") -> None:
    """Log-2 x axis for the kept fraction k, ticks as plain numbers (0.125, 0.25...)."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(pyplot.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(pyplot.NullFormatter())
    ax.set_xlabel(label)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ----------------------------------------------------------------------------------------------------------
# byte ratio

def _dims(v, D: float) -> float:
    """An option that is an int of dims or a fraction of the head dim, as dims."""
    v = float(v)
    return v * D if 0 < v < 1 else v


def per_head_selection(method: str, options: dict | None = None) -> bool:
    """Whether the method picks its kept keys per query head (else one set per KV head, or none)."""
    opts = options or {}
    if method in ("exact_topk", "sparq", "quest"):
        return True
    if method in ("loki", "h2o", "loki_h2o"):
        return opts.get("selection", "head") == "head"
    return False


# per method: the elements of every cached key it reads to score it, as f(d, D, G, options), and that term's formula
# (G = query heads per KV head: SparQ picks r components per query head)
_SCORE_READ = {
    "exact_topk": (lambda d, D, G, o: D, "D"),
    "loki": (lambda d, D, G, o: _dims(d, D), "d"),
    "sparq": (lambda d, D, G, o: min(G * _dims(o["r"], D), D), "min(Gr, D)"),
    "quest": (lambda d, D, G, o: 2 * D / float(o["page_size"]), "2D/page_size"),
    "h2o": (lambda d, D, G, o: 0.0, ""),
    "loki_h2o": (lambda d, D, G, o: float(o["cache"]) * _dims(d, D), "cache*d"),
}


def _groups(groups) -> float:
    return 1.0 if groups is None or pd.isna(groups) else float(groups)


def byte_ratio(method: str, d, k, head_dim, options: dict | None = None, groups=1, rows=None) -> float:
    """Ideal decode-step speedup over dense from bytes read (see the module docstring); nan where unknown.

    Elements read per cached token and KV head, dense = 2D: exact_topk D + 2GkD; loki d + 2kD (selection=group) or
    d + 2GkD (selection=head); sparq min(Gr, D) + 2GkD (each head its own r components); quest 2D/page_size + 2GkD
    (page min/max keys); pca_attn d + D (every value); h2o 2kD or 2GkD (one cache per KV head / per query head);
    loki_h2o cache*d + 2kD or 2GkD (Loki scores the cached keys only). k (and cache) as fractions of the context;
    G = ``groups``, query heads per KV head (1: MHA, or unknown).

    ``rows``: the K/V rows a KV head read, measured, as a fraction of the context (an eval's ``kv_rows_fraction``:
    the union of the group's sets, forced tokens and dense layers included); it replaces k (or G*k) for the
    ``byte_ratio_measured`` column. The scoring read is unchanged.
    """
    opts = options or {}
    if method == "dense":
        return 1.0
    if head_dim is None or pd.isna(head_dim):
        return float("nan")
    D, G = float(head_dim), _groups(groups)
    try:
        if method == "pca_attn":
            return 2 * D / (_dims(d, D) + D)
        measured = rows is not None and not pd.isna(rows)
        if method not in _SCORE_READ or not measured and (k is None or pd.isna(k)):
            return float("nan")
        rows = float(rows) if measured else float(k) * (G if per_head_selection(method, opts) else 1.0)
        return 2 * D / (_SCORE_READ[method][0](d, D, G, opts) + 2 * rows * D)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return float("nan")


def json_opts(options) -> dict:
    import json

    return json.loads(options) if isinstance(options, str) and options else (options or {})


def selection_of(method: str, options) -> str | None:
    """'head' or 'group' for a method that selects keys (``options`` a dict or its JSON), None for dense/pca_attn."""
    if method in ("dense", "pca_attn"):
        return None
    return "head" if per_head_selection(method, json_opts(options)) else "group"


def speed_key(options) -> str:
    """The options (``loki.common.MEASURED_AT``) that differ from what a measured speed ran, e.g.
    'dense_layers=4,sink_tokens=4'; '' where none does. A result and a measurement match only with equal keys."""
    o = json_opts(options)
    return ",".join(f"{k}={o[k]}" for k, v in MEASURED_AT.items() if k in o and o[k] != v)


def byte_formula(method: str, options: dict | None = None, groups=1, measured: bool = False) -> str:
    """The byte-ratio formula ``byte_ratio`` applies to the method (for captions and table cells); ``measured``: the
    one ``byte_ratio_measured`` applies (rows = the measured K/V rows per KV head / context, in place of k or G*k)."""
    if method in ("dense", "pca_attn"):
        return {"dense": "1", "pca_attn": "2D/(d+D)"}[method]
    if method not in _SCORE_READ:
        return "unknown"
    G = int(_groups(groups))
    kept = "2*rows*D" if measured else f"2*{G}*kD" if per_head_selection(method, options) and G > 1 else "2kD"
    score = _SCORE_READ[method][1].replace("G", str(G) if G > 1 else "")
    return f"2D/({score + '+' if score else ''}{kept})"


# ----------------------------------------------------------------------------------------------------------
# key rank per layer

def rank_layers(ranks: pd.DataFrame) -> pd.DataFrame:
    """Mean / min / max rank over KV heads per (side, threshold, layer)."""
    g = ranks.groupby(["side", "threshold", "layer"], sort=True)["rank"]
    out = pd.concat([g.mean().rename("rank_mean"), g.min().rename("rank_min"), g.max().rename("rank_max"),
                     g.size().rename("heads")], axis=1).reset_index()
    out["head_dim"] = int(ranks.head_dim.max())
    side_order = {"pre": 0, "post": 1}
    out = out.assign(_s=out.side.map(side_order).fillna(9)).sort_values(["threshold", "_s", "side", "layer"])
    return out.drop(columns="_s").reset_index(drop=True)


def draw_rank(ranks: pd.DataFrame, title: str, footer: str = ""):
    data = rank_layers(ranks)
    thresholds = sorted(data.threshold.unique())
    D = int(data.head_dim.iloc[0])
    pyplot = plt()
    fig, axes = subplots(pyplot, 1, len(thresholds), figsize=(4.2 * len(thresholds) + 0.6, 4.0), sharey=True,
                                squeeze=False)
    colors = {"pre": "tab:orange", "post": "tab:blue"}
    for ax, t in zip(axes[0], thresholds):
        for side, g in data[data.threshold == t].groupby("side", sort=False):
            c = colors.get(side)
            ax.plot(g.layer, g.rank_mean, marker="o", ms=3, color=c, label=f"{side}-RoPE (mean over KV heads)")
            ax.fill_between(g.layer, g.rank_min, g.rank_max, color=c, alpha=0.2, lw=0)
        ax.set(xlabel="layer", title=f"{t * 100:g}% explained variance", ylim=(0, D * 1.02))
        _integer_x(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"key rank (of head dim {D})")
    axes[0][0].legend(fontsize=8, loc="lower right")
    _title(fig, title, footer or "band: min..max over KV heads; rank = PCA dims needed to reach the threshold")
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# quality over (d, k)

def heatmap_data(tidy: pd.DataFrame, eval_name: str, metric: str) -> pd.DataFrame:
    """Rows of one eval with a k (sparse methods): method, variant, k_mode, d, k, value, tag."""
    t = tidy[(tidy["eval"] == eval_name) & tidy.k.notna() & tidy[metric].notna()]
    k_mode = t["k_mode"].fillna("prefix") if "k_mode" in t else pd.Series("prefix", index=t.index)
    out = t[["method", "variant", "d", "k", "tag"]].assign(k_mode=k_mode, value=t[metric].astype(float))
    out = out[["method", "variant", "k_mode", "d", "k", "tag", "value"]]
    return out.sort_values(["method", "variant", "d", "k", "tag"], na_position="first").reset_index(drop=True)


K_LABEL = {"prefix": "k (kept fraction of each query's prefix)", "window": "k (kept fraction of the window)",
           "tokens": "k (kept tokens)"}


def draw_heatmaps(tidy: pd.DataFrame, eval_name: str, metric: str, direction: str, label: str, title: str,
                  footer: str = ""):
    data = heatmap_data(tidy, eval_name, metric)
    pyplot = plt()
    panels = list(data.groupby(["method", "variant"], sort=True))
    if not panels:
        raise ValueError(f"no sparse results for eval {eval_name}")
    # each panel its own k columns (a k_mode=tokens variant counts tokens, the others fractions)
    n_cols = max(g.k.nunique() for _, g in panels)
    log = metric == "ppl"
    vals = np.log(data.value) if log else data.value
    vmin, vmax = float(vals.min()), float(vals.max())
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = "viridis_r" if direction == "lower" else "viridis"
    n_rows = [max(1, g.d.nunique(dropna=False)) for _, g in panels]
    fig, axes = subplots(pyplot, 1, len(panels), figsize=(max(4.5, 0.95 * n_cols + 1.6) * len(panels) + 1.2,
                                                         max(3.4, 0.55 * max(n_rows) + 2.2)), squeeze=False)
    im, shared = None, []
    for ax, ((method, variant), g) in zip(axes[0], panels):
        ds, ks = sorted(g.d.dropna().unique()), sorted(g.k.unique())
        rows = ds if ds else [np.nan]
        cells: dict = {}
        for _, r in g.iterrows():  # (two results in one cell, e.g. d=0.25 and d=16 of a 64-dim head: both shown)
            cells.setdefault((0 if pd.isna(r.d) else ds.index(r.d), ks.index(r.k)), []).append(r)
        grid = np.full((len(rows), len(ks)), np.nan)
        text = {}
        for (i, j), rs in cells.items():
            vals = [r.value for r in rs]
            grid[i, j] = float(np.mean(vals))
            if len(rs) > 1:
                shared.append(f"{method}{f' [{variant}]' if variant else ''} d={fmt_num(rows[i])} k={fmt_num(ks[j])}: "
                              + ", ".join(r.tag for r in rs))
            text[i, j] = "\n".join(f"{v:.4g}" for v in dict.fromkeys(vals))  # equal values once
        shown = np.log(grid) if log else grid
        im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(ks)), [fmt_num(k) for k in ks])
        ax.set_yticks(range(len(rows)), [fmt_num(d) if not pd.isna(d) else ("full D" if method == "exact_topk" else "-")
                                         for d in rows])
        mid = (vmin + vmax) / 2
        for (i, j), txt in text.items():
            light = (shown[i, j] > mid) == (direction == "higher")  # viridis: high = yellow
            ax.text(j, i, txt, ha="center", va="center", fontsize=9 if "\n" not in txt else 7,
                    color="black" if light else "white")
        modes = sorted(set(g.k_mode))
        ax.set(xlabel=K_LABEL.get(modes[0], "k") if len(modes) == 1 else "k (" + " / ".join(modes) + ")",
               ylabel="d (PCA dims scored)" if ds else "", title=method + (f"\n[{variant}]" if variant else ""))
    cb = fig.colorbar(im, ax=list(axes[0]), shrink=0.9)
    cb.set_label(f"log {label}" if log else label)
    dense = tidy[(tidy["eval"] == eval_name) & (tidy.method == "dense")][metric].dropna()
    sub = f"; dense {label}: {dense.iloc[0]:.4g}" if len(dense) else ""
    if shared:
        axes[0][0].text(0, -0.28, "cells holding more than one result (values listed, colour = mean): "
                        + "; ".join(shared[:4]) + (f"; {len(shared) - 4} more" if len(shared) > 4 else ""),
                        transform=axes[0][0].transAxes, fontsize=7.5, color="firebrick", va="top")
    _title(fig, f"{title}{sub}", footer)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# accuracy versus speed

def pareto(x: np.ndarray, y: np.ndarray, lower_better: bool) -> np.ndarray:
    """Points not dominated by another (more speed and better metric, one strictly)."""
    y = y if lower_better else -y
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        dom = (x >= x[i]) & (y <= y[i]) & ((x > x[i]) | (y < y[i]))
        keep[i] = not dom.any()
    return keep


def frontier_data(tidy: pd.DataFrame, speed: pd.DataFrame, eval_name: str, metric: str, direction: str):
    """One row per result of the eval: metric value, speedup and where the speedup comes from.

    Without a GPU figure the speedup is the ideal byte ratio: with the K/V rows the method measured while it ran
    (``byte_ratio_measured``) where the result has them, else with the counted k or G*k rows (``byte_ratio``)."""
    t = tidy[(tidy["eval"] == eval_name) & tidy[metric].notna()]
    cols = ["method", "variant", "d", "k", "tag"]
    groups = t["kv_groups"] if "kv_groups" in t else pd.Series(np.nan, index=t.index)
    opts = t["options"] if "options" in t else pd.Series("{}", index=t.index)
    measured = t["byte_ratio_measured"] if "byte_ratio_measured" in t else pd.Series(np.nan, index=t.index)
    measured = measured.astype(float)
    has_rows = measured.notna() & (t.method != "dense")
    counted = [byte_formula(m, json_opts(o), g) for m, o, g in zip(t.method, opts, groups)]
    with_rows = [byte_formula(m, json_opts(o), g, measured=True) for m, o, g in zip(t.method, opts, groups)]
    # (a ratio that reads no kept rows, PCA-Attn's, is the same either way: its formula alone)
    formula = [f"{w} (measured rows; counted: {c})" if r and w != c else c
               for w, c, r in zip(with_rows, counted, has_rows)]
    out = t[cols].assign(value=t[metric].astype(float), byte_ratio=t.byte_ratio.astype(float),
                         byte_ratio_measured=measured,
                         selection=[selection_of(m, o) or "" for m, o in zip(t.method, opts)],
                         ideal=np.where(has_rows, measured, t.byte_ratio.astype(float)), formula=formula)
    if len(speed):
        sel = speed.selection if "selection" in speed else pd.Series(None, index=speed.index, dtype=object)
        sp = speed.assign(selection=[v if isinstance(v, str) else "" for v in sel])
        sp = sp.assign(speed_key=sp.speed_key.fillna("") if "speed_key" in sp else "")
        out = out.assign(speed_key=[speed_key(o) for o in opts])
        out = out.merge(sp, on=["method", "d", "k", "selection", "speed_key"], how="left").drop(columns="speed_key")
    else:
        out = out.assign(speedup=np.nan, speed_source=None, speed_detail=None)
    ideal = out.speedup.isna()
    out.loc[ideal, "speedup"] = out.loc[ideal, "ideal"]
    out.loc[ideal, "speed_source"] = "ideal"
    out.loc[ideal, "speed_detail"] = out.loc[ideal, "formula"]
    out = out.drop(columns=["formula", "ideal"])
    ref = out.method == "dense"
    out.loc[ref & ideal, "speed_source"] = "reference"
    out = out[out.speedup.notna()].copy()
    out["pareto"] = pareto(out.speedup.to_numpy(float), out.value.to_numpy(float), direction == "lower")
    out.insert(0, "eval", eval_name)
    out.insert(1, "metric", metric)
    return out.sort_values(["method", "variant", "d", "k", "tag"], na_position="first").reset_index(drop=True)


def draw_frontier(data: pd.DataFrame, direction: str, label: str, title: str, footer: str = "",
                  omitted: list | None = None):
    pyplot = plt()
    fig, ax = subplots(pyplot, figsize=(7.6, 5.0))
    colors = method_colors(pyplot, data.method.unique())
    markers = {"decode": "o", "kernel": "s", "reference": "*", "ideal": "o"}
    for (method, source), g in data.groupby(["method", "speed_source"], sort=True):
        filled = source != "ideal"
        ax.scatter(g.speedup, g.value, s=110 if source == "reference" else 46, marker=markers.get(source, "o"),
                   facecolors=colors[method] if filled else "none", edgecolors=colors[method], linewidths=1.4,
                   zorder=3, label=f"{method}: {LEGEND[source]}")
        for _, r in g.iterrows():
            if r.method != "dense":
                txt = " ".join(p for p in (f"d{fmt_num(r.d)}" if not pd.isna(r.d) else "",
                                           f"k{fmt_num(r.k)}" if not pd.isna(r.k) else "", r.variant) if p)
                ax.annotate(txt, (r.speedup, r.value), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color="0.3")
    meas = data[data.speed_source.isin(["decode", "kernel"]) & data.byte_ratio.notna()]
    for i, (_, r) in enumerate(meas.iterrows()):  # where a measured point would sit at its ideal byte ratio
        ax.plot([r.speedup, r.byte_ratio], [r.value, r.value], color="0.6", ls=":", lw=1, zorder=1,
                label="measured -> its ideal byte ratio" if i == 0 else None)
        ax.scatter([r.byte_ratio], [r.value], s=18, marker="|", color="0.5", zorder=1)
    p = data[data.pareto].sort_values("speedup")
    if len(p) > 1:
        ax.plot(p.speedup, p.value, color="0.4", ls="--", lw=1, zorder=2, label="Pareto frontier")
    ax.set_xscale("log", base=2)
    ax.margins(x=0.1, y=0.06)
    ax.xaxis.set_major_formatter(pyplot.FuncFormatter(lambda v, _: f"{v:g}x"))
    if label == "perplexity":
        ax.set_yscale("log")
        plain = pyplot.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    n_ideal = int((data.speed_source == "ideal").sum())
    n_meas = int(data.speed_source.isin(["decode", "kernel"]).sum())
    xlab = "speedup over dense attention"
    if n_ideal and not n_meas:
        xlab += " (NO GPU FIGURE: ideal byte ratio, formula per point in the table)"
    elif n_ideal:
        xlab += " (filled: measured; hollow: ideal byte ratio, no GPU figure)"
    ax.set(xlabel=xlab, ylabel=label + (" (lower is better)" if direction == "lower" else " (higher is better)"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="best")
    warn = []
    if n_ideal:
        warn.append(f"{n_ideal} of {len(data)} points have no GPU measurement: their x is the ideal byte ratio "
                    "of one decode step")
    if omitted:
        warn.append(f"not shown (no speed figure, no byte-ratio model): {', '.join(omitted)}")
    if warn:
        ax.set_title("\n".join(warn), fontsize=8.5, color="firebrick")
    _title(fig, title, footer)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# selection quality per layer

LAYER_METRICS = (("recall", "top-k recall"), ("attention_mass", "attention mass kept"),
                 ("output_rel_error", "output relative error"))


def selection_layers(tidy: pd.DataFrame) -> pd.DataFrame:
    import json

    rows = []
    sel = tidy[(tidy["eval"] == "selection") & tidy.per_layer.notna()]
    for _, r in sel.iterrows():
        for e in json.loads(r.per_layer):
            rows.append({"method": r.method, "variant": r.variant, "d": r.d, "k": r.k, "tag": r.tag,
                         "layer": int(e["layer"]), **{m: float(e[m]) if e.get(m) is not None else np.nan
                                                       for m, _ in LAYER_METRICS}})
    cols = ["method", "variant", "d", "k", "tag", "layer"] + [m for m, _ in LAYER_METRICS]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["method", "variant", "d", "k", "tag", "layer"], na_position="first").reset_index(drop=True)


def draw_selection(tidy: pd.DataFrame, title: str, footer: str = ""):
    data = selection_layers(tidy)
    if data.empty:
        raise ValueError("no per-layer selection metrics")
    metrics = [(m, lab) for m, lab in LAYER_METRICS if data[m].notna().any()]
    pyplot = plt()
    fig, axes = subplots(pyplot, 1, len(metrics), figsize=(4.6 * len(metrics) + 0.8, 4.2), squeeze=False)
    groups = list(data.groupby(["method", "variant", "d", "k", "tag"], sort=True, dropna=False))
    cmap = pyplot.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for ax, (m, lab) in zip(axes[0], metrics):
        for i, ((method, variant, d, k, _), g) in enumerate(groups):
            ax.plot(g.layer, g[m], marker="o", ms=2.5, lw=1.2, color=cmap(i % cmap.N),
                    ls="--" if method != "loki" else "-", label=point_label(method, variant, d, k))
        ax.set(xlabel="layer", ylabel=lab, title=lab)
        _integer_x(ax)
        if m != "output_rel_error":
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    _title(fig, title, footer)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# calibration transfer

def transfer_data(transfer: pd.DataFrame) -> pd.DataFrame:
    return transfer[["side", "d", "fit_corpus", "eval_corpus", "explained_variance"]].sort_values(
        ["side", "d", "fit_corpus", "eval_corpus"]).reset_index(drop=True)


def draw_transfer(transfer: pd.DataFrame, title: str, footer: str = ""):
    data = transfer_data(transfer)
    pyplot = plt()
    sides = sorted(data.side.unique(), key=lambda s: {"pre": 0, "post": 1}.get(s, 9))
    ds = sorted(data.d.unique())
    fits = sorted(data.fit_corpus.unique())
    evs = sorted(data.eval_corpus.unique())
    w = max(2.6, 0.9 * len(evs) + 1.4)
    fig, axes = subplots(pyplot, len(sides), len(ds), figsize=(w * len(ds) + 1.4, (0.55 * len(fits) + 1.6) * len(sides)
                                                              + 0.8), squeeze=False)
    for i, side in enumerate(sides):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            g = data[(data.side == side) & (data.d == d)]
            grid = np.full((len(fits), len(evs)), np.nan)
            for _, r in g.iterrows():
                grid[fits.index(r.fit_corpus), evs.index(r.eval_corpus)] = r.explained_variance
            im = ax.imshow(np.ma.masked_invalid(grid), cmap="magma", vmin=0, vmax=1, aspect="auto")
            for a in range(len(fits)):
                for b in range(len(evs)):
                    if not np.isnan(grid[a, b]):
                        ax.text(b, a, f"{grid[a, b]:.3f}", ha="center", va="center", fontsize=8,
                                color="black" if grid[a, b] > 0.6 else "white",
                                fontweight="bold" if fits[a] == evs[b] else "normal")
            ax.set_xticks(range(len(evs)), evs, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(fits)), fits if j == 0 else [""] * len(fits), fontsize=8)
            ax.set_title(f"{side}-RoPE, d={fmt_num(d)}", fontsize=9)
            if i == len(sides) - 1:
                ax.set_xlabel("keys of corpus (eval)")
            if j == 0:
                ax.set_ylabel("basis fitted on")
    fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.85, label="explained variance of the first d dims")
    _title(fig, title, footer)
    return fig, data


# ----------------------------------------------------------------------------------------------------------
# speed

def _speed_panel(ax, pyplot, title: str) -> None:
    """Decoration of one speedup-against-context panel: the no-speedup line at 1, log-2 context axis, grid, legend."""
    ax.axhline(1, color="0.5", lw=0.8)
    _context_axis(ax, pyplot)
    ax.set(xlabel="context (tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_kernel_speed(kern: pd.DataFrame, title: str, footer: str = ""):
    """Kernel speedup over SDPA against context, per batch, with the ideal byte ratio dashed."""
    data = kern.sort_values(["device", "batch", "d_frac", "k_frac", "context", "source"]).reset_index(drop=True)
    pyplot = plt()
    panels = list(data.groupby(["device", "batch"], sort=True))
    fig, axes = subplots(pyplot, 1, len(panels), figsize=(5.0 * len(panels) + 0.6, 4.2), squeeze=False, sharey=True)
    cmap = pyplot.get_cmap("tab10")
    configs = sorted(set(zip(data.d_frac, data.k_frac)))
    for ax, ((device, batch), g) in zip(axes[0], panels):
        for (df_, kf), h in g.groupby(["d_frac", "k_frac"], sort=True):
            c = cmap(configs.index((df_, kf)) % 10)
            ax.plot(h.context, h.speedup, marker="o", color=c, label=f"d={df_}, k={kf} (measured)")
            ax.plot(h.context, h.ideal_ratio, ls="--", color=c, alpha=0.6, label=f"d={df_}, k={kf} (ideal bytes)")
        _speed_panel(ax, pyplot, f"{device}, batch {batch}, group selection")
    axes[0][0].set_ylabel("speedup over SDPA (attention only)")
    _title(fig, title, footer)
    return fig, data


def draw_decode_speed(dec: pd.DataFrame, title: str, footer: str = ""):
    data = dec[dec.speedup.notna()]  # rows without a dense reference at their (batch, context) have no speedup
    data = data.sort_values(["batch", "method", "variant", "d", "k", "context"], na_position="first").reset_index(drop=True)
    pyplot = plt()
    panels = list(data.groupby("batch", sort=True))
    fig, axes = subplots(pyplot, 1, len(panels), figsize=(5.0 * len(panels) + 0.6, 4.2), squeeze=False, sharey=True)
    cmap = pyplot.get_cmap("tab10")
    configs = sorted({point_label(*r) for r in zip(data.method, data.variant, data.d, data.k)})
    for ax, (batch, g) in zip(axes[0], panels):
        for (method, variant, d, k), h in g.groupby(["method", "variant", "d", "k"], sort=True, dropna=False):
            lab = point_label(method, variant, d, k)
            ax.plot(h.context, h.speedup, marker="o", color=cmap(configs.index(lab) % 10), label=lab)
        _speed_panel(ax, pyplot, f"batch {batch}")
    axes[0][0].set_ylabel("decode speedup over dense")
    _title(fig, title, footer)
    return fig, data
