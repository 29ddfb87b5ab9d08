"""Hydra configs for evals on the tiny random-weight model and a tiny local corpus (no download)."""

from __future__ import annotations

from loki.common import CONF_DIR


def compose_cfg(model_dir, corpus, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            f"model.path={model_dir}", "model.name=tiny", "model.source=null",
            "corpus@data=enwiki_sample", f"data.path={corpus}", "data.source=null", "data.name=tiny_corpus",
            "wandb.mode=disabled", "device=cpu", "threads=1", *overrides])


def run(model_dir, corpus, overrides):
    from loki.evaluate import run_eval

    return run_eval(compose_cfg(model_dir, corpus, overrides))
