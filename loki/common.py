"""Small shared helpers: one error type, atomic writes, hashing, threads, seeds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

# Options a measured speed holds for, at these values: the kernel benchmark (kernels/bench.py) always runs them, the
# decode benchmark (loki.bench) records its own (``options`` in its rows; rows without it ran these). A result with
# another value reads other rows (dense layers, forced sink / local tokens) or runs what the kernels do not (an
# online basis, pre-RoPE keys, a d per head, an fp8 slab), so a measurement of the plain method is not its speed
# (loki.report.speed_table, figures.speed_key).
MEASURED_AT = {"dense_layers": 0, "sink_tokens": 0, "local_window": 0, "basis": "offline", "rope": "post",
               "d_variance": None, "slab_dtype": None}

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


class LokiError(RuntimeError):
    """A user-facing error: the message names what is wrong and how to fix it."""


def compose_config(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> Any:
    """The config a stage sees, outside a Hydra app (the Python API, notebooks), with the same overrides as on the
    command line: ``compose_config(["model=smollm2-135m", "method=loki", "method.d=16"])``.  Relative paths in it
    (``resources_dir``, ``results_dir``) are relative to the working directory, as for the stages."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def method_defaults(method: str) -> dict | None:
    """The method's default options: conf/method/<method>.yaml (what a run of ``method=<name>`` gets), else the
    class defaults in the registry (imports torch), else None."""
    import yaml

    p = CONF_DIR / "method" / f"{method}.yaml"
    if p.exists():
        d = yaml.safe_load(p.read_text()) or {}
        d.pop("name", None)
        return d
    try:
        from loki.methods import METHODS

        if method in METHODS and isinstance(getattr(METHODS[method], "options", None), dict):
            return dict(METHODS[method].options)
    except ImportError:
        pass
    return None


def changed_options(opts: dict, defaults: dict, decode_only: bool = False, among=None) -> list[str]:
    """The method options besides d and k that differ from ``defaults`` (sorted; only those in ``among`` if given):
    what names a variant of a method. A decode_only eval's sparse_prefill is not one (the eval sets it)."""
    fixed = {"d", "k", "name"} | ({"sparse_prefill"} if decode_only else set())
    return [k for k in sorted(opts) if k not in fixed and (among is None or k in among)
            and (k not in defaults or json.dumps(opts[k]) != json.dumps(defaults[k]))]


def fail(what: str, fix: str) -> "LokiError":
    return LokiError(f"{what}\n  How to fix: {fix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and directories. Nothing half-written is ever visible under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written to {target}")
        _umask_modes(target)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process umask: from /proc on Linux (reading it with ``os.umask`` sets it, which races with
    threads creating files), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_modes(target: Path) -> None:
    """Give ``target`` (and what is under it) the modes a plain ``open`` would: 0o666 (0o777 for folders and
    executables) less the umask.  Writers such as safetensors' ``save_file`` create 0o600 files, which
    collaborators on a shared filesystem could not read."""
    mask = _umask()
    paths = [target] + (sorted(target.rglob("*")) if target.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        full = 0o777 if p.is_dir() or p.stat().st_mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise fail(f"{what} {path} does not exist.", "run the stage that produces it (see README: `snakemake --cores 2`).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise fail(f"{what} {path} is not valid JSON ({e}).", f"delete {path} and rerun the stage that produces it.") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def set_threads(n: int | None) -> None:
    import torch

    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise fail(f"threads={n!r} is not a thread count.", "set threads to an integer >= 1, or threads=null (torch's default).")
    torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (every stage does, from the config's ``seed``)."""
    import numpy as np
    import torch

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise fail(f"seed={seed!r} is not a seed.", "set seed to an integer in [0, 2**32), e.g. seed=0.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # (all devices)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str, key: str = "device") -> str:
    """``auto`` -> cuda when there is a GPU, else cpu; ``cpu``, ``cuda`` and ``cuda:N`` are checked against this
    machine (``key``: the config key named in the error)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    fix = f"set {key}=auto (a GPU when there is one), {key}=cpu, or {key}=cuda / cuda:N on a machine with a GPU."
    try:
        dev = torch.device(name) if isinstance(name, str) else None
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise fail(f"{key}={name!r} is not a device this pipeline runs on (auto, cpu, cuda, cuda:N).", fix)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise fail(f"{key}={name} asks for a GPU, but CUDA is not available here.", fix)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise fail(f"{key}={name}: this machine has {torch.cuda.device_count()} GPU(s).", fix)
    return name
