"""Corpora through `datasets` (the `text` builder for local files, hub names otherwise) -> token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loki.common import fail


def load_text(corpus_cfg: Any) -> str:
    """The whole corpus as one string."""
    import datasets

    datasets.disable_progress_bars()
    name = corpus_cfg.name
    path = corpus_cfg.get("path")
    if path:
        p = Path(path)
        if not p.exists():
            if corpus_cfg.get("source") and (p.parent.name, p.name) == ("corpora", f"{name}.txt"):  # embedded, not made
                hint = (f"run `snakemake --cores 2 {p}` (or `python -m loki.prepare prepare_target=data "
                        f"corpus@data={name}`)")
            else:
                hint = ("point data.path (the evaluation corpus) or calib.path (the calibration corpus) at an existing "
                        "text file")
            raise fail(f"corpus '{name}': file {p} does not exist.", hint + ".")
        ds = datasets.load_dataset("text", data_files=str(p), split="train", sample_by="document")
        text = "\n\n".join(ds["text"]).replace("\r\n", "\n")
    elif corpus_cfg.get("hf_dataset"):
        try:
            ds = datasets.load_dataset(corpus_cfg.hf_dataset, corpus_cfg.get("hf_config") or None,
                                       split=corpus_cfg.get("split") or "train")
        except Exception as e:  # datasets raises many types for offline / missing
            raise fail(f"corpus '{name}': could not load hub dataset {corpus_cfg.hf_dataset} ({type(e).__name__}: {e}).",
                       "this needs internet access; or download it once and set data.path (or calib.path) to a local text "
                       "file.") from e
        col = corpus_cfg.get("text_column") or "text"
        max_rows = corpus_cfg.get("max_rows")
        if max_rows:
            ds = ds.select(range(min(int(max_rows), len(ds))))
        text = str(corpus_cfg.get("join", "\n\n")).join(ds[col])
    else:
        raise fail(f"corpus '{name}' has neither path nor hf_dataset.", "set data.path / calib.path, or data.hf_dataset / calib.hf_dataset.")
    if not text.strip():
        raise fail(f"corpus '{name}' is empty.", "point it at a file or dataset with text in it.")
    return text


def load_tokens(corpus_cfg: Any, tokenizer, max_tokens: int | None = None):
    """Token ids of the corpus as a 1-D LongTensor (BOS once at the start when the tokenizer has one)."""
    import torch

    text = load_text(corpus_cfg)
    if max_tokens:  # avoid tokenizing megabytes when a few thousand tokens are asked for
        text = text[: max(int(max_tokens) * 12, 10_000)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens, window: int, num_windows: int | None, what: str):
    """Non-overlapping windows [n, window]; error if the corpus is too short."""
    n = tokens.numel() // window
    if n == 0:
        raise fail(f"{what}: the corpus has {tokens.numel()} tokens, fewer than one window of {window}.",
                   "use a longer corpus or a smaller window.")
    if num_windows:
        if num_windows > n:
            raise fail(f"{what}: asked for {num_windows} windows of {window} tokens, the corpus has only {n}.",
                       "lower the number of windows or the window length, or use a longer corpus.")
        n = int(num_windows)
    return tokens[: n * window].view(n, window)
