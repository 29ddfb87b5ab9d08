"""Stage 1: run the model over a calibration corpus and write its keys as safetensors shards.

Keys per layer and KV head, pre- and post-RoPE, in fixed-size shards (``shard_00000.safetensors``:
tensors ``pre`` / ``post`` of shape (layers, kv_heads, tokens, head_dim)) with a ``manifest.json``.
Memory is bounded by one shard whatever the token count. Each shard is written under a temporary name
and renamed when complete, then listed in ``progress.json``; an interrupted run resumes after the last complete
shard. ``manifest.json`` (the stage's output for Snakemake) is written once, when every shard is done: Snakemake
deletes a failed job's declared outputs, so the progress must live in a file it does not know about.

    python -m loki.extract_keys model=smollm2-135m corpus@calib=lee_news extract.num_tokens=16384
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loki.app import stage
from loki.common import atomic_path, fail, read_json, sha256_file, write_json

FORMAT = "loki-keys/1"


def expected_manifest(cfg, model, fp: dict, total_tokens: int) -> dict:
    from omegaconf import OmegaConf

    ex = cfg.extract
    return {
        "format": FORMAT,
        "model": {**fp, "id": cfg.model.get("id"), "path": cfg.model.get("path"), "revision": cfg.model.get("revision"),
                  "dtype": str(cfg.model.get("dtype"))},
        "corpus": OmegaConf.to_container(cfg.calib, resolve=True),
        "seq_len": int(ex.seq_len),
        "shard_tokens": int(ex.shard_tokens),
        "num_tokens": total_tokens,
        "sides": list(ex.sides),
        "dtype": str(ex.dtype),
        "shards": [],
        "complete": False,
    }


def _job_diff(a: dict, b: dict) -> list[str]:
    """The settings in which two manifests' extractions differ (none: the same job): lengths and sides, the model
    (name, shapes, hub id, folder, revision, dtype) and the corpus (every field but how an embedded one is prepared,
    with its file compared as an absolute path), so that keys of another text or model are never reused."""

    def norm(v):
        return str(Path(v).resolve()) if isinstance(v, str) and v else v

    out = [k for k in ("format", "seq_len", "shard_tokens", "num_tokens", "sides", "dtype") if a.get(k) != b.get(k)]
    ma, mb = a.get("model") or {}, b.get("model") or {}
    out += [f"model.{k}" for k in ("name", "num_layers", "num_kv_heads", "head_dim", "id", "revision")
            if ma.get(k) != mb.get(k)]
    out += ["model.dtype"] if "dtype" in ma and "dtype" in mb and ma["dtype"] != mb["dtype"] else []  # (older: none)
    out += ["model.path"] if norm(ma.get("path")) != norm(mb.get("path")) else []
    ca, cb = a.get("corpus") or {}, b.get("corpus") or {}
    for k in sorted((set(ca) | set(cb)) - {"source"}):
        same = norm(ca.get(k)) == norm(cb.get(k)) if k == "path" else ca.get(k) == cb.get(k)
        out += [] if same else [f"corpus.{k}"]
    return out


# positive whole numbers, with the value to suggest (conf/extract/default.yaml)
_COUNTS = {"num_tokens": 16384, "seq_len": 1024, "shard_tokens": 8192, "batch_size": 1}


def check_settings(ex) -> None:
    """Refuse extraction settings that would crash (a division by zero) or silently do nothing, before any work."""
    for key, example in _COUNTS.items():
        v = ex.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 1:
            raise fail(f"extract.{key} must be a positive whole number, got {v!r}.", f"e.g. extract.{key}={example}.")
    sides = list(ex.sides) if ex.get("sides") is not None else []
    if not sides or any(s not in ("pre", "post") for s in sides):
        raise fail(f"extract.sides must be a non-empty subset of [pre, post], got {sides}.", "e.g. extract.sides=[pre,post].")
    if int(ex.shard_tokens) % int(ex.seq_len):
        raise fail(f"extract.shard_tokens={ex.shard_tokens} is not a multiple of extract.seq_len={ex.seq_len}.",
                   "pick shard_tokens = n * seq_len so shards hold whole sequences.")


def extract(cfg, out_dir: Path, progress: bool = True) -> dict:
    from tqdm import tqdm

    from loki.attention import attach
    from loki.capture import KeyCapture
    from loki.common import resolve_device
    from loki.data import load_tokens, windows
    from loki.modeling import fingerprint, load_model, load_tokenizer, max_positions, torch_dtype

    ex = cfg.extract
    check_settings(ex)
    seq_len, shard_tokens = int(ex.seq_len), int(ex.shard_tokens)
    sides = tuple(ex.sides)
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device=device, attn_implementation="sdpa")
    fp = fingerprint(model, cfg.model.name)
    limit = max_positions(model)
    if limit and seq_len > limit:
        raise fail(f"extract.seq_len={seq_len} is above the model's limit of {limit} positions.", f"use extract.seq_len <= {limit}.")
    tok = load_tokenizer(cfg.model)
    tokens = load_tokens(cfg.calib, tok, max_tokens=int(ex.num_tokens))
    seqs = windows(tokens, seq_len, None, f"extract_keys on corpus '{cfg.calib.name}'")
    total = seqs.shape[0] * seq_len
    if total < int(ex.num_tokens):
        print(f"[extract_keys] corpus '{cfg.calib.name}' gives {total} tokens (< {ex.num_tokens} asked): using all of them")

    want = expected_manifest(cfg, model, fp, total)
    man_path, prog_path = out_dir / "manifest.json", out_dir / "progress.json"
    manifest = want
    # resume from the complete manifest (a rerun with a shard damaged since), else from progress.json (an incomplete
    # manifest.json is an older version's progress file)
    state = man_path if man_path.exists() else prog_path if prog_path.exists() else None
    if state is not None:
        old = read_json(state, "key manifest")
        diff = _job_diff(old, want)
        if diff:
            raise fail(f"{state} was written for another extraction (it differs in {', '.join(diff)}).",
                       f"delete {out_dir} or choose another keys_dir.")
        manifest = old
        good = _valid_prefix(out_dir, manifest["shards"], shard_tokens, total)
        if good < len(manifest["shards"]):  # a shard missing, corrupt, truncated or out of order
            bad = manifest["shards"][good]["file"]
            print(f"[extract_keys] {out_dir / bad} is missing, corrupt or out of order: re-extracting it and the "
                  f"{len(manifest['shards']) - good - 1} shard(s) after it")
            for sh in manifest["shards"][good:]:
                (out_dir / sh["file"]).unlink(missing_ok=True)
            manifest["shards"] = manifest["shards"][:good]
            manifest["complete"] = False
        if manifest.get("complete") and sum(sh["tokens"] for sh in manifest["shards"]) != manifest["num_tokens"]:
            manifest["complete"] = False  # (shards dropped from the manifest by hand)
        if manifest.get("complete"):
            prog_path.unlink(missing_ok=True)  # (killed between writing the manifest and removing it)
            print(f"[extract_keys] {out_dir} is complete ({manifest['num_tokens']} tokens); nothing to do")
            return manifest
        # from here on the state is in progress.json alone: no manifest.json until every shard is in place
        write_json(prog_path, manifest)
        man_path.unlink(missing_ok=True)
        print(f"[extract_keys] resuming after {len(manifest['shards'])} complete shard(s)")
    elif out_dir.exists():
        for p in out_dir.glob("shard_*.safetensors"):  # an earlier extraction's (Snakemake removed its manifest)
            p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    capture = KeyCapture(sides)
    attach(model, capture)
    dtype = torch_dtype(str(ex.dtype))
    seqs_per_shard = shard_tokens // seq_len
    done_tokens = sum(sh["tokens"] for sh in manifest["shards"])
    start = done_tokens // seq_len
    buf: dict[str, list[torch.Tensor]] = {s: [] for s in sides}
    L = fp["num_layers"]
    bs = int(ex.batch_size)
    bar = tqdm(total=total, initial=done_tokens, unit="tok", desc="extract_keys", disable=not progress)

    def flush():
        from safetensors.torch import save_file

        i = len(manifest["shards"])
        name = f"shard_{i:05d}.safetensors"
        tensors = {s: torch.cat(buf[s], dim=2).to(dtype).contiguous() for s in sides}  # (L, KVH, N, D)
        n = tensors[sides[0]].shape[2]
        with atomic_path(out_dir / name) as tmp:
            # one metadata key: safetensors writes several in random order (non-reproducible bytes)
            save_file(tensors, str(tmp), metadata={"loki": json.dumps({"format": FORMAT, "model": fp["name"], "index": i})})
        manifest["shards"].append({"file": name, "tokens": n, "sha256": sha256_file(out_dir / name)})
        write_json(prog_path, manifest)
        for s in sides:
            buf[s].clear()

    t0 = time.time()
    with torch.inference_mode():
        b1 = start
        while b1 < seqs.shape[0]:
            # never let a batch straddle a shard boundary (the next batch starts where this one ends: a batch_size
            # that does not divide shard_tokens / seq_len once skipped the sequences after each shortened batch)
            b0, b1 = b1, min(b1 + bs, seqs.shape[0], (b1 // seqs_per_shard + 1) * seqs_per_shard)
            batch = seqs[b0:b1].to(device)
            model(input_ids=batch, use_cache=False)
            for s in sides:
                k = capture.pop(s, L)  # (L, B, KVH, T, D)
                buf[s].append(k.permute(0, 2, 1, 3, 4).reshape(L, k.shape[2], -1, k.shape[-1]).cpu())
            bar.update(batch.numel())
            if b1 % seqs_per_shard == 0 or b1 == seqs.shape[0]:
                flush()
            if ex.get("stop_after_shards") and len(manifest["shards"]) >= int(ex.stop_after_shards):
                bar.close()
                raise KeyboardInterrupt("stop_after_shards reached (test hook)")
    bar.close()
    capture.remove()
    manifest["complete"] = True
    manifest["seconds"] = round(time.time() - t0, 2)
    write_json(man_path, manifest)
    prog_path.unlink(missing_ok=True)
    return manifest


def _valid_prefix(out_dir: Path, shards: list[dict], shard_tokens: int, total: int) -> int:
    """How many of the manifest's shards, from the first, are in place: named by their index, holding the tokens
    their index implies, present, with the recorded checksum."""
    for i, sh in enumerate(shards):
        p = out_dir / sh["file"]
        want_tokens = min(shard_tokens, total - i * shard_tokens)
        if (sh["file"] != f"shard_{i:05d}.safetensors" or sh["tokens"] != want_tokens or not p.exists()
                or sha256_file(p) != sh["sha256"]):
            return i
    return len(shards)


def _rerun_hint(keys_dir) -> str:
    return (f"rerun extract_keys with the same settings (it checks every shard and re-extracts from the first bad "
            f"one), or delete {keys_dir} and rerun it")


def verify_shards(keys_dir: Path, model_info: dict | None = None, check_hash: bool = True) -> dict:
    """Read and check a key folder's manifest (and the shards' checksums); return the manifest."""
    from loki.modeling import check_fingerprint

    keys_dir = Path(keys_dir)
    man_path = keys_dir / "manifest.json"
    if not man_path.exists() and (keys_dir / "progress.json").exists():
        raise fail(f"key extraction in {keys_dir} is incomplete (progress.json, no manifest.json).",
                   "rerun extract_keys with the same settings: it resumes after the last complete shard.")
    if not man_path.exists():
        raise fail(f"no key manifest at {man_path}.", "run extract_keys first (or set keys_dir).")
    man = read_json(man_path, "key manifest")
    if man.get("format") != FORMAT:
        raise fail(f"{man_path} is not a Loki key manifest.", "point keys_dir at an extract_keys output folder.")
    if not man.get("complete"):
        raise fail(f"key extraction in {keys_dir} is incomplete ({len(man['shards'])} shard(s)).",
                   "rerun extract_keys with the same settings: it resumes after the last complete shard.")
    if model_info is not None:
        check_fingerprint(man["model"], model_info, "key manifest", str(man_path), "extract keys with the model you fit for.")
    rerun = _rerun_hint(keys_dir)
    held = sum(sh["tokens"] for sh in man["shards"])
    if held != man["num_tokens"]:
        raise fail(f"{man_path} lists shards of {held} tokens, not the {man['num_tokens']} it was written for.", rerun + ".")
    if check_hash:
        for sh in man["shards"]:
            p = keys_dir / sh["file"]
            if not p.exists() or sha256_file(p) != sh["sha256"]:
                raise fail(f"key shard {p} is missing, corrupt or truncated (checksum does not match {man_path}).",
                           rerun + ".")
    return man


def iter_shards(keys_dir: Path, man: dict, side: str):
    """Yield each shard's (L, KVH, N, D) keys for one side; a shard is read only when needed."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    for sh in man["shards"]:
        p = Path(keys_dir) / sh["file"]
        try:
            with safe_open(str(p), "pt") as f:
                if side not in f.keys():
                    raise fail(f"shard {p} has no '{side}' keys (it has {list(f.keys())}).",
                               f"extract with extract.sides including {side}.")
                yield f.get_tensor(side)
        except (SafetensorError, OSError) as e:
            raise fail(f"key shard {p} is corrupt or truncated ({e}).", _rerun_hint(keys_dir) + ".") from e


@stage
def main(cfg) -> None:
    from loki.tracking import wandb_run

    out_dir = Path(cfg.keys_dir)
    check_settings(cfg.extract)  # before the W&B run: bad settings write nothing
    with wandb_run(cfg, "extract_keys", name=f"extract_keys-{cfg.model.name}-{cfg.calib.name}") as run:
        man = extract(cfg, out_dir)
        if run is not None:
            run.summary.update({"tokens": man["num_tokens"], "shards": len(man["shards"]),
                                "seconds": man.get("seconds", 0.0)})
    print(f"[extract_keys] {man['num_tokens']} tokens in {len(man['shards'])} shard(s) -> {out_dir}")


if __name__ == "__main__":
    main()
