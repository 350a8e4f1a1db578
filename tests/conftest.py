"""Shared pytest fixtures for chimle's tests (all CPU, all offline)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A temporary folder of real colour photos (the ones bundled with scikit-image,
    written as <name>.png). Session-scoped: treat it as read-only; copy it if a
    test needs to add or break files."""
    from chimle.imageio import builtin_photo_dir

    return builtin_photo_dir(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photos(photo_dir) -> list:
    """The photos of ``photo_dir`` as (3, H, W) float32 tensors in [0, 1], sorted by name."""
    from chimle.imageio import list_images, load_image

    return [load_image(p) for p in list_images(photo_dir)]
