"""The decode benchmark: rows, speedups, bytes (tiny model on the CPU), the configs, the Hydra stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loki.bench_core import _add_speedups, fuse_qkv, load_bench_config, loki_options, run_bench, table

REPO = Path(__file__).resolve().parents[2]


def test_run_bench_rows(tiny):
    cfg = {"batch": [2], "context": [24], "methods": ["dense", "dense_flash", "loki", "loki_rows"], "new_tokens": 2,
           "warmup": 1, "graphs": False, "fill": "prefill", "prefill_max_tokens": 4096, "calib_tokens": 32,
           "compile_glue": True, "fuse_qkv": True}  # CUDA only: ignored on the CPU, and the rows say so
    rows = run_bench(tiny, cfg, {"d": 4, "k": 0.25, "selection": "group"}, "cpu", log=lambda s: None)
    assert [r["method"] for r in rows] == ["dense", "dense_flash", "loki", "loki_rows"]
    for r in rows:
        assert r["batch"] == 2 and r["context"] == 24 and r["prefill_s"] > 0 and r["ms_per_token"] > 0
        assert r["tokens_per_s"] == pytest.approx(2e3 / r["ms_per_token"], rel=1e-3, abs=0.01)  # (rounded to 0.01)
        assert 0 < r["attention_share"] <= 1 and r["attention_ms"] > 0
        assert r["compile_glue"] is False and r["fuse_qkv"] is False
    dense, flash, lk, lk_rows = rows
    assert dense["speedup"] == 1.0 and lk["speedup"] == pytest.approx(lk["tokens_per_s"] / dense["tokens_per_s"],
                                                                      rel=1e-2)
    assert lk["d"] == 4 and lk["k"] == 0.25 and dense["d"] is None and lk["backend"] == "reference"
    S = 24 + 2 + 1 + 8
    kv = 2 * (2 * 2 * S * 16) * 4 * 2  # layers x (B KVH S D) x fp32 x (K, V)
    assert dense["cache_bytes"] == kv
    assert lk["cache_bytes"] == kv + 2 * (2 * 16 * 16 * 4 + 2 * 4)  # + per-layer basis and lengths
    # the "rows" layout (session 14): + a copy of the low-rank slab, d / (2D) of the keys and values
    assert (lk["layout"], lk_rows["layout"], flash["layout"], dense["layout"]) == ("split", "rows", "split", None)
    assert lk_rows["cache_bytes"] == lk["cache_bytes"] + 2 * (2 * 2 * S * 4) * 4 and lk_rows["d"] == 4
    assert "ms_per_token" in table(rows)


def test_run_bench_fp8_slab(tiny):
    """loki_rows_fp8 (session 20): the rows layout with its slab copy in e4m3 (a 16-bit model): the slab costs
    d bytes per key instead of 2 d, and the row says which slab it timed."""
    import torch
    from gen_helpers import cast_copy

    model = cast_copy(tiny, torch.bfloat16)
    cfg = {"batch": [2], "context": [24], "methods": ["loki_rows", "loki_rows_fp8"], "new_tokens": 2, "warmup": 1,
           "graphs": False, "fill": "prefill", "prefill_max_tokens": 4096, "calib_tokens": 32}
    rows = run_bench(model, cfg, {"d": 4, "k": 0.25, "selection": "group"}, "cpu", log=lambda s: None)
    bf, f8 = rows
    assert (bf["method"], f8["method"]) == ("loki_rows", "loki_rows_fp8")
    assert (bf["layout"], f8["layout"], bf["slab_dtype"], f8["slab_dtype"]) == ("rows", "rows", None, "fp8")
    S = 24 + 2 + 1 + 8
    assert bf["cache_bytes"] - f8["cache_bytes"] == 2 * (2 * 2 * S * 4)  # layers x (B KVH S d) x (2 - 1) bytes
    assert f8["ms_per_token"] > 0 and f8["dtype"] == "bfloat16"


def test_speedups():
    rows = [{"batch": 1, "context": 8, "method": m, "tokens_per_s": t} for m, t in
            (("dense", 10.0), ("dense_flash", 20.0), ("loki", 30.0))]
    _add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[2]["speedup_vs_flash"] == 1.5


@pytest.mark.parametrize("name", ["cpu", "h200"])
def test_bench_configs(name):
    cfg = load_bench_config(REPO / "conf" / "bench" / f"{name}.yaml")
    assert cfg["name"] == name and cfg["batch"] and cfg["context"]
    opts = loki_options(cfg)
    assert opts["d"] == 0.25 and opts["k"] == 0.125 and opts["selection"] == "group"
    if name == "h200":
        shape = cfg["random_llama"]
        assert (shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"],
                shape["num_key_value_heads"], shape["head_dim"], shape["intermediate_size"]) == \
            (32, 4096, 32, 8, 128, 14336)
        assert cfg["batch"] == [1, 16] and cfg["context"] == [4096, 16384, 32768] and cfg["dtype"] == "bfloat16"
    # the GPU run compiles the glue and fuses q/k/v for every method alike (session 5); both are CUDA only
    assert cfg["compile_glue"] is (name == "h200") and cfg["fuse_qkv"] is (name == "h200")


def test_fuse_qkv_same_logits():
    """One q/k/v GEMM per attention gives the model's logits (fp32: up to summation order), and the projections
    really are the fused module's slices (one GEMM per layer and input)."""
    import torch
    from gen_helpers import tiny_llama

    model, plain = tiny_llama(seed=3), tiny_llama(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        n = fuse_qkv(model)
        assert n == model.config.num_hidden_layers
        calls = []
        for layer in model.model.layers:
            orig = layer.self_attn.qkv_fused.outputs
            layer.self_attn.qkv_fused.outputs = (lambda f: (lambda x: (calls.append(x), f(x))[1]))(orig)
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 3 * n  # three projections per layer, each served by the fused module
    assert all(layer.self_attn.qkv_fused._out is None for layer in model.model.layers)  # nothing kept after v
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


def test_stage_writes_json(tmp_path, embedded_model_dir):
    """python -m loki.bench on the embedded model at a tiny size."""
    defaults = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["defaults"]
    group = "bench" if any(isinstance(d, dict) and "bench" in d for d in defaults) else "+bench"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "loki.bench", f"{group}=cpu", "bench.batch=[2]", "bench.context=[32]",
           "bench.new_tokens=2", "bench.calib_tokens=64", f"bench.out={tmp_path}/decode.json",
           f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", "threads=1"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "decode.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "loki"]
    assert all(r["model"] == "smollm2-135m" and r["context"] == 32 for r in rows)
    # the options the report matches a result on (loki.common.MEASURED_AT): conf/bench/cpu.yaml's, as the method ran
    from loki.common import MEASURED_AT

    assert rows[0]["options"] is None and rows[1]["options"] == MEASURED_AT
    assert "tokens_per_s" in res.stdout


@pytest.mark.parametrize("over,needle", [
    ({"batch": [0]}, r"bench.batch must be a non-empty list of whole numbers >= 1, got \[0\]"),
    ({"batch": []}, r"bench.batch must be a non-empty list"),
    ({"context": [16, 2.5]}, r"bench.context must be a non-empty list of whole numbers >= 1"),
    ({"new_tokens": 0}, r"bench.new_tokens must be a whole number >= 1, got 0"),
    ({"warmup": -1}, r"bench.warmup must be a whole number >= 0"),
    ({"context": [32, 100000]}, r"\(100006\) is beyond the model's 128 positions.*use contexts <= 122"),
])
def test_bench_grid_refused_before_any_work(over, needle):
    """A grid that would crash mid-run (batch 0) or run past the model's positions is one clear error, raised before
    the basis is fitted or any point runs."""
    from gen_helpers import tiny_llama

    from loki.common import LokiError

    model = tiny_llama(max_position_embeddings=128)
    cfg = {"batch": [1], "context": [32], "new_tokens": 4, "warmup": 2, "methods": ["dense"], **over}
    with pytest.raises(LokiError, match=f"(?s){needle}"):
        run_bench(model, cfg, {}, "cpu", log=lambda *_: pytest.fail("work started"))


def test_bench_names_its_own_loki_keys(tmp_path, embedded_model_dir):
    """bench.loki.d=128 on a head dim of 64: the message names bench.loki.d (what to set), not method.d."""
    defaults = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["defaults"]
    group = "bench" if any(isinstance(d, dict) and "bench" in d for d in defaults) else "+bench"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "loki.bench", f"{group}=cpu", "bench.batch=[1]", "bench.context=[16]",
           "bench.new_tokens=1", "bench.calib_tokens=32", "bench.loki.d=128", f"bench.out={tmp_path}/decode.json",
           f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", "threads=1"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "set bench.loki.d to at most 64" in res.stderr and "method.d" not in res.stderr
    assert not (tmp_path / "decode.json").exists()
