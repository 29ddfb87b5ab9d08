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
