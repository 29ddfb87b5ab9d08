"""Stage 4: gather every evaluation of an experiment into ``summary.csv`` and draw the (d, k) heatmap.

    python -m loki.report experiment=smoke
"""

from __future__ import annotations

import json
from pathlib import Path

from loki.app import stage
from loki.common import atomic_path, fail

COLUMNS = ["experiment", "model", "corpus", "eval", "method", "d", "k", "k_mode", "ppl", "nll", "tokens",
           "window", "num_windows", "seconds", "git_commit", "result", "options"]


def collect(results_dir: Path):
    import pandas as pd

    files = sorted(Path(results_dir).glob("evaluate/*/*/metrics.json"))
    if not files:
        raise fail(f"no evaluation results under {results_dir}/evaluate/<eval>/<tag>/metrics.json.", "run the evaluate stage first.")
    rows = []
    for f in files:
        try:
            m = json.loads(f.read_text())
            row = {c: m.get(c) for c in COLUMNS}
            row["k_mode"] = m.get("options", {}).get("k_mode")
            row["options"] = json.dumps(m.get("options", {}), sort_keys=True)
            row["result"] = str(f)
            if row["ppl"] is None or row["method"] is None:
                raise KeyError("ppl/method")
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise fail(f"result file {f} is malformed ({type(e).__name__}: {e}).",
                       f"delete {f.parent} and rerun its evaluate job (snakemake reruns it).") from e
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"d": object, "k": object})
    order = df.assign(_d=pd.to_numeric(df.d), _k=pd.to_numeric(df.k))
    order = order.sort_values(["method", "_d", "_k", "result"], na_position="first", kind="stable")
    return df.loc[order.index].reset_index(drop=True)


def heatmap_table(df):
    loki = df[df.method == "loki"]
    if loki.empty:
        return None
    return loki.pivot_table(index="d", columns="k", values="ppl", aggfunc="first").sort_index().sort_index(axis=1)


def plot_heatmap(df, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tab = heatmap_table(df)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if tab is None:
        ax.text(0.5, 0.5, "no loki results", ha="center")
    else:
        im = ax.imshow(np.log(tab.values), cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(tab.shape[1]), [f"{k:g}" for k in tab.columns])
        ax.set_yticks(range(tab.shape[0]), [str(int(d)) if float(d).is_integer() else f"{d:g}" for d in tab.index])
        for i in range(tab.shape[0]):
            for j in range(tab.shape[1]):
                ax.text(j, i, f"{tab.values[i, j]:.2f}", ha="center", va="center", color="w", fontsize=9)
        ax.set(xlabel="k (fraction of the causal prefix)", ylabel="d (PCA dims scored)")
        fig.colorbar(im, ax=ax, label="log perplexity")
    dense = df[df.method == "dense"].ppl
    sub = f"dense ppl {dense.iloc[0]:.2f}" if len(dense) else ""
    ax.set_title(f"{title}\nLoki perplexity over (d, k); {sub}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    res = Path(cfg.results_dir)
    df = collect(res)
    with wandb_run(cfg, "report", name="report") as run:
        with atomic_path(res / "summary.csv") as tmp:
            df.to_csv(tmp, index=False)
        plot_heatmap(df, res / "heatmap.png", f"{cfg.experiment_name}: {df.model.iloc[0]} on {df.corpus.iloc[0]}")
        if run is not None:
            import wandb

            run.log({"summary": wandb.Table(dataframe=df.drop(columns=["options"])),
                     "heatmap": wandb.Image(str(res / "heatmap.png"))})
    print(df[["method", "d", "k", "ppl", "tokens"]].to_string(index=False))
    print(f"[report] {len(df)} rows -> {res / 'summary.csv'}, {res / 'heatmap.png'}")


if __name__ == "__main__":
    main()
