"""Key extraction (families, RoPE sides, resume, corrupt shards, bounded memory) and PCA fitting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from loki_testutils import REPO, TEXT, run_py, save_tiny_model

from loki.common import LokiError


def _stamp(path):
    """What a rewrite changes even within one mtime tick: shards are written to a temporary name and renamed, which
    gives a new inode."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def compose(overrides):
    from loki.common import compose_config

    return compose_config(overrides)


def extract_cfg(model_dir, text_file, keys_dir, **ex):
    return compose(_ov(model_dir, text_file, keys_dir, **ex))


def _ov(model_dir, text_file, keys_dir, **ex):
    ov = [f"model.path={model_dir}", "model.name=tiny", "model.source=null", f"calib.path={text_file}", "calib.name=text",
          "calib.source=null", f"keys_dir={keys_dir}", "device=cpu", "extract.num_tokens=256", "extract.seq_len=64",
          "extract.shard_tokens=128"]
    ov += [f"extract.{k}={v}" for k, v in ex.items()]
    return ov


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_extract_families_and_recompute_keys(family, tmp_path, text_file):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from loki.data import load_tokens, windows
    from loki.extract_keys import extract, iter_shards, verify_shards
    from loki.modeling import load_tokenizer

    mdir = save_tiny_model(tmp_path / "m", family)
    cfg = extract_cfg(mdir, text_file, tmp_path / "keys")
    man = extract(cfg, tmp_path / "keys", progress=False)
    man = verify_shards(tmp_path / "keys")
    L, KVH, D = man["model"]["num_layers"], man["model"]["num_kv_heads"], man["model"]["head_dim"]
    assert (L, KVH, D) == (2, 2, 16) and man["num_tokens"] == 256 and len(man["shards"]) == 2
    pre = torch.cat(list(iter_shards(tmp_path / "keys", man, "pre")), dim=2)
    post = torch.cat(list(iter_shards(tmp_path / "keys", man, "post")), dim=2)
    assert pre.shape == post.shape == (L, KVH, 256, D)

    # recompute layer 1's keys of the first sequence independently of the capture code
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    tok = load_tokenizer(cfg.model)
    x = windows(load_tokens(cfg.calib, tok, max_tokens=256), 64, None, "t")[:1]
    layer = 1
    with torch.inference_mode():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states[layer]
        attn = model.model.layers[layer].self_attn
        h = model.model.layers[layer].input_layernorm(hs)
        k = attn.k_proj(h).view(1, 64, KVH, D)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(64)[None])
        _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(pre[layer, :, :64], k[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(post[layer, :, :64], k_rot[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pre[layer, :, 1:64], post[layer, :, 1:64]), "RoPE must change the keys"


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny_model_dir, text_file):
    from loki.extract_keys import extract, iter_shards

    full = tmp_path / "full"
    extract(extract_cfg(tiny_model_dir, text_file, full), full, progress=False)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        extract(extract_cfg(tiny_model_dir, text_file, part, stop_after_shards=1), part, progress=False)
    # the progress is in progress.json; manifest.json (Snakemake's output, deleted when a job fails) only once complete
    assert not (part / "manifest.json").exists()
    man = json.loads((part / "progress.json").read_text())
    assert len(man["shards"]) == 1 and not man["complete"]
    first = _stamp(part / "shard_00000.safetensors")
    assert not list(part.glob(".*tmp")), "no half-written files left"
    extract(extract_cfg(tiny_model_dir, text_file, part), part, progress=False)
    assert _stamp(part / "shard_00000.safetensors") == first, "complete shard was redone"
    assert not (part / "progress.json").exists()
    m1, m2 = json.loads((full / "manifest.json").read_text()), json.loads((part / "manifest.json").read_text())
    assert {**m1, "seconds": 0} == {**m2, "seconds": 0}
    for side in ("pre", "post"):
        for a, b in zip(iter_shards(full, m1, side), iter_shards(part, m2, side)):
            assert torch.equal(a, b)


def test_batch_size_not_dividing_a_shard_keeps_every_sequence(tmp_path, tiny_model_dir, text_file):
    """batch_size 3 with 4 sequences per shard: batches are cut at shard ends and none is skipped (the keys equal
    batch_size 1's; they once skipped the sequences after each shortened batch)."""
    from loki.extract_keys import extract, iter_shards, verify_shards

    got = {}
    for bs in (1, 3):
        keys = tmp_path / f"bs{bs}"
        extract(extract_cfg(tiny_model_dir, text_file, keys, num_tokens=512, shard_tokens=256, batch_size=bs), keys,
                progress=False)
        man = verify_shards(keys)
        assert man["num_tokens"] == 512 and [sh["tokens"] for sh in man["shards"]] == [256, 256]
        got[bs] = torch.cat(list(iter_shards(keys, man, "post")), dim=2)
    torch.testing.assert_close(got[3], got[1], rtol=1e-5, atol=1e-6)


def test_kill_midway_and_rerun_subprocess(tmp_path, tiny_model_dir, text_file):
    """A real interruption (the process dies after one shard), then a plain rerun."""
    ov = [f"model.path={tiny_model_dir}", "model.name=tiny", "model.source=null", f"calib.path={text_file}",
          "calib.name=text", "calib.source=null", f"keys_dir={tmp_path / 'k'}", "extract.num_tokens=256",
          "extract.seq_len=64", "extract.shard_tokens=128", f"hydra.run.dir={tmp_path / 'h'}", "device=cpu"]
    res = run_py(["-m", "loki.extract_keys", *ov, "extract.stop_after_shards=1"], check=False)
    assert res.returncode != 0
    man = json.loads((tmp_path / "k" / "progress.json").read_text())  # it died after writing shard 0, not at start
    assert not man["complete"] and len(man["shards"]) == 1, (res.stderr[-2000:], man)
    assert not (tmp_path / "k" / "manifest.json").exists()  # what Snakemake would delete holds no progress
    shard0 = tmp_path / "k" / "shard_00000.safetensors"
    stamp = _stamp(shard0)
    res = run_py(["-m", "loki.extract_keys", *ov])
    assert "resuming after 1 complete shard(s)" in res.stdout, res.stdout[-2000:]
    man = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert man["complete"] and len(man["shards"]) == 2
    assert _stamp(shard0) == stamp  # resumed: shard 0 kept, not written again
    assert not (tmp_path / "k" / "progress.json").exists()
    # a truncated last shard (killed while the file system was writing it) is not trusted: re-extracted
    prog = {**man, "complete": False}
    (tmp_path / "k" / "manifest.json").unlink()
    (tmp_path / "k" / "progress.json").write_text(json.dumps(prog))
    shard1 = tmp_path / "k" / "shard_00001.safetensors"
    good1 = shard1.read_bytes()
    shard1.write_bytes(good1[: len(good1) // 2])
    res = run_py(["-m", "loki.extract_keys", *ov])
    assert "shard_00001.safetensors is missing, corrupt" in res.stdout and "resuming after 1 complete" in res.stdout
    again = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert shard1.read_bytes() == good1 and {**again, "seconds": 0} == {**man, "seconds": 0}


def test_corrupt_shard_and_wrong_model_are_named(tmp_path, tiny_model_dir, text_file):
    from loki.extract_keys import extract, verify_shards

    keys = tmp_path / "keys"
    extract(extract_cfg(tiny_model_dir, text_file, keys), keys, progress=False)
    shard = keys / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(LokiError, match="(?s)shard_00001.safetensors.*(corrupt|truncated).*rerun extract_keys"):
        verify_shards(keys)
    # the fix the message gives: a rerun re-extracts the bad shard (and keeps the good one), to the same bytes
    good = _stamp(keys / "shard_00000.safetensors")
    man = extract(extract_cfg(tiny_model_dir, text_file, keys), keys, progress=False)
    assert man["complete"] and len(man["shards"]) == 2
    assert _stamp(keys / "shard_00000.safetensors") == good
    assert verify_shards(keys)["num_tokens"] == 256
    # a shard dropped from the manifest by hand: the manifest no longer adds up, and a rerun restores it
    m = json.loads((keys / "manifest.json").read_text())
    m["shards"] = m["shards"][:1]
    (keys / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LokiError, match="lists shards of 128 tokens, not the 256"):
        verify_shards(keys)
    extract(extract_cfg(tiny_model_dir, text_file, keys), keys, progress=False)
    assert verify_shards(keys)["num_tokens"] == 256
    other = {"name": "other", "model_type": "llama", "num_layers": 5, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "hidden_size": 64, "vocab_size": 300}
    keys2 = tmp_path / "keys2"
    extract(extract_cfg(tiny_model_dir, text_file, keys2), keys2, progress=False)
    with pytest.raises(LokiError, match="num_layers"):
        verify_shards(keys2, other)


def test_extract_bad_inputs(tmp_path, tiny_model_dir, text_file):
    from loki.extract_keys import extract

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(LokiError, match="empty"):
        extract(extract_cfg(tiny_model_dir, empty, tmp_path / "a"), tmp_path / "a", progress=False)
    with pytest.raises(LokiError, match="above the model's limit"):
        extract(extract_cfg(tiny_model_dir, text_file, tmp_path / "b", seq_len=1024, shard_tokens=1024), tmp_path / "b",
                progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("key,value", [("seq_len", 0), ("shard_tokens", 0), ("batch_size", 0), ("num_tokens", -5),
                                       ("seq_len", 1.5), ("num_tokens", "null")])
def test_extract_bad_counts_are_named(tmp_path, tiny_model_dir, text_file, key, value):
    """Counts that once crashed (ZeroDivisionError, a RuntimeError from torch) or ran silently (num_tokens=-5):
    one message naming the key, before the model is loaded, nothing written."""
    from loki.extract_keys import extract

    keys = tmp_path / "keys"
    with pytest.raises(LokiError, match=rf"(?s)extract\.{key} must be a positive whole number.*How to fix: e\.g\. "
                                        rf"extract\.{key}=\d+"):
        extract(extract_cfg(tiny_model_dir, text_file, keys, **{key: value}), keys, progress=False)
    assert not keys.exists()


def test_extract_bad_count_cli_exit_code(tmp_path, tiny_model_dir, text_file):
    ov = [f"model.path={tiny_model_dir}", "model.name=tiny", "model.source=null", f"calib.path={text_file}",
          "calib.name=text", "calib.source=null", f"keys_dir={tmp_path / 'k'}", f"hydra.run.dir={tmp_path / 'h'}",
          "device=cpu", "extract.seq_len=0"]
    res = run_py(["-m", "loki.extract_keys", *ov], check=False)
    assert res.returncode == 2 and "extract.seq_len must be a positive whole number" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not (tmp_path / "k").exists()


def test_incremental_pca_matches_full_pca():
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    from loki.pca import fit_incremental

    rng = np.random.default_rng(0)
    L, H, N, D = 2, 2, 3000, 16
    scales = np.linspace(3, 0.05, D)
    X = rng.normal(size=(L, H, N, D)) * scales @ np.linalg.qr(rng.normal(size=(D, D)))[0] + rng.normal(size=D)
    chunks = [torch.from_numpy(X[:, :, i: i + 700]) for i in range(0, N, 700)]  # last chunk 200 rows
    out = fit_incremental(chunks, L, H, D, center=True)
    for layer in range(L):
        for h in range(H):
            full = PCA().fit(X[layer, h])
            np.testing.assert_allclose(out["explained_variance_ratio"][layer, h].numpy(), full.explained_variance_ratio_,
                                       atol=1e-3)
            for d in (1, 4, 8):
                ang = subspace_angles(out["components"][layer, h, :, :d].double().numpy(), full.components_[:d].T)
                assert ang.max() < 1e-2, (layer, h, d, ang.max())
    # uncentered: eigenvectors of X^T X
    unc = fit_incremental(chunks, L, H, D, center=False)
    w, v = np.linalg.eigh(X[0, 0].T @ X[0, 0])
    ang = subspace_angles(unc["components"][0, 0, :, :3].double().numpy(), v[:, ::-1][:, :3])
    assert ang.max() < 1e-2


def test_basis_roundtrip_and_checks(tmp_path):
    from loki.pca import load_basis, save_basis

    fp = {"name": "m", "model_type": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
          "hidden_size": 32, "vocab_size": 10}
    P = torch.linalg.qr(torch.randn(2, 2, 8, 8))[0]
    t = {"post.components": P, "post.explained_variance_ratio": torch.full((2, 2, 8), 1 / 8, dtype=torch.float64)}
    save_basis(tmp_path / "pca.safetensors", t, {"fingerprint": fp})
    b = load_basis(tmp_path / "pca.safetensors", fp)
    assert torch.equal(b.components("post"), P)
    with pytest.raises(LokiError, match="no 'pre' basis"):
        b.components("pre")
    with pytest.raises(LokiError, match="(?s)num_kv_heads.*fit a basis for 'other'"):
        load_basis(tmp_path / "pca.safetensors", {**fp, "name": "other", "num_kv_heads": 4})
    # same shapes, another model's name: refused, naming both models, the refit and the opt-in ...
    with pytest.raises(LokiError, match="(?s)was made for model 'm', this model is 'other' .same shapes.*"
                                        "fit a basis for 'other'.*allow_foreign_basis=true") as e:
        load_basis(tmp_path / "pca.safetensors", {**fp, "name": "other"})
    assert "How to fix" in str(e.value)
    # ... unless opted in; then later checks of that basis for that model pass too (Loki.bind checks again)
    b = load_basis(tmp_path / "pca.safetensors", {**fp, "name": "other"}, allow_other_model=True)
    assert b.model_name == "m"
    b.check({**fp, "name": "other"})
    with pytest.raises(LokiError, match="this model is 'third'"):
        b.check({**fp, "name": "third"})
    # no fingerprint at all: a warning (its shapes are still checked, there is no name to compare)
    save_basis(tmp_path / "nofp.safetensors", t, {})
    with pytest.warns(UserWarning, match="records no model fingerprint"):
        load_basis(tmp_path / "nofp.safetensors", fp)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(LokiError, match="corrupt"):
        load_basis(tmp_path / "bad.safetensors")
    with pytest.raises(LokiError, match="(?s)does not exist.*fit_pca"):
        load_basis(tmp_path / "missing.safetensors")


PEAK_SCRIPT = r"""
import json, resource, sys
from loki.common import compose_config
stage, n, model, text, keys, pca = sys.argv[1:7]
ov = [f"model.path={model}", "model.name=wide", "model.source=null", f"calib.path={text}", "calib.name=text",
      "calib.source=null", f"keys_dir={keys}", f"pca_path={pca}", f"extract.num_tokens={n}", "extract.seq_len=256",
      "extract.shard_tokens=1024", "extract.batch_size=8", "device=cpu", "threads=1"]
cfg = compose_config(ov)
import torch
torch.set_num_threads(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if stage == "extract":
    from loki.extract_keys import extract
    extract(cfg, __import__("pathlib").Path(keys), progress=False)
else:
    from loki.fit_pca import fit
    fit(cfg, __import__("pathlib").Path(keys), __import__("pathlib").Path(pca), progress=False)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kb": base}))
"""


def test_peak_memory_flat_in_token_count(tmp_path):
    """4x the tokens must not raise peak memory: one shard is held at a time (extract and fit)."""
    mdir = save_tiny_model(tmp_path / "wide", "llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                           num_hidden_layers=4, intermediate_size=256, max_position_embeddings=1024)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    peaks = {}
    for n in (4096, 16384):
        for stage in ("extract", "fit"):
            res = run_py([str(script), stage, str(n), str(mdir), str(text), str(tmp_path / f"k{n}"),
                          str(tmp_path / f"p{n}" / "pca.safetensors")], timeout=600)
            peaks[(stage, n)] = json.loads(res.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
    # keys of 4 layers x 4 heads x 64 dims x 2 sides in fp32 = 8 KiB/token: holding 12K more tokens would need 96 MiB more
    per_token_mb = 4 * 4 * 64 * 2 * 4 / 2**20
    for stage in ("extract", "fit"):
        growth = peaks[(stage, 16384)] - peaks[(stage, 4096)]
        assert growth < 0.25 * per_token_mb * (16384 - 4096), (stage, peaks)
    (REPO / "results").mkdir(exist_ok=True)
    print("peak MiB:", {f"{s}@{n}": round(v) for (s, n), v in peaks.items()})


def test_keys_of_another_corpus_file_or_model_folder_are_not_reused(tmp_path, tiny_model_dir, text_file, monkeypatch):
    """A finished keys_dir is reused only for the same job: another corpus file or model folder under the same names
    is refused with the differing setting named (not 'complete; nothing to do' and a PCA of the wrong text), and the
    keys are left as they were; the same file named by a relative path is the same job."""
    import shutil

    from loki.extract_keys import extract

    keys = tmp_path / "keys"
    extract(extract_cfg(tiny_model_dir, text_file, keys), keys, progress=False)
    before = _stamp(keys / "manifest.json")
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text()[::-1])
    with pytest.raises(LokiError, match=r"(?s)another extraction \(it differs in corpus\.path\).*delete"):
        extract(extract_cfg(tiny_model_dir, other_text, keys), keys, progress=False)
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other_model)
    with pytest.raises(LokiError, match=r"differs in model\.path\)"):
        extract(extract_cfg(other_model, text_file, keys), keys, progress=False)
    with pytest.raises(LokiError, match=r"differs in model\.dtype\)"):  # keys computed in another precision
        extract(compose([*_ov(tiny_model_dir, text_file, keys), "model.dtype=float64"]), keys, progress=False)
    assert _stamp(keys / "manifest.json") == before
    monkeypatch.chdir(text_file.parent)
    man = extract(extract_cfg(tiny_model_dir, text_file.name, keys), keys, progress=False)  # relative: same file
    assert man["complete"] and _stamp(keys / "manifest.json") == before
