"""Calibration transfer: how well does a basis fitted on corpus A capture corpus B's keys?

For every ordered pair (A, B) of ``transfer.corpora``, every RoPE side and every d in ``transfer.dims``:
the fraction of B's key variance (around B's mean, per layer and KV head) inside A's top-d principal
subspace, ``tr(P_d^T C_B P_d) / tr(C_B)``. A = B gives A's own cumulative explained variance. B's
covariance is accumulated by streaming over its key shards (memory bounded by one shard).

Writes ``transfer.csv`` (mean over layers and heads: fit_corpus, eval_corpus, side, d, explained_variance),
``transfer_per_layer.csv`` and ``transfer.png`` (one matrix per side at the reported d).

    python -m loki.transfer 'transfer.corpora=[lee_news,enwiki_sample]'
"""

from __future__ import annotations

from pathlib import Path

import torch

from loki.app import stage
from loki.common import atomic_path, fail


def key_covariance(keys_dir: Path, side: str):
    """Per (layer, head) covariance of the keys, (L, H, D, D) float64, streamed over shards."""
    from loki.extract_keys import iter_shards, verify_shards

    man = verify_shards(keys_dir)
    s1 = s2 = None
    n = 0
    for chunk in iter_shards(keys_dir, man, side):
        x = chunk.double()  # (L, H, N, D)
        s1 = x.sum(2) if s1 is None else s1 + x.sum(2)
        xx = x.transpose(-1, -2) @ x
        s2 = xx if s2 is None else s2 + xx
        n += x.shape[2]
    mean = s1 / n
    return s2 / n - mean.unsqueeze(-1) * mean.unsqueeze(-2), man


def captured(P: torch.Tensor, C: torch.Tensor, d: int) -> torch.Tensor:
    """Fraction of the variance of C inside the first d columns of P, per (layer, head)."""
    Pd = P[..., :d].double()
    return torch.einsum("lhdi,lhde,lhei->lh", Pd, C, Pd) / torch.diagonal(C, dim1=-2, dim2=-1).sum(-1)


def transfer_table(cfg):
    import pandas as pd

    from loki.modeling import check_fingerprint
    from loki.pca import load_basis

    corpora = list(cfg.transfer.corpora)
    if len(corpora) < 2:
        raise fail(f"transfer needs at least two corpora, got {corpora}.", "set transfer.corpora=[a,b].")
    res = Path(cfg.results_dir)
    keys = {c: res / "keys" / cfg.model.name / c for c in corpora}
    bases = {c: load_basis(res / "pca" / cfg.model.name / c / "pca.safetensors") for c in corpora}
    fp0 = bases[corpora[0]].fingerprint
    for c in corpora[1:]:
        check_fingerprint(fp0, bases[c].fingerprint, "PCA file", bases[c].path, "fit every corpus's basis with the same model.")
    sides = [s for s in bases[corpora[0]].sides if all(s in b.sides for b in bases.values())]
    D = int(fp0["head_dim"])
    dims = sorted({int(d) for d in cfg.transfer.dims if 0 < int(d) <= D})
    rows, per_layer = [], []
    for side in sides:
        for b in corpora:
            C, _ = key_covariance(keys[b], side)
            for a in corpora:
                P = bases[a].components(side)
                for d in dims:
                    cap = captured(P, C, d)  # (L, H)
                    rows.append({"fit_corpus": a, "eval_corpus": b, "side": side, "d": d,
                                 "explained_variance": float(cap.mean())})
                    for layer in range(cap.shape[0]):
                        per_layer.append({"fit_corpus": a, "eval_corpus": b, "side": side, "d": d, "layer": layer,
                                          "explained_variance": float(cap[layer].mean())})
    return pd.DataFrame(rows), pd.DataFrame(per_layer)


def plot_transfer(df, path: Path, d: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = sorted(df.side.unique())
    fig, axes = plt.subplots(1, len(sides), figsize=(4.8 * len(sides), 4), squeeze=False)
    for ax, side in zip(axes[0], sides):
        t = df[(df.side == side) & (df.d == d)].pivot(index="fit_corpus", columns="eval_corpus", values="explained_variance")
        im = ax.imshow(t.values, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(t.shape[1]), t.columns, rotation=20)
        ax.set_yticks(range(t.shape[0]), t.index)
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                ax.text(j, i, f"{t.values[i, j]:.3f}", ha="center", va="center", color="w")
        ax.set(xlabel="keys of corpus", ylabel="basis fitted on", title=f"{side}-RoPE, d={d}")
    fig.colorbar(im, ax=axes[0].tolist(), label="explained variance")
    fig.suptitle("Calibration transfer: variance captured by another corpus's top-d basis")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    out = Path(cfg.results_dir) / "transfer"
    with wandb_run(cfg, "transfer", name="transfer") as run:
        df, per_layer = transfer_table(cfg)
        with atomic_path(out / "transfer.csv") as tmp:
            df.to_csv(tmp, index=False)
        with atomic_path(out / "transfer_per_layer.csv") as tmp:
            per_layer.to_csv(tmp, index=False)
        d = int(cfg.transfer.plot_d)
        if d not in set(df.d):
            d = int(df.d.iloc[0])
        plot_transfer(df, out / "transfer.png", d)
        if run is not None:
            import wandb

            run.log({"transfer_table": wandb.Table(dataframe=df), "transfer_plot": wandb.Image(str(out / "transfer.png"))})
    print(df[df.d == d].to_string(index=False))
    print(f"[transfer] -> {out}")


if __name__ == "__main__":
    main()
