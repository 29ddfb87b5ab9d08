"""Loading a causal LM (embedded folder, any local folder, or any Hugging Face id) and describing it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from loki.common import fail

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise fail(f"unknown dtype '{name}'.", f"use one of {sorted(set(DTYPES))}.")
    return getattr(torch, DTYPES[name])


def model_source(model_cfg: Any) -> tuple[str, dict]:
    """Where to load the model from: a local folder (``path``) or a hub id (``id``)."""
    path = model_cfg.get("path")
    if path:
        p = Path(path)
        if not (p / "config.json").exists():
            if model_cfg.get("source") and (p.parent.name, p.name) == ("models", str(model_cfg.name)):  # not made yet
                hint = (f"run `snakemake --cores 2 {p / 'loki_resource.json'}` (or `python -m loki.prepare "
                        f"prepare_target=model model={model_cfg.name}`)")
            else:
                hint = "point model.path at a transformers model folder, or set model.id (a hub id) and model.path=null"
            raise fail(f"model '{model_cfg.name}': no transformers model folder at {p} (config.json missing).", hint + ".")
        return str(p), {}
    if model_cfg.get("id"):
        return str(model_cfg.id), {"revision": model_cfg.get("revision") or None}
    raise fail(f"model '{model_cfg.name}' has neither path nor id.", "set model.path (a local folder) or model.id (a hub id).")


def _load_errors() -> tuple:
    """What a missing, unreachable, damaged or truncated model / tokenizer file raises while loading: OSError (not
    found, no internet), ValueError (JSON, a bad header: json.JSONDecodeError is one) and safetensors' own error."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def _load_failed(what: str, model_cfg: Any, src: str, e: Exception):
    local = bool(model_cfg.get("path"))
    if local and model_cfg.get("source"):
        fix = (f"if a file in {src} is damaged or truncated, delete the folder and prepare it again (`python -m "
               f"loki.prepare prepare_target=model model={model_cfg.name}`, or `make run`)")
    elif local:
        fix = f"if a file in {src} is damaged or truncated, copy or download the model there again; else check model.path"
    else:
        fix = ("check model.id; hub ids need internet access (or a local copy in model.path), and a damaged download "
               "in the hub cache (HF_HOME) is fixed by deleting it")
    return fail(f"could not load {what} of '{model_cfg.name}' from {src}: {type(e).__name__}: {e}", fix + ".")


def load_tokenizer(model_cfg: Any):
    from transformers import AutoTokenizer

    src, kw = model_source(model_cfg)
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=bool(model_cfg.get("trust_remote_code", False)), **kw)
    except _load_errors() as e:
        raise _load_failed("the tokenizer", model_cfg, src, e) from e


def load_model(model_cfg: Any, device: str = "cpu", attn_implementation: str = "sdpa", dtype: str | None = None):
    """Load a causal LM for inference. ``attn_implementation`` may be one of ours (see loki.attention)."""
    from transformers import AutoModelForCausalLM

    import loki.attention  # noqa: F401  -- registers our attention implementations

    src, kw = model_source(model_cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src,
            dtype=torch_dtype(dtype or model_cfg.get("dtype", "float32")),
            attn_implementation=attn_implementation,
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            **kw,
        )
    except _load_errors() as e:
        raise _load_failed("the model", model_cfg, src, e) from e
    model.eval().to(device)
    model.requires_grad_(False)
    model.loki_model_name = str(model_cfg.name)  # what fingerprint() records and PCA files / key shards are checked by
    return model


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fingerprint(model_or_config: Any, name: str | None = None) -> dict:
    """What a key shard or a PCA basis must agree on with the model it is used with."""
    config = getattr(model_or_config, "config", model_or_config)
    name = name or getattr(model_or_config, "loki_model_name", None)  # the config's model.name (load_model)
    c = text_config(config)
    num_heads = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // num_heads)
    return {
        "name": name or str(getattr(config, "_name_or_path", "") or ""),
        "model_type": str(getattr(c, "model_type", "")),
        "num_layers": int(c.num_hidden_layers),
        "num_heads": num_heads,
        "num_kv_heads": int(getattr(c, "num_key_value_heads", None) or num_heads),
        "head_dim": head_dim,
        "hidden_size": int(c.hidden_size),
        "vocab_size": int(c.vocab_size),
    }


_SHAPE_KEYS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")


def check_fingerprint(expected: dict, got: dict, what: str, path: str, fix: str, allow_other_model: bool = False,
                      opt_in: str = "") -> None:
    """Refuse a file (PCA basis, key manifest) made for another model: other shapes always; the same shapes under
    another model name unless ``allow_other_model`` (the config key ``opt_in``, named in the message)."""
    diffs = [f"{k}: file has {expected.get(k)!r}, model has {got.get(k)!r}" for k in _SHAPE_KEYS
             if k in expected and expected.get(k) != got.get(k)]
    if diffs:
        raise fail(f"{what} {path} was made for model '{expected.get('name')}', not for '{got.get('name')}' ("
                   + "; ".join(diffs) + ").", fix)
    if not expected:
        # no fingerprint: a file written by hand or by another tool (fit_pca always writes one). Its tensor shapes are
        # still checked against the model by the caller, and there is no name to compare, so it is said, not refused
        warnings.warn(f"{what} {path} records no model fingerprint: it cannot be checked against "
                      f"'{got.get('name')}' beyond its tensor shapes.", stacklevel=2)
    elif expected.get("name") and got.get("name") and expected["name"] != got["name"] and not allow_other_model:
        # same shapes, another model: numbers that look fine and are wrong, unless meant (a base model's basis on its
        # instruct variant), which the opt-in says and the results record
        hint = (f" If it is meant (e.g. a base model's basis on its instruct variant), set {opt_in}=true."
                if opt_in else "")
        raise fail(f"{what} {path} was made for model '{expected['name']}', this model is '{got['name']}' (same "
                   f"shapes, another model).", fix + hint)


def attention_modules(model) -> list:
    """The self-attention modules, in layer order (anything with q/k/v projections and a layer index)."""
    mods = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "layer_idx")]
    return sorted(mods, key=lambda m: m.layer_idx)


def max_positions(model) -> int | None:
    c = text_config(model.config)
    return getattr(c, "max_position_embeddings", None)
