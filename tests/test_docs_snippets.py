"""Every Python block of the README and of the documentation site runs as written.

Each block is executed on its own (a fresh namespace, the working directory a temporary folder holding
the files the blocks name: `photo.png`, `grey.png`, `CHIMLE_SR.pth`), so a block that needs a name
defined elsewhere, an import it forgot or an API that changed fails here. Some blocks also get their
results checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks() -> list[tuple[str, int, str]]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [
        (str(f.relative_to(ROOT)), i, m.group(1)) for f in files for i, m in enumerate(FENCE.finditer(f.read_text()))
    ]


BLOCKS = blocks()


def test_the_blocks_are_found():
    """The README has its two Python blocks: a changed fence (or a renamed file) must not skip them all."""
    names = [f for f, _, _ in BLOCKS]
    assert names.count("README.md") == 2 and len(BLOCKS) >= 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, photos) -> Path:
    from test_convert import authors_from_chimle, tiny_cfg

    from chimle.data.imageio import save_image
    from chimle.model import TowerModel
    from chimle.resample import resize

    d = tmp_path_factory.mktemp("snippets")
    photo = resize(photos[1][None, :, :160, :160], (48, 48))[0].clamp(0, 1)  # the cat, small
    save_image(photo, d / "photo.png")
    save_image(photo.mean(0, keepdim=True), d / "grey.png")
    torch.manual_seed(0)
    torch.save(authors_from_chimle(TowerModel(tiny_cfg("sr")), "Super_Resolution"), d / "CHIMLE_SR.pth")
    return d


def _check(name: str, code: str, ns: dict, cwd: Path) -> None:
    """What some blocks must have produced, beyond running."""
    if "chimle.sample(" in code:  # the README's photo example: 4 files of 8x the photo's size
        from chimle.data.imageio import load_image

        assert ns["samples"].shape == (4, 3, 384, 384)
        assert [load_image(cwd / f"sample_{i}.png").shape for i in range(4)] == [(3, 384, 384)] * 4
    if "hierarchical(" in code:  # one distance per input, and the chosen codes draw outputs that far
        assert ns["dists"].shape == (2,) and bool((ns["dists"] > 0).all())
    if "save_code(" in code:
        assert (cwd / "pick.npz").stat().st_size > 0


@pytest.mark.parametrize(("name", "index", "code"), BLOCKS, ids=[f"{f}:{i}" for f, i, _ in BLOCKS])
def test_block_runs(name, index, code, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    ns: dict = {"__name__": "__main__"}
    exec(compile(code, f"{name} (python block {index})", "exec"), ns)  # noqa: S102 - our own documentation
    _check(name, code, ns, workdir)
