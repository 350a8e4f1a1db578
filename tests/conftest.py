"""Shared pytest fixtures for chimle's tests (all CPU, all offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A temporary folder of real colour photos (the ones bundled with scikit-image,
    written as <name>.png). Session-scoped: treat it as read-only; copy it if a
    test needs to add or break files."""
    from chimle.data.imageio import builtin_photo_dir

    return builtin_photo_dir(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photos(photo_dir) -> list:
    """The photos of ``photo_dir`` as (3, H, W) float32 tensors in [0, 1], sorted by name."""
    from chimle.data.imageio import list_images, load_image

    return [load_image(p) for p in list_images(photo_dir)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`). For
    modules of many small ops (tiny towers, small crops), where a second thread only adds
    synchronisation: on a busy 2-core machine OpenMP threads waiting for each other turn seconds into
    minutes (measured under load: the IvO test 7 s with 1 thread, 154 s with 2). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
