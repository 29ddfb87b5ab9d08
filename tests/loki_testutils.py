"""Helpers shared by the tests (imported as `loki_testutils`; conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO / "resources" / "models" / "smollm2-135m"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

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


