"""Stage 3: evaluate one attention method at one setting (perplexity on non-overlapping windows).

NLL is summed over tokens and divided by the token count (token-weighted, not window-weighted).
Writes ``metrics.json`` into the job's output folder (``hydra.run.dir``, set by the Snakemake rule).

    python -m loki.evaluate method=loki method.d=16 method.k=0.25
    python -m loki.evaluate -m method=loki method.d=8,16,32 method.k=0.125,0.25,0.5
"""

from __future__ import annotations

import math
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
    method = build_method(cfg.method, pca_path=cfg.get("pca_path"))
    model = load_model(cfg.model, device=device, attn_implementation="sdpa")
    attach(model, method)
    return model, method, device


def perplexity(model, seqs: torch.Tensor, device: str, batch_size: int = 1, progress: bool = True) -> dict:
    from tqdm import tqdm

    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in tqdm(range(0, seqs.shape[0], batch_size), desc="perplexity", disable=not progress):
            x = seqs[i: i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            tgt = x[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     reduction="sum").item()
            count += tgt.numel()
    return {"nll": nll / count, "ppl": math.exp(nll / count), "tokens": count}


def run_eval(cfg) -> dict:
    from omegaconf import OmegaConf

    from loki.data import load_tokens, windows
    from loki.modeling import load_tokenizer, max_positions

    ev = cfg.eval
    if ev.name != "perplexity":
        raise fail(f"unknown eval '{ev.name}'.", "use eval=perplexity.")
    model, method, device = build_model_and_method(cfg)
    limit = max_positions(model)
    if limit and int(ev.window) > limit:
        raise fail(f"eval.window={ev.window} is above the model's limit of {limit} positions.", f"use eval.window <= {limit}.")
    tok = load_tokenizer(cfg.model)
    n_tok = int(ev.window) * int(ev.num_windows) if ev.num_windows else None
    seqs = windows(load_tokens(cfg.data, tok, max_tokens=n_tok), int(ev.window), ev.num_windows,
                   f"perplexity on corpus '{cfg.data.name}'")
    t0 = time.time()
    res = perplexity(model, seqs, device, int(ev.batch_size))
    if method.name != "dense" and method.calls == 0:
        raise fail(f"method '{method.name}' never ran (attention fell back to another implementation).",
                   "report this as a bug: the model's attention does not dispatch through transformers' AttentionInterface.")
    opts = OmegaConf.to_container(cfg.method, resolve=True)
    return {
        "experiment": cfg.experiment_name,
        "model": cfg.model.name,
        "corpus": cfg.data.name,
        "eval": ev.name,
        "method": method.name,
        "options": {k: v for k, v in opts.items() if k != "name"},
        "d": opts.get("d"),
        "k": opts.get("k"),
        "window": int(ev.window),
        "num_windows": int(seqs.shape[0]),
        **res,
        "attention_calls": method.calls,
        "seconds": round(time.time() - t0, 2),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def run_tag(cfg) -> str:
    from omegaconf import OmegaConf

    opts = OmegaConf.to_container(cfg.method, resolve=True)
    return "-".join([opts.pop("name")] + [f"{k}{v}" for k, v in sorted(opts.items()) if k in ("d", "k")])


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    out = output_dir()
    tag = run_tag(cfg)
    with wandb_run(cfg, "evaluate", name=f"evaluate-{tag}") as run:
        metrics = run_eval(cfg)
        write_json(out / "metrics.json", metrics)
        if run is not None:
            run.summary.update({k: metrics[k] for k in ("ppl", "nll", "tokens", "seconds")})
    print(f"[evaluate] {tag} on {metrics['corpus']}: ppl={metrics['ppl']:.3f} ({metrics['tokens']} tokens) -> {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
