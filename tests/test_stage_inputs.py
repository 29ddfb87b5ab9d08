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
