"""What every stage does first (device, threads, seed), the file modes of its outputs, and the transfer stage's
inputs: bad values stop with one clear message before any work, and leave the previous outputs as they were."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

from loki.common import LokiError, compose_config


@pytest.mark.parametrize("override,needle", [
    ("device=gpu", "device='gpu' is not a device this pipeline runs on"),
    ("device=cuda:x", "device='cuda:x' is not a device"),
    ("threads=-2", "threads=-2 is not a thread count"),
    ("threads=0", "threads=0 is not a thread count"),
    ("threads=two", "threads='two' is not a thread count"),
    ("seed=abc", "seed='abc' is not a seed"),
    ("seed=-1", "seed=-1 is not a seed"),
])
def test_start_refuses_bad_shared_keys(override, needle):
    from loki.app import start

    with pytest.raises(LokiError, match=needle) as e:
        start(compose_config([override]))
    assert "How to fix: set " + override.split("=")[0] in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_start_refuses_cuda_without_a_gpu():
    from loki.app import start

    with pytest.raises(LokiError, match="(?s)device=cuda asks for a GPU, but CUDA is not available.*device=cpu"):
        start(compose_config(["device=cuda"]))


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_start_seeds_python_numpy_and_torch_from_seed():
    from loki.app import start

    threads = torch.get_num_threads()
    try:
        start(compose_config(["seed=3", "threads=1"]))
        assert torch.get_num_threads() == 1
        a = _draws()
        start(compose_config(["seed=3"]))
        assert _draws() == a
        start(compose_config(["seed=4"]))
        assert _draws() != a
    finally:
        torch.set_num_threads(threads)


def test_every_stage_seeds_before_it_runs_and_refuses_a_bad_device_before_work(monkeypatch, tmp_path, capsys):
    import loki.app as app

    seen = []
    main = app.stage(lambda cfg: seen.append(_draws()))
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", ["loki.x", "seed=7", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
        main()
    assert len(seen) == 2 and seen[0] == seen[1]
    monkeypatch.setattr(sys, "argv", ["loki.x", "device=gpu", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and len(seen) == 2, "the stage's work never started"
    assert "device='gpu' is not a device" in capsys.readouterr().err


@pytest.fixture
def umask():
    def set_mask(m):
        os.umask(m)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_umask_modes_not_safetensors_0600(tmp_path, umask, mask, mode):
    """safetensors' save_file writes 0600 files; atomic_path gives them (and every file of a written folder) the
    mode a plain open would, so collaborators on a shared filesystem can read pca.safetensors and key shards."""
    from safetensors.torch import save_file

    from loki.common import atomic_path
    from loki.pca import save_basis

    umask(mask)
    with atomic_path(tmp_path / "shard.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    save_basis(tmp_path / "pca" / "pca.safetensors", {"post.components": torch.eye(2)[None, None]}, {})
    with atomic_path(tmp_path / "model") as tmp:  # a folder, as prepare writes the model
        tmp.mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    for p in ("shard.safetensors", "pca/pca.safetensors", "pca/pca.json", "model/model.safetensors"):
        assert oct((tmp_path / p).stat().st_mode & 0o777) == oct(mode), p
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == oct(0o777 & ~mask)


# ------------------------------------------------------------------------------------------------ transfer


def _transfer_results(tmp_path, head_dim=8):
    """results/<model>/{pca,keys}/<corpus> for two corpora: PCA files (and a manifest stand-in) of a head-dim-8
    model, and previous transfer outputs that a refused run must leave as they were."""
    from loki.pca import save_basis

    fp = {"name": "m", "model_type": "llama", "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
          "head_dim": head_dim, "hidden_size": 16, "vocab_size": 10}
    for c in ("a", "b"):
        P = torch.linalg.qr(torch.randn(1, 1, head_dim, head_dim))[0]
        save_basis(tmp_path / "pca" / "m" / c / "pca.safetensors", {"post.components": P}, {"fingerprint": fp})
        (tmp_path / "keys" / "m" / c).mkdir(parents=True)
        (tmp_path / "keys" / "m" / c / "manifest.json").write_text("{}")
    out = tmp_path / "transfer"
    out.mkdir()
    before = {n: f"previous {n}" for n in ("transfer.csv", "transfer_per_layer.csv", "transfer.png")}
    for n, text in before.items():
        (out / n).write_text(text)
    ov = [f"results_dir={tmp_path}", "model.name=m", "transfer.corpora=[a,b]"]
    return ov, out, before


@pytest.mark.parametrize("dims,needle", [
    ("[128]", r"transfer.dims=\[128\]: \[128\] above the head dim 8"),
    ("[4,9]", r"\[9\] above the head dim 8"),
    ("[]", r"transfer.dims must be a non-empty list of ints >= 1"),
    ("[0,4]", r"transfer.dims must be a non-empty list of ints >= 1"),
    ("[2.5]", r"transfer.dims must be a non-empty list of ints >= 1"),
])
def test_transfer_dims_are_checked_before_anything_is_written(tmp_path, dims, needle):
    from loki.transfer import transfer_table

    ov, out, before = _transfer_results(tmp_path)
    with pytest.raises(LokiError, match=needle):
        transfer_table(compose_config([*ov, f"transfer.dims={dims}"]))
    assert {n: (out / n).read_text() for n in before} == before


def test_transfer_cli_bad_dims_exit_2_and_outputs_untouched(tmp_path):
    from loki_testutils import run_py

    ov, out, before = _transfer_results(tmp_path)
    res = run_py(["-m", "loki.transfer", *ov, "transfer.dims=[128]", f"hydra.run.dir={tmp_path / 'h'}"], check=False,
                 env={"WANDB_MODE": "disabled"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "transfer.dims=[128]" in res.stderr and "How to fix" in res.stderr
    assert {n: (out / n).read_text() for n in before} == before


def test_transfer_missing_basis_names_what_makes_it(tmp_path):
    from loki.transfer import transfer_table

    ov, _, _ = _transfer_results(tmp_path)
    (tmp_path / "pca" / "m" / "b" / "pca.safetensors").unlink()
    with pytest.raises(LokiError, match="(?s)corpus 'b' are missing.*loki.extract_keys corpus@calib=b.*"
                                        "loki.fit_pca corpus@calib=b.*ignores keys_dir and pca_path") as e:
        transfer_table(compose_config([*ov, f"pca_path={tmp_path}/elsewhere.safetensors"]))
    assert "or set pca_path" not in str(e.value)


def test_transfer_writes_all_three_outputs_readable(tmp_path, tiny_model_dir, text_file, umask):
    """The happy path on the tiny model (head dim 16): keys and bases of two corpora, then the stage; its three
    outputs replace the previous ones together, with the umask's modes."""
    import pandas as pd
    from loki_testutils import run_py

    from loki.extract_keys import extract
    from loki.fit_pca import fit

    ov, out, before = _transfer_results(tmp_path / "old")  # (only its stale outputs are used, copied below)
    model = [f"model.path={tiny_model_dir}", "model.name=tiny", "model.source=null", "device=cpu", "threads=1"]
    for c in ("a", "b"):
        keys, pca = tmp_path / "keys" / "tiny" / c, tmp_path / "pca" / "tiny" / c / "pca.safetensors"
        cfg = compose_config([*model, f"calib.path={text_file}", f"calib.name={c}", "calib.source=null",
                              f"keys_dir={keys}", f"pca_path={pca}", "extract.num_tokens=256", "extract.seq_len=64",
                              "extract.shard_tokens=128"])
        extract(cfg, keys, progress=False)
        fit(cfg, keys, pca, progress=False)
    (tmp_path / "transfer").mkdir()
    for n in before:
        (tmp_path / "transfer" / n).write_text((out / n).read_text())
    run_py(["-m", "loki.transfer", *model, f"results_dir={tmp_path}", "transfer.corpora=[a,b]", "transfer.dims=[2,16]",
            "transfer.plot_d=2", f"hydra.run.dir={tmp_path / 'h'}"], env={"WANDB_MODE": "disabled"})
    df = pd.read_csv(tmp_path / "transfer" / "transfer.csv")
    assert sorted(set(df.d)) == [2, 16] and len(df) == 2 * 2 * 2 * len(set(df.side))
    assert df[df.d == 16].explained_variance.round(6).eq(1.0).all()  # all dims: all the variance
    assert (tmp_path / "transfer" / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    for n in before:
        assert oct((tmp_path / "transfer" / n).stat().st_mode & 0o777) == oct(0o644), n


@pytest.mark.parametrize("target", ["model", "data", "calib"])
def test_prepare_never_replaces_the_users_own_files(tmp_path, target):
    """A config pointed at the user's own model folder or corpus file (model.path=..., data.path=...) still carries
    the embedded source; preparing it must refuse, not replace the user's files with the embedded resource."""
    from loki.prepare import prepare

    key = "model" if target == "model" else target
    mine = tmp_path / ("mymodel" if target == "model" else "my.txt")
    if target == "model":
        mine.mkdir()
        (mine / "my_weights.bin").write_bytes(b"precious")
    else:
        mine.write_text("my precious corpus\n")
    cfg = compose_config([f"resources_dir={tmp_path}/resources", f"{key}.path={mine}", f"{key}.name=mine"])
    with pytest.raises(LokiError, match=rf"(?s){mine} exists and is not where the embedded {key} is prepared.*"
                                        rf"set {key}.source=null"):
        prepare(cfg, target)
    if target == "model":
        assert [p.name for p in mine.iterdir()] == ["my_weights.bin"]
    else:
        assert mine.read_text() == "my precious corpus\n"
    assert not (tmp_path / "resources").exists() or not any((tmp_path / "resources").rglob("*.txt"))


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_damaged_model_file_is_one_clear_error(tmp_path, tiny_model_dir, damaged):
    """A truncated weights file, tokenizer or config (an interrupted copy or download) is a LokiError naming the
    file's folder, the underlying error and what to do, not a traceback from safetensors or json."""
    import shutil

    from loki.modeling import load_model, load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    f = folder / damaged
    assert f.exists(), sorted(p.name for p in folder.iterdir())
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    cfg = compose_config([f"model.path={folder}", "model.name=tiny", "model.source=null"])
    load = load_tokenizer if damaged == "tokenizer.json" else load_model
    with pytest.raises(LokiError, match=rf"(?s)could not load the (model|tokenizer) of 'tiny' from {folder}: "
                                        r"\w+(Error|Exception).*damaged or truncated.*copy or download"):
        load(cfg.model)
