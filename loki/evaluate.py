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


def run_eval(cfg) -> dict:
    """Build the model with the configured method attached, run the configured eval, add provenance."""
    from omegaconf import OmegaConf

    from loki.evals import get_eval

    eval_fn = get_eval(cfg.eval.name)
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
        "d": opts.get("d"),
        "k": opts.get("k"),
        **res,
        "attention_calls": method.calls,
        # the model the PCA basis was fitted for: another model than "model" only with allow_foreign_basis=true
        "basis_model": basis.model_name if (basis := getattr(method, "basis_obj", None)) is not None else None,
        "seconds": round(time.time() - t0, 2),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def run_tag(cfg) -> str:
    from omegaconf import OmegaConf

    opts = OmegaConf.to_container(cfg.method, resolve=True)
    return "-".join([opts.pop("name")] + [f"{k}{v}" for k, v in sorted(opts.items()) if k in ("d", "k")])


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
