"""PCA bases of the keys: fitting (streaming IncrementalPCA), safetensors I/O, checks against a model.

File layout (``pca.safetensors``), per RoPE side ``pre`` / ``post``:
``{side}.components`` (L, KVH, D, D) -- columns are principal directions by decreasing variance, so
``K' = K @ P``; ``{side}.mean`` (L, KVH, D); ``{side}.explained_variance`` and
``{side}.explained_variance_ratio`` (L, KVH, D); ``{side}.n_samples`` (L, KVH). The safetensors metadata
holds the model fingerprint and what the basis was fitted on; ``pca.json`` beside it repeats that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loki.common import fail

FORMAT = "loki-pca/1"


class Basis:
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, path: str = "<memory>"):
        self.t = tensors
        self.meta = meta
        self.path = str(path)
        self.fingerprint = meta.get("fingerprint", {})
        self.accepted_for = None  # a model of another name this basis was let through for (allow_foreign_basis)

    @property
    def sides(self) -> list[str]:
        return sorted({k.split(".")[0] for k in self.t})

    def _get(self, side: str, what: str) -> torch.Tensor:
        key = f"{side}.{what}"
        if key not in self.t:
            raise fail(f"PCA file {self.path} has no '{side}' basis (it holds: {self.sides}).",
                       f"refit with extract.sides including '{side}', or use method.rope={self.sides[0] if self.sides else 'post'}.")
        return self.t[key]

    def components(self, side: str) -> torch.Tensor:
        return self._get(side, "components").float()

    def mean(self, side: str) -> torch.Tensor:
        return self._get(side, "mean").float()

    def explained_variance_ratio(self, side: str) -> torch.Tensor:
        return self._get(side, "explained_variance_ratio").double()

    def dims_for_variance(self, side: str, threshold: float) -> torch.Tensor:
        """Smallest d per (layer, KV head) whose leading components explain >= threshold of the variance."""
        cum = self.explained_variance_ratio(side).cumsum(-1)
        d = (cum < threshold - 1e-9).sum(-1) + 1
        return d.clamp(max=cum.shape[-1]).long()

    @property
    def model_name(self) -> str | None:
        """The model this basis was fitted for (its fingerprint), what metrics.json records as ``basis_model``."""
        return self.fingerprint.get("name") or None

    def check(self, model_info: dict, path: str | None = None, allow_other_model: bool = False) -> None:
        """Refuse a basis of another model (``allow_other_model``: the same shapes under another name are let
        through, and later checks for that model pass too)."""
        from loki.modeling import check_fingerprint

        allow = allow_other_model or (self.accepted_for is not None and self.accepted_for == model_info.get("name"))
        check_fingerprint(self.fingerprint, model_info, "PCA file", path or self.path,
                          f"fit a basis for '{model_info.get('name')}' (`make run` for the default model; else "
                          "extract_keys and fit_pca with this run's model overrides), or point pca_path at one that was.",
                          allow, "allow_foreign_basis")
        if allow and self.model_name and self.model_name != model_info.get("name"):
            self.accepted_for = model_info.get("name")
        for side in self.sides:
            P = self.t[f"{side}.components"]
            want = (model_info["num_layers"], model_info["num_kv_heads"], model_info["head_dim"], model_info["head_dim"])
            if tuple(P.shape) != want:
                raise fail(f"PCA file {path or self.path}: {side}.components has shape {tuple(P.shape)}, the model needs {want} "
                           "(layers, KV heads, head dim, head dim).", "refit the basis for this model.")


def save_basis(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    from loki.common import atomic_path, write_json

    meta = {"format": FORMAT, **meta}
    path = Path(path)
    with atomic_path(path) as tmp:
        # a single metadata key: safetensors writes several in random order (non-reproducible bytes)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"loki": json.dumps(meta, sort_keys=True)})
    write_json(path.with_suffix(".json"), meta)


def load_basis(path: str | Path, model_info: dict | None = None, allow_other_model: bool = False) -> Basis:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.exists():
        raise fail(f"PCA file {path} does not exist.",
                   "run the fit_pca stage first: `snakemake --cores 2`, or `python -m loki.fit_pca` (after "
                   "loki.extract_keys) with this run's experiment=, model= and corpus@calib= overrides, which writes "
                   f"{path}; or point pca_path (loki.evaluate, loki.bench) at an existing pca.safetensors.")
    try:
        with safe_open(str(path), "pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise fail(f"PCA file {path} is corrupt or not a safetensors file ({e}).", "delete it and rerun fit_pca.") from e
    try:
        meta = json.loads(raw_meta.get("loki", "{}"))
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise fail(f"{path} is not a Loki PCA file (format {meta.get('format')!r}, expected {FORMAT!r}).",
                   "point pca_path at a pca.safetensors written by fit_pca.")
    basis = Basis(tensors, meta, str(path))
    if model_info is not None:
        basis.check(model_info, str(path), allow_other_model)
    return basis


# ------------------------------------------------------------------------------------ fitting


def fit_incremental(chunks, num_layers: int, num_kv_heads: int, head_dim: int, center: bool = True,
                    n_jobs: int = 1, progress=None) -> dict[str, torch.Tensor]:
    """Stream ``chunks`` (each (L, KVH, N, D) for one side) through one IncrementalPCA per (layer, head).

    Chunks smaller than D are carried over and merged with the next one (IncrementalPCA needs at least
    D samples per batch). ``center=False`` fits the uncentered second moment by feeding ``[X; -X]``.
    Returns the tensors of one side (without the side prefix).
    """
    import numpy as np
    from joblib import Parallel, delayed
    from sklearn.decomposition import IncrementalPCA

    L, H, D = num_layers, num_kv_heads, head_dim
    models = [[IncrementalPCA(n_components=D) for _ in range(H)] for _ in range(L)]
    n_seen = 0
    carry = None

    def fit_layer(layer: int, X: np.ndarray) -> None:
        for h in range(H):
            x = X[layer, h]
            if not center:
                x = np.concatenate([x, -x], axis=0)
            models[layer][h].partial_fit(x)

    pool = Parallel(n_jobs=n_jobs, prefer="threads") if n_jobs and n_jobs > 1 else None
    for chunk in chunks:
        if tuple(chunk.shape[:2]) != (L, H) or chunk.shape[-1] != D:
            raise fail(f"key chunk of shape {tuple(chunk.shape)} does not match (layers={L}, kv_heads={H}, N, head_dim={D}).",
                       "the key shards come from another model: rerun extract_keys.")
        if carry is not None:
            chunk = torch.cat([carry, chunk], dim=2)
            carry = None
        if chunk.shape[2] < D:
            carry = chunk
            continue
        X = chunk.double().numpy()
        if pool is not None:
            pool(delayed(fit_layer)(layer, X) for layer in range(L))
        else:
            for layer in range(L):
                fit_layer(layer, X)
        n_seen += chunk.shape[2]
        if progress is not None:
            progress.update(chunk.shape[2])
    if n_seen == 0:
        raise fail(f"too few keys to fit a PCA: need at least head_dim={D} tokens, got {0 if carry is None else carry.shape[2]}.",
                   "extract more tokens (extract.num_tokens).")
    out = {
        "components": torch.zeros(L, H, D, D, dtype=torch.float32),
        "mean": torch.zeros(L, H, D, dtype=torch.float32),
        "explained_variance": torch.zeros(L, H, D, dtype=torch.float64),
        "explained_variance_ratio": torch.zeros(L, H, D, dtype=torch.float64),
        "n_samples": torch.full((L, H), n_seen, dtype=torch.int64),
    }
    for layer in range(L):
        for h in range(H):
            m = models[layer][h]
            out["components"][layer, h] = torch.from_numpy(m.components_.T.copy()).float()
            out["mean"][layer, h] = torch.from_numpy(m.mean_).float() if center else 0.0
            ev = torch.from_numpy(m.explained_variance_.copy())
            out["explained_variance"][layer, h] = ev
            out["explained_variance_ratio"][layer, h] = ev / ev.sum().clamp_min(1e-30)
    out["dropped_tokens"] = torch.tensor([0 if carry is None else carry.shape[2]], dtype=torch.int64)
    return out


def rank_at(evr: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Rank needed to reach ``threshold`` explained variance, over the last dim."""
    return ((evr.double().cumsum(-1) < threshold - 1e-9).sum(-1) + 1).clamp(max=evr.shape[-1])
