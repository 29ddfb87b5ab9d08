"""Loki: rotate q and k into a PCA basis of the keys, score with the first d dims, keep the top k,
exact attention over those (Singhania et al., NeurIPS 2024).

The basis is applied to the post-RoPE q and k that the attention layer (and a KV cache) holds:
``rope=post`` uses the basis fitted on post-RoPE keys, ``rope=pre`` the one fitted on pre-RoPE keys.
Because each basis is orthonormal, q'.k' over all D dims equals q.k: with d = D, Loki selects exactly
what exact top-k selects.
"""

from __future__ import annotations

import torch

from loki.common import fail
from loki.methods.base import (Method, acc, dense_attention, forced_mask, group_reduce,
                               kept_attention, select_topk, token_budget, validate_budget)
from loki.methods.exact_topk import SELECTION_OPTIONS, is_dense_here


def online_basis(k: torch.Tensor) -> torch.Tensor:
    """PCA basis of the keys at hand (uncentered), (B, KVH, D, D), columns by decreasing variance."""
    k = k.double()
    cov = k.transpose(-1, -2) @ k
    _, vecs = torch.linalg.eigh(cov)  # ascending
    return vecs.flip(-1)


def online_row_bases(k: torch.Tensor, visible: torch.Tensor, every: int, dims: int | None = None) -> torch.Tensor:
    """Causal online bases: for each query row, the uncentred PCA of the sequence's keys it can see, refitted every
    ``every`` keys.  (B, KVH, T, D, dims) float64 (dims: default D), columns by decreasing variance.

    A row that sees n keys of its sequence (padding excluded; masks causal, as in prefill and decode) uses the fit
    of the sequence's first m keys, m = n while n <= every, else every * floor(n / every): never a key the row
    cannot see, and a decoder refitting its cache's PCA every ``every`` tokens computes the same basis.  With every
    = 1 each row has its own fit (one eigendecomposition per row: slow in long prefills)."""
    B, KVH, S, D = k.shape
    T = visible.shape[-2]
    vis = visible.expand(B, 1, T, S)[:, 0]  # (B, T, S)
    ok = vis.any(1)  # (B, S): the sequence's keys (not padding)
    n_row = (vis & ok[:, None]).sum(-1)  # (B, T) keys each row sees
    dims = D if dims is None else int(dims)
    out = torch.empty(B, KVH, T, D, dims, dtype=torch.float64, device=k.device)
    R = max(1, int(every))
    for b in range(B):
        kb = k[b][:, ok[b]].double()  # (KVH, n, D): the sequence's keys in order
        n = kb.shape[1]
        if n == 0:
            out[b] = torch.eye(D, dtype=torch.float64, device=k.device)[:, :dims]
            continue
        first = min(R, n)  # fits over the first 1..first keys: one per count
        outer = kb[:, :first, :, None] * kb[:, :first, None, :]  # (KVH, first, D, D)
        covs = [outer.cumsum(1)]
        blocks = n // R
        if blocks > 1:  # then every R keys: counts 2R, 3R, ...
            kbl = kb[:, :blocks * R].view(KVH, blocks, R, D)
            covs.append((kbl.transpose(-1, -2) @ kbl).cumsum(1)[:, 1:])
        cov = torch.cat(covs, 1)  # (KVH, F, D, D): fit i covers the first i + 1 keys (i < first), then (i - first + 2) * R
        _, vecs = torch.linalg.eigh(cov)
        vecs = vecs.flip(-1)[..., :dims]
        nr = n_row[b].clamp(min=1)
        fit = torch.where(nr <= R, nr - 1, R - 1 + torch.div(nr, R, rounding_mode="floor") - 1)
        out[b] = vecs[:, fit.clamp(max=vecs.shape[1] - 1)]
    return out


class Loki(Method):
    name = "loki"
    options = {
        "d": 16,               # int >= 1: dims; float in (0, 1): fraction of the head dim (rounded, >= 1 dim)
        "d_variance": None,    # float in (0, 1]: per (layer, KV head) d reaching this explained variance
        **SELECTION_OPTIONS,
        "rope": "post",        # which basis: fitted on post-RoPE (default) or pre-RoPE keys
        "basis": "offline",    # offline (pca_path) | online (fitted on the keys each row sees)
        "online_every": 16,    # basis=online: refit every N keys (1: every row its own fit)
        "selection": "head",   # head: top-k per query head (paper) | group: one set per KV group
        "group_reduce": "max",  # how group selection combines the heads' scores: max | sum | mean
        "slab_dtype": None,    # None | "fp8": score against the rotated keys' first d dims rounded to e4m3
    }

    def validate(self):
        validate_budget(self.name, self.k, self.k_mode)
        if self.selection not in ("head", "group"):
            raise fail(f"loki: selection must be head or group, got {self.selection!r}.", "set method.selection.")
        if self.group_reduce not in ("max", "sum", "mean"):
            raise fail(f"loki: unknown group_reduce {self.group_reduce!r}.", "use max, sum or mean.")
        slab = getattr(self, "slab_dtype", None)  # (loki_h2o reuses this without the option)
        if isinstance(slab, str) and slab.lower() in ("none", "null", ""):  # Hydra reads `None` as a string
            raise fail(f"loki: slab_dtype={slab!r} is a string, not null.",
                       "write method.slab_dtype=null (Hydra's spelling of None) for the full-precision slab, or fp8.")
        if slab not in (None, "fp8"):
            raise fail(f"loki: unknown slab_dtype {slab!r}.", "use method.slab_dtype=null or fp8.")
        if slab == "fp8" and self.basis == "online":
            raise fail("loki: slab_dtype=fp8 models the kernels' rotated-key slab, which needs one fixed basis; "
                       "basis=online fits one per row.", "use method.basis=offline with slab_dtype=fp8.")
        self.validate_basis()

    def validate_basis(self):
        """The options of the d-dim approximate scores (shared with pca_attn and loki_h2o)."""
        if self.rope not in ("pre", "post"):
            raise fail(f"loki: rope must be 'pre' or 'post', got {self.rope!r}.", "set method.rope=post or pre.")
        if self.basis not in ("offline", "online"):
            raise fail(f"loki: basis must be offline or online, got {self.basis!r}.", "set method.basis.")
        every = self.online_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise fail(f"{self.name}: online_every must be a whole number of keys >= 1, got {every!r}.",
                       "e.g. method.online_every=16 (1 refits the online basis for every row).")
        dv = self.d_variance
        if dv is not None and (isinstance(dv, bool) or not isinstance(dv, (int, float)) or not 0 < dv <= 1):
            raise fail(f"{self.name}: d_variance must be a number in (0, 1], got {dv!r}.",
                       "e.g. method.d_variance=0.9 (or null for a fixed method.d).")
        d = self.d
        # an int counts dims, a float is a fraction of the head dim; a float >= 1 is refused: 1.0 could mean one dim
        # or the whole head dim, and the report reads d < 1 as a fraction, d >= 1 as dims
        if dv is None and (d is None or isinstance(d, bool) or not isinstance(d, (int, float)) or d <= 0
                           or (isinstance(d, float) and d >= 1)):
            raise fail(f"{self.name}: d must be an int >= 1 (dims) or a float in (0, 1) (a fraction of the head dim), "
                       f"got {d!r}.", "write dims as an int (method.d=16; the whole head dim is method.d=<head dim>) "
                       "and a fraction as a float below 1 (method.d=0.25).")

    def bind(self, model):
        super().bind(model)
        D = self.model_info["head_dim"]
        d = self.d
        if self.d_variance is None:
            dims = int(round(d * D)) if isinstance(d, float) else d
            if dims > D:
                raise fail(f"{self.name}: d={dims} is larger than the head dim {D} of this model.",
                           f"set method.d to at most {D} (or a fraction such as 0.25).")
            if dims < 1:
                raise fail(f"{self.name}: d={d} of the head dim {D} rounds to 0 dims.",
                           f"set method.d to a fraction >= 1/{D} = {1 / D:.3g}, or to a number of dims >= 1.")
            self.dims = dims
        self.basis_obj = None
        if self.basis == "offline":
            basis = self.resources.get("basis")
            allow = self.resources.get("allow_foreign_basis", False)  # the config's opt-in (evaluate, bench)
            if basis is None:
                from loki.pca import load_basis

                path = self.resources.get("pca_path")
                if not path:
                    raise fail("loki with basis=offline needs a PCA file.", "set pca_path (run the fit_pca stage) or method.basis=online.")
                basis = load_basis(path, self.model_info, allow)
            basis.check(self.model_info, self.resources.get("pca_path", "<basis>"), allow)
            self.basis_obj = basis
            self.P = basis.components(self.rope)  # (L, KVH, D, D)
            if self.d_variance is not None:
                self.dim_counts = basis.dims_for_variance(self.rope, float(self.d_variance))  # (L, KVH)
        elif self.d_variance is not None:
            raise fail("loki: d_variance needs an offline basis (its explained variance).", "use basis=offline or a fixed d.")
        self._dim_mask_cache = {}

    def _dim_mask(self, layer: int, D: int, device) -> torch.Tensor | None:
        """(KVH, D) 0/1 mask of the scored dims, for per-(layer, head) d; None for a fixed d."""
        if self.d_variance is None:
            return None
        key = (layer, str(device))
        if key not in self._dim_mask_cache:
            counts = self.dim_counts[layer].to(device)
            self._dim_mask_cache[key] = (torch.arange(D, device=device)[None, :] < counts[:, None]).float()
        return self._dim_mask_cache[key]

    def approx_scores(self, module, q, k, scaling, visible=None) -> torch.Tensor:
        """Scores of every query head against every key from the first d rotated dims, (B, H, T, S) fp32.

        With ``basis=online`` and ``visible`` given, each row's basis is fitted causally on the keys it can see
        (``online_row_bases``); without ``visible``, one basis of all the keys at hand."""
        B, H, T, D = q.shape
        KVH = k.shape[1]
        g = H // KVH
        layer = module.layer_idx
        if self.basis == "online" and visible is not None:
            Pd = online_row_bases(k, visible, self.online_every, self.dims).to(acc(q).dtype)  # (B, KVH, T, D, d)
            qf = acc(q).view(B, KVH, g, T, 1, D)
            # q P_d P_d^T . k = q'[:d] . k'[:d] with the row's own basis
            qproj = ((qf @ Pd.unsqueeze(2)) @ Pd.unsqueeze(2).transpose(-1, -2)).squeeze(-2)  # (B, KVH, g, T, D)
            s = torch.matmul(qproj, acc(k).unsqueeze(2).transpose(-1, -2)) * scaling
            return s.view(B, H, T, -1)
        if self.basis == "online":
            P = online_basis(k)  # (B, KVH, D, D)
        else:
            P = self.P[layer].to(q.device)[None]  # (1, KVH, D, D)
        P = P.to(acc(q).dtype)
        qf = acc(q).view(B, KVH, g, T, D)
        qr = torch.matmul(qf, P.unsqueeze(2))  # (B, KVH, g, T, D)
        kr = torch.matmul(acc(k), P)  # (B, KVH, S, D)
        mask = self._dim_mask(layer, D, q.device)
        if mask is None:
            qr, kr = qr[..., : self.dims], kr[..., : self.dims]
        else:
            qr = qr * mask.to(qr.dtype)[None, :, None, None, :]
        if getattr(self, "slab_dtype", None) == "fp8":
            # the kernels' opt-in fp8 scoring slab (kernels.kv_cache.allocate_cache_rows(slab_dtype=)): the scored key
            # dims rounded to e4m3 (saturating at +-448, as the kernels' writers), q' kept in full precision
            kr = kr.to(torch.float8_e4m3fn).to(kr.dtype)
        s = torch.matmul(qr, kr.unsqueeze(2).transpose(-1, -2)) * scaling  # (B, KVH, g, T, S)
        return s.view(B, H, T, -1)

    def attend(self, module, q, k, v, visible, scaling):
        if is_dense_here(self, module, q):
            self.record(None, visible, q.shape[1], kv_heads=k.shape[1])
            return dense_attention(q, k, v, visible, scaling)
        approx = self.approx_scores(module, q, k, scaling, visible)
        budget = token_budget(visible, self.k, self.k_mode)
        forced = forced_mask(visible, self.sink_tokens, self.local_window)
        g = q.shape[1] // k.shape[1]
        if self.selection == "group" and g > 1:
            keep = select_topk(group_reduce(approx, g, self.group_reduce), visible, budget, forced)
            keep = keep.repeat_interleave(g, dim=1)
        else:
            keep = select_topk(approx, visible, budget, forced)
        self.last_selection = keep
        self.record(keep, visible, q.shape[1], kv_heads=k.shape[1])
        return kept_attention(q, k, v, keep, scaling)
