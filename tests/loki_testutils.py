"""Helpers shared by the tests (imported as `loki_testutils`; conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO / "resources" / "models" / "smollm2-135m"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# the smoke DAG as tests/conftest.py's `smoke_dag` runs it (and a rerun must find nothing to do)
SMOKE_DAG_ARGS = ["-m", "snakemake", "--workflow-profile", "workflow/profiles/local", "--configfile",
                  "conf/sweep/smoke.yaml"]

TEXT = (
    "The committee met on Tuesday to discuss the budget. Officials said the new plan would cut spending on roads "
    "and raise funds for schools. Critics argued that the proposal ignored rural areas, while supporters pointed to "
    "rising enrolment in the cities. The vote is expected next week after a final round of hearings. "
) * 40


def run_py(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 900, check: bool = True):
    """Run ``python <args>`` (a stage, snakemake...) and return the CompletedProcess (text)."""
    e = {**os.environ, **(env or {})}
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def copy_tree(dst: Path, src: Path = REPO) -> Path:
    """Copy what a fresh clone of ``src`` plus its working tree's new files hold (tracked and untracked-not-ignored
    files) to ``dst``."""
    import shutil

    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (src / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dst / f)
    return dst


def seed_model(model_dir: Path, wd: Path) -> None:
    """Put a prepared model folder into ``wd``'s resources/models/ (hard links where possible), as a finished
    ``prepare_model`` job would have: Snakemake then has nothing to do for it."""
    import shutil

    def link(a, b):
        if os.path.lexists(b):       # a second seeding (an earlier attempt stopped half-way): replace
            os.unlink(b)
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    dst = wd / "resources" / "models" / model_dir.name
    shutil.copytree(model_dir, dst, copy_function=link, dirs_exist_ok=True)


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str = "llama", **kw):
    """A tiny config of a supported family (random weights; no download)."""
    from transformers import AutoConfig

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
                vocab_size=300, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                tie_word_embeddings=False)
    if family == "qwen3":
        base["head_dim"] = 16
    base.update(kw)
    return AutoConfig.for_model(family, **base)


def save_tiny_model(out_dir: Path, family: str = "llama", seed: int = 0, **kw) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir)
    return out_dir



# ----------------------------------------------------------------------------------------------------------
# attention methods on random inputs (tests/test_methods_core.py, tests/methods/)


def fake_model(layers: int = 1, heads: int = 6, kv_heads: int = 2, head_dim: int = 16):
    """A stand-in for a loaded llama model: only the config a method binds to (no weights)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(model_type="llama", num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=head_dim, hidden_size=heads * head_dim,
                          vocab_size=100, _name_or_path="fake")
    return SimpleNamespace(config=cfg)


def random_basis(layers: int = 1, seed: int = 0, heads: int = 6, kv_heads: int = 2, head_dim: int = 16):
    """A random orthonormal float64 post-RoPE basis per layer and KV head, fingerprinted for ``fake_model``."""
    import torch

    from loki.modeling import fingerprint
    from loki.pca import Basis

    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(layers, kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64))[0]
    evr = torch.softmax(torch.randn(layers, kv_heads, head_dim, generator=g, dtype=torch.float64), -1)
    evr = evr.sort(-1, descending=True).values
    return Basis({"post.components": P, "post.explained_variance_ratio": evr},
                 {"fingerprint": fingerprint(fake_model(layers, heads, kv_heads, head_dim), "fake")})


def make_method(name: str, basis, model, /, **opts):
    """The method ``name`` built from ``opts`` on ``basis`` and bound to ``model`` -> (method, basis). Positional
    arguments only, so that ``opts`` may hold any option (a method's ``basis`` option, ...)."""
    from loki.methods import build_method

    m = build_method({"name": name, **opts}, basis=basis)
    m.bind(model)
    return m, basis


def random_qkv(seed: int = 1, T: int = 12, S: int | None = None, batch: int = 2, heads: int = 6, kv_heads: int = 2,
               head_dim: int = 16):
    """Random float64 q (batch, heads, T, head_dim) and k, v (batch, kv_heads, S, head_dim); S defaults to T."""
    import torch

    g = torch.Generator().manual_seed(seed)
    S = S or T
    q = torch.randn(batch, heads, T, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, S, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, S, head_dim, generator=g, dtype=torch.float64)
    return q, k, v


def causal(T: int, S: int | None = None):
    """The causal keep-mask (1, 1, T, S) of the last T queries over S keys."""
    import torch

    S = S or T
    return (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None, None]
