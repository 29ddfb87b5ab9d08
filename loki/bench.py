"""Stage: decode latency of Loki in real generation (time per output token, tokens/s, prefill, attention share,
cache bytes) for dense (SDPA, static cache), dense flash-decoding and Loki at the configured (d, k).

    python -m loki.bench                          # conf/bench/cpu.yaml: the embedded model, small sizes
    python -m loki.bench bench=h200               # Llama-3-8B shape, random bf16 weights, batch {1,16} x {4K,16K,32K}
    python -m loki.bench bench=h200 bench.loki.d=0.125 bench.loki.k=0.0625
    python -m loki.bench method=loki method.d=16 method.k=0.25   # the method config replaces bench.loki

(Before ``bench`` is in conf/config.yaml's defaults, write ``+bench=h200``.) Table on stdout, rows in
``${results_dir}/bench/decode.json`` (or ``bench.out``), a W&B run (job_type bench). The work is done by
:mod:`loki.bench_core`, which also runs without Hydra (on machines without it).
"""

from __future__ import annotations

from pathlib import Path

from loki.app import stage
from loki.common import CONF_DIR, LokiError, fail, git_commit, resolve_device, write_json


def bench_config(cfg) -> dict:
    from omegaconf import OmegaConf

    b = cfg.get("bench")
    if b is None:  # `bench` not in the defaults list: the CPU config
        b = OmegaConf.load(CONF_DIR / "bench" / "cpu.yaml")
    return OmegaConf.to_container(b, resolve=True)


def loki_opts(cfg, bench: dict) -> dict:
    from omegaconf import OmegaConf

    from loki.bench_core import loki_options

    if cfg.method.name == "loki":
        opts = OmegaConf.to_container(cfg.method, resolve=True)
        opts.pop("name", None)
        return opts
    return loki_options(bench)


def build_model(cfg, bench: dict, device: str):
    import torch

    from loki.bench_core import random_llama
    from loki.modeling import load_model

    src = bench.get("model_source", "config")
    if src == "random_llama":
        return random_llama(dict(bench["random_llama"]), getattr(torch, bench.get("dtype", "bfloat16")), device,
                            seed=int(bench.get("seed", 0))), "random_llama"
    if src == "config":
        return load_model(cfg.model, device=device, attn_implementation="sdpa", dtype=bench.get("dtype")), cfg.model.name
    raise fail(f"bench.model_source={src!r} is not known.", "use random_llama or config.")


@stage
def main(cfg) -> None:
    import torch

    from loki.bench_core import run_bench, table
    from loki.tracking import wandb_run

    bench = bench_config(cfg)
    want = bench.get("device") or cfg.device
    if str(want).startswith("cuda") and not torch.cuda.is_available():
        raise fail(f"bench '{bench.get('name')}' wants a GPU but CUDA is not available here.",
                   "run it on a GPU machine, or use bench=cpu.")
    device = resolve_device(want, "bench.device" if bench.get("device") else "device")
    out = Path(bench.get("out") or Path(cfg.results_dir) / "bench" / "decode.json")
    opts = loki_opts(cfg, bench)
    name = f"bench-{bench.get('name', 'decode')}"
    with wandb_run(cfg, "bench", name=name, extra_config={f"bench.loki.{k}": v for k, v in opts.items()}) as run:
        model, model_name = build_model(cfg, bench, device)
        pca = cfg.get("pca_path") if model_name != "random_llama" else None  # a random model has no PCA file
        try:
            rows = run_bench(model, bench, opts, device, pca_path=pca,
                             allow_foreign_basis=bool(cfg.get("allow_foreign_basis", False)))
        except LokiError as e:  # Loki's checks name its options method.*; here they come from bench.loki.*
            if cfg.method.name == "loki":
                raise
            raise LokiError(str(e).replace("method.", "bench.loki.")) from e
        for r in rows:
            r["model"] = model_name
            r["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        write_json(out, rows)
        if run is not None:
            import wandb

            cols = sorted({k for r in rows for k in r})
            run.log({"decode": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
            for r in rows:
                if r["method"] == "loki" and r.get("speedup") is not None:
                    run.summary[f"speedup/b{r['batch']}_ctx{r['context']}"] = r["speedup"]
            run.summary["git_commit"] = git_commit()
    print(table(rows))
    print(f"[bench] {len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
