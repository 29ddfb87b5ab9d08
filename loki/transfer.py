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
    raw = list(cfg.transfer.dims or [])
    if not raw or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in raw):
        raise fail(f"transfer.dims must be a non-empty list of ints >= 1 (PCA dims), got {raw}.",
                   "e.g. 'transfer.dims=[4,8,16,32]' (each at most the model's head dim).")
    res = Path(cfg.results_dir)
    keys = {c: res / "keys" / cfg.model.name / c for c in corpora}
    pcas = {c: res / "pca" / cfg.model.name / c / "pca.safetensors" for c in corpora}
    for c in corpora:  # transfer reads these fixed places (not keys_dir / pca_path): name how to fill them
        missing = [str(p) for p in (keys[c] / "manifest.json", pcas[c]) if not p.exists()]
        if missing:
            raise fail(f"transfer: the keys or PCA basis of corpus '{c}' are missing ({', '.join(missing)}).",
                       f"make them with `python -m loki.extract_keys corpus@calib={c}`, then `python -m loki.fit_pca "
                       f"corpus@calib={c}`, each with this run's experiment= and model overrides (or `snakemake --cores 2 "
                       f"{pcas[c]}`); transfer reads <results_dir>/keys|pca/<model>/<corpus>/ and ignores keys_dir and "
                       "pca_path.")
    bases = {c: load_basis(pcas[c]) for c in corpora}
    fp0 = bases[corpora[0]].fingerprint
    for c in corpora[1:]:
        check_fingerprint(fp0, bases[c].fingerprint, "PCA file", bases[c].path, "fit every corpus's basis with the same model.")
    sides = [s for s in bases[corpora[0]].sides if all(s in b.sides for b in bases.values())]
    if not sides:
        raise fail(f"transfer: the PCA files of {corpora} have no RoPE side (pre / post) in common.",
                   "refit them with the same extract.sides.")
    D = int(bases[corpora[0]].components(sides[0]).shape[-1])
    if max(raw) > D:
        raise fail(f"transfer.dims={raw}: {[d for d in raw if d > D]} above the head dim {D} of model '{cfg.model.name}'.",
                   f"use dims between 1 and {D}, e.g. 'transfer.dims=[4,8,16,32]'.")
    dims = sorted(set(raw))
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
    """Write the transfer matrices at d to ``path`` (the caller makes it atomic)."""
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
    fig.savefig(path, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    out = Path(cfg.results_dir) / "transfer"
    with wandb_run(cfg, "transfer", name="transfer") as run:
        df, per_layer = transfer_table(cfg)
        d = int(cfg.transfer.plot_d)
        if d not in set(df.d):
            d = int(df.d.iloc[0])
        # all three or none: each is renamed into place only once every one of them is written
        with atomic_path(out / "transfer.csv") as t1, atomic_path(out / "transfer_per_layer.csv") as t2, \
                atomic_path(out / "transfer.png") as t3:
            df.to_csv(t1, index=False)
            per_layer.to_csv(t2, index=False)
            plot_transfer(df, t3, d)
        if run is not None:
            import wandb

            run.log({"transfer_table": wandb.Table(dataframe=df), "transfer_plot": wandb.Image(str(out / "transfer.png"))})
    print(df[df.d == d].to_string(index=False))
    print(f"[transfer] -> {out}")


if __name__ == "__main__":
    main()
