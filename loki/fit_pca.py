"""Stage 2: fit one IncrementalPCA per (layer, KV head, RoPE side), streaming over the key shards.

Writes ``pca.safetensors`` (+ ``pca.json``) and the rank analysis beside it: ``rank.csv`` (rank at the
configured explained-variance thresholds per layer, head and side, of the fitted PCA), ``rank_uncentered.csv``
(the same from the uncentered second moment, the convention of rank analyses that keep the mean),
``rank_summary.json``, ``explained_variance.csv`` (the cumulative curves) and ``rank.png``.

    python -m loki.fit_pca model=smollm2-135m corpus@calib=lee_news
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loki.app import stage
from loki.common import atomic_path


def fit(cfg, keys_dir: Path, pca_path: Path, progress: bool = True) -> dict:
    from tqdm import tqdm

    from loki.extract_keys import iter_shards, verify_shards
    from loki.pca import fit_incremental, save_basis

    man = verify_shards(keys_dir)
    fp = man["model"]
    L, H, D = fp["num_layers"], fp["num_kv_heads"], fp["head_dim"]
    sides = list(cfg.pca.get("sides") or man["sides"])
    n_jobs = int(cfg.pca.get("n_jobs") or cfg.get("threads") or 1)
    tensors, t0 = {}, time.time()
    for side in sides:
        bar = tqdm(total=man["num_tokens"], unit="tok", desc=f"fit_pca[{side}]", disable=not progress)
        out = fit_incremental(iter_shards(keys_dir, man, side), L, H, D, center=bool(cfg.pca.center),
                              n_jobs=n_jobs, progress=bar)
        bar.close()
        for k, v in out.items():
            tensors[f"{side}.{k}"] = v
    meta = {
        "fingerprint": {k: fp[k] for k in ("name", "model_type", "num_layers", "num_heads", "num_kv_heads",
                                           "head_dim", "hidden_size", "vocab_size")},
        "fitted_on": {"keys_dir": str(keys_dir), "corpus": man["corpus"].get("name"), "tokens": man["num_tokens"],
                      "seq_len": man["seq_len"], "sides": sides},
        "center": bool(cfg.pca.center),
        "seconds": round(time.time() - t0, 2),
    }
    save_basis(pca_path, tensors, meta)
    return {"meta": meta, "tensors": tensors, "sides": sides}


def rank_tables(tensors: dict, sides: list[str], thresholds=(0.8, 0.9, 0.95)):
    """Long tables: rank per (side, layer, head, threshold), and cumulative explained variance curves."""
    import pandas as pd

    from loki.pca import rank_at

    rows, curves = [], []
    for side in sides:
        evr = tensors[f"{side}.explained_variance_ratio"]  # (L, H, D)
        L, H, D = evr.shape
        cum = evr.cumsum(-1)
        for t in thresholds:
            r = rank_at(evr, t)
            for layer in range(L):
                for h in range(H):
                    rows.append({"side": side, "layer": layer, "head": h, "threshold": t, "rank": int(r[layer, h]), "head_dim": D})
        for layer in range(L):
            for h in range(H):
                for d in range(D):
                    curves.append({"side": side, "layer": layer, "head": h, "d": d + 1, "cum_explained_variance": float(cum[layer, h, d])})
    return pd.DataFrame(rows), pd.DataFrame(curves)


def second_moment_ranks(keys_dir: Path, sides: list[str], thresholds=(0.8, 0.9, 0.95)):
    """Rank at each threshold from the uncentered second moment E[k k^T] (the convention of rank analyses
    that do not subtract the mean), streamed over the shards; same columns as ``rank_tables``."""
    import pandas as pd

    from loki.extract_keys import iter_shards, verify_shards
    from loki.pca import rank_at

    man = verify_shards(keys_dir, check_hash=False)
    rows = []
    for side in sides:
        m2, n = None, 0
        for x in iter_shards(keys_dir, man, side):
            x = x.double()
            xx = x.transpose(-1, -2) @ x
            m2 = xx if m2 is None else m2 + xx
            n += x.shape[2]
        ev = torch.linalg.eigvalsh(m2 / n).flip(-1).clamp_min(0)
        evr = ev / ev.sum(-1, keepdim=True)
        L, H, D = evr.shape
        for t in thresholds:
            r = rank_at(evr, t)
            rows += [{"side": side, "layer": layer, "head": h, "threshold": t, "rank": int(r[layer, h]), "head_dim": D}
                     for layer in range(L) for h in range(H)]
    return pd.DataFrame(rows)


def plot_rank(ranks, curves, path: Path, threshold: float = 0.9, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    r = ranks[ranks.threshold == threshold]
    D = int(r.head_dim.iloc[0])
    for side, g in r.groupby("side"):
        m = g.groupby("layer")["rank"].mean()
        a1.plot(m.index, m.values, marker="o", ms=3, label=f"{side}-RoPE (mean over KV heads)")
        a1.fill_between(m.index, g.groupby("layer")["rank"].min(), g.groupby("layer")["rank"].max(), alpha=0.2)
    a1.set(xlabel="layer", ylabel=f"rank at {int(threshold * 100)}% explained variance", ylim=(0, D),
           title=f"Key rank per layer (head dim {D})")
    a1.legend()
    for side, g in curves.groupby("side"):
        m = g.groupby("d")["cum_explained_variance"].mean()
        a2.plot(m.index, m.values, label=f"{side}-RoPE (mean over layers, heads)")
    a2.axhline(threshold, color="grey", ls=":")
    a2.set(xlabel="d (principal components)", ylabel="cumulative explained variance", title="Explained variance")
    a2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@stage
def main(cfg) -> None:
    from loki.common import write_json
    from loki.tracking import wandb_run

    keys_dir, pca_path = Path(cfg.keys_dir), Path(cfg.pca_path)
    with wandb_run(cfg, "fit_pca", name=f"fit_pca-{cfg.model.name}-{cfg.calib.name}") as run:
        res = fit(cfg, keys_dir, pca_path)
        ranks, curves = rank_tables(res["tensors"], res["sides"], tuple(cfg.pca.thresholds))
        out = pca_path.parent
        with atomic_path(out / "rank.csv") as tmp:
            ranks.to_csv(tmp, index=False)
        with atomic_path(out / "explained_variance.csv") as tmp:
            curves.to_csv(tmp, index=False)
        plot_rank(ranks, curves, out / "rank.png", 0.9, f"{cfg.model.name} keys on {cfg.calib.name}")
        unc = second_moment_ranks(keys_dir, res["sides"], tuple(cfg.pca.thresholds))
        with atomic_path(out / "rank_uncentered.csv") as tmp:
            unc.to_csv(tmp, index=False)
        centered = "centered" if cfg.pca.center else "uncentered"
        summary = {}
        for side in res["sides"]:
            summary[f"rank90_{side}_mean"] = float(ranks[(ranks.side == side) & (ranks.threshold == 0.9)]["rank"].mean())
            summary[f"rank90_{side}_uncentered_mean"] = float(unc[(unc.side == side) & (unc.threshold == 0.9)]["rank"].mean())
        summary["pca"] = centered
        write_json(out / "rank_summary.json", summary)
        if run is not None:
            import wandb

            run.summary.update(summary)
            run.log({"rank_table": wandb.Table(dataframe=ranks[ranks.threshold == 0.9]),
                     "rank_plot": wandb.Image(str(out / "rank.png"))})
    print(f"[fit_pca] {pca_path}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in summary.items()))


if __name__ == "__main__":
    main()
