"""Stage 3: evaluate one attention method at one setting with one eval (``conf/eval/``, ``loki/evals/``).

Writes ``metrics.json`` into the job's output folder (``hydra.run.dir``, set by the Snakemake rule).

    python -m loki.evaluate method=loki method.d=16 method.k=0.25
    python -m loki.evaluate -m method=loki method.d=8,16,32 method.k=0.125,0.25,0.5
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loki.app import output_dir, stage
from loki.common import fail, git_commit, write_json


def build_model_and_method(cfg):
    from loki.attention import attach
    from loki.common import resolve_device
    from loki.methods import build_method

    from loki.modeling import load_model

    device = resolve_device(cfg.device)
    allow = cfg.get("allow_foreign_basis", False)
    if not isinstance(allow, bool):
        raise fail(f"allow_foreign_basis must be true or false, got {allow!r}.",
                   "set allow_foreign_basis=true only to use a PCA basis fitted for another model of the same shapes.")
    method = build_method(cfg.method, pca_path=cfg.get("pca_path"), allow_foreign_basis=allow)
    model = load_model(cfg.model, device=device, attn_implementation="sdpa")
    attach(model, method)
    return model, method, device


def _overridden(key: str) -> bool:
    """Whether ``key`` was set on the command line (Hydra's task overrides); False outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in HydraConfig.get().overrides.task)


def apply_decode_only(cfg) -> None:
    """A ``decode_only`` eval prefills densely: set the method's ``sparse_prefill`` to false in ``cfg`` itself, so
    metrics.json records what ran; an explicit ``method.sparse_prefill=true`` contradicts the eval and is refused."""
    from omegaconf import open_dict

    if not cfg.eval.get("decode_only") or "sparse_prefill" not in cfg.method or not cfg.method.sparse_prefill:
        return
    if _overridden("method.sparse_prefill"):
        raise fail(f"eval={cfg.eval.name} is decode_only (the prompt is prefilled densely), but "
                   "method.sparse_prefill=true asks for a sparse prompt.",
                   f"drop method.sparse_prefill=true, or use the eval without decode_only (e.g. "
                   f"eval={cfg.eval.name.removesuffix('_decode')}, or eval.decode_only=false).")
    with open_dict(cfg):
        cfg.method.sparse_prefill = False


def run_eval(cfg) -> dict:
    """Build the model with the configured method attached, run the configured eval, add provenance."""
    from omegaconf import OmegaConf

    from loki.evals import get_eval

    eval_fn = get_eval(cfg.eval.name)
    if "window" in cfg.eval:
        from loki.evals.perplexity import check_windows

        check_windows(cfg.eval)
    apply_decode_only(cfg)
    model, method, device = build_model_and_method(cfg)
    t0 = time.time()
    res = eval_fn(cfg, model, method, device)
    if method.name != "dense" and method.calls == 0:
        raise fail(f"method '{method.name}' never ran (attention fell back to another implementation).",
                   "report this as a bug: the model's attention does not dispatch through transformers' AttentionInterface.")
    opts = OmegaConf.to_container(cfg.method, resolve=True)
    return {
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "corpus": cfg.data.name,
        "eval": cfg.eval.name,
        "method": method.name,
        "options": {k: v for k, v in opts.items() if k != "name"},
        "d": scored_dims(method, opts.get("d")),
        # what the report's byte ratio needs: head dim and query heads per KV head (GQA)
        "model_shape": {key: method.model_info[key] for key in ("head_dim", "num_heads", "num_kv_heads")},
        "k": opts.get("k"),
        **res,
        "attention_calls": method.calls,
        # the model the PCA basis was fitted for: another model than "model" only with allow_foreign_basis=true
        "basis_model": basis.model_name if (basis := getattr(method, "basis_obj", None)) is not None else None,
        "seconds": round(time.time() - t0, 2),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def scored_dims(method, d):
    """The ``d`` a result records: the PCA dims the method scored (a fraction of the head dim resolved to dims; with
    ``d_variance``, the mean over layers and KV heads, since each has its own d), else the option as given."""
    if d is None:  # (a method without a d option, e.g. sparq's r)
        return None
    counts = getattr(method, "dim_counts", None)
    if getattr(method, "d_variance", None) is not None and counts is not None:
        return round(float(counts.float().mean()), 2)
    return getattr(method, "dims", None) or d


def run_tag(cfg) -> str:
    """The point's name: the method, its d and k, then every option that differs from conf/method/<method>.yaml
    (``loki-d16-k0.25-rope_pre``), so multirun points that differ in another option get their own W&B names.  A
    decode_only eval's sparse_prefill=false is not named (the eval sets it)."""
    import re

    from omegaconf import OmegaConf

    from loki.common import changed_options, method_defaults

    opts = OmegaConf.to_container(cfg.method, resolve=True)
    name = opts.pop("name")
    parts = [name] + [f"{k}{opts[k]}" for k in ("d", "k") if k in opts]
    parts += [f"{k}_{opts[k]}" for k in changed_options(opts, method_defaults(name) or {},
                                                         bool(cfg.eval.get("decode_only")))]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def wandb_name(cfg, out: Path, tag: str) -> str:
    """The W&B run's name: the eval and the point.  Under Snakemake (``.../evaluate/<eval>/<point>``) the point is the
    rule's folder, which names every grid option (runs of one (d, k) with other options stay apart); else the
    method with its d and k."""
    if out.parent.name == cfg.eval.name and out.parent.parent.name == "evaluate":
        return f"evaluate-{cfg.eval.name}-{out.name}"
    return f"evaluate-{cfg.eval.name}-{tag}"


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    out = output_dir()
    apply_decode_only(cfg)  # before W&B records the config
    tag = run_tag(cfg)
    with wandb_run(cfg, "evaluate", name=wandb_name(cfg, out, tag)) as run:
        metrics = run_eval(cfg)
        write_json(out / "metrics.json", metrics)
        if run is not None:
            run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    headline = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("ppl", "accuracy", "recall") if k in metrics)
    print(f"[evaluate] {tag} {metrics['eval']} on {metrics['corpus']}: {headline} -> {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
