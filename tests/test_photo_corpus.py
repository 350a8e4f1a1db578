"""scripts/photo_corpus.py (the photo corpus: de-duplication, downscaling, the build) and the library's
`data.data: photos` folder. Tiny synthetic photos: smooth random colour fields, distinct per seed."""

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chimle.data.imageio import photo_corpus_dir

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "photo_corpus.py"
_spec = importlib.util.spec_from_file_location("photo_corpus", _PATH)
pc = importlib.util.module_from_spec(_spec)
sys.modules["photo_corpus"] = pc  # dataclasses look their module up
_spec.loader.exec_module(pc)


def _photo(seed: int, size: tuple[int, int] = (900, 600)) -> Image.Image:
    """A smooth random colour field of ``size`` (w, h): the same seed gives the same picture at any size."""
    field = np.random.default_rng(seed).random((6, 9, 3)) * 255
    return Image.fromarray(field.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def _bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_downscale_gives_640_px_on_the_long_side():
    assert pc.downscale(_photo(0, (1000, 700))).size == (640, 448)
    assert pc.downscale(_photo(0, (700, 1000))).size == (448, 640)
    assert pc.downscale(_photo(0, (640, 480))).size == (640, 480)
    with pytest.raises(ValueError, match="^639x400 is under 640 px on the long side$"):
        pc.downscale(_photo(0, (639, 400)))


def test_dedupe_keeps_the_largest_copy_of_a_photo_and_both_of_two_different_photos():
    big = pc.load_photo("a_big", _bytes(_photo(1, (1200, 800))))
    small = pc.load_photo("a_small", _bytes(_photo(1, (800, 533)), "JPEG"))  # another size, re-encoded
    other = pc.load_photo("b", _bytes(_photo(2, (900, 600))))
    assert int((big.hash != small.hash).sum()) <= pc.NEAR_BITS < int((big.hash != other.hash).sum())
    kept, dropped = pc.dedupe([small, other, big])
    assert [p.name for p in kept] == ["b", "a_big"]
    assert dropped == [("a_small", "a_big")]
    kept, dropped = pc.dedupe([big, other])
    assert [p.name for p in kept] == ["a_big", "b"] and dropped == []


def test_build_writes_the_kept_photos_once_and_knows_when_it_is_complete(tmp_path):
    folder = tmp_path / "root" / "pkg" / "usr" / "share" / "pics"
    folder.mkdir(parents=True)
    _photo(1, (1200, 800)).save(folder / "a.png")
    _photo(1, (800, 533)).save(folder / "a_small.jpg")  # the same photo, smaller
    _photo(2, (600, 900)).save(folder / "b.jpg")
    _photo(3, (500, 300)).save(folder / "tiny.png")  # under 640 px: left out
    see_through = _photo(4).convert("RGBA")
    see_through.putpixel((0, 0), (0, 0, 0, 0))
    see_through.save(folder / "cutout.png")  # transparent pixels: left out
    _photo(5).save(folder / "logo.png")  # not on the allow-list
    sources = (
        pc.Source("pkg", "usr/share/pics", "*", keep=("a.png", "a_small.jpg", "b.jpg", "tiny.png", "cutout.png")),
    )
    dest = tmp_path / "corpus"
    (dest / "stale").mkdir(parents=True)
    _photo(6).save(dest / "old.png")  # from an earlier corpus: removed
    log: list[str] = []
    assert not pc.is_complete(dest, sources)
    assert pc.build(tmp_path / "root", dest, sources, log=log.append) == 2
    files = sorted(f.name for f in dest.iterdir() if f.is_file())
    assert files == [".complete", "pkg_a.png", "pkg_b.png"]
    with Image.open(dest / "pkg_a.png") as a, Image.open(dest / "pkg_b.png") as b:
        assert (a.size, b.size) == ((640, 427), (427, 640))
    assert sorted(log) == [
        "  left out pkg_a_small: a copy of pkg_a",
        "  left out pkg_cutout: transparent pixels",
        "  left out pkg_tiny: 500x300 is under 640 px on the long side",
    ]
    assert pc.is_complete(dest, sources)
    assert not pc.is_complete(dest, (*sources, pc.Source("pkg", "usr/share/pics", "*.png")))
    (dest / "pkg_b.png").unlink()
    assert not pc.is_complete(dest, sources)


def test_a_listed_file_that_the_package_lacks_is_an_error(tmp_path):
    folder = tmp_path / "pkg" / "pics"
    folder.mkdir(parents=True)
    _photo(1).save(folder / "a.jpg")
    (folder / "sub").mkdir()
    _photo(2).save(folder / "sub" / "b.jpg")
    assert [n for n, _, _ in pc.source_files(tmp_path, pc.Source("pkg", "pics", "*.jpg"))] == ["pkg_a"]  # * stops at /
    with pytest.raises(ValueError, match=r"^pkg: pics has no gone\.jpg$"):
        list(pc.source_files(tmp_path, pc.Source("pkg", "pics", "*.jpg", drop=("gone.jpg",))))


def test_a_photo_stored_on_its_side_is_turned_upright(tmp_path):
    folder = tmp_path / "pkg" / "pics"
    folder.mkdir(parents=True)
    im = Image.new("RGB", (900, 600), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 450, 600))  # red left half: a clockwise quarter turn puts it on top
    im.save(folder / "side.png")
    [(name, data, turn)] = pc.source_files(tmp_path, pc.Source("pkg", "pics", "*", turn=(("side.png", 90),)))
    upright = pc.load_photo(name, data, turn).image
    assert upright.size == (427, 640)
    assert upright.getpixel((213, 100)) == (255, 0, 0) and upright.getpixel((213, 540)) == (0, 0, 255)


def test_the_photos_keyword_folder_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        photo_corpus_dir()
    assert str(e.value) == f"no photo corpus in {tmp_path / 'photo_corpus'}: run scripts/fetch_photos.sh first"
    (tmp_path / "photo_corpus").mkdir()
    with pytest.raises(FileNotFoundError, match="run scripts/fetch_photos.sh first"):
        photo_corpus_dir()  # an empty folder is no corpus
    _photo(0).save(tmp_path / "photo_corpus" / "x.png")
    assert photo_corpus_dir() == tmp_path / "photo_corpus"
    assert photo_corpus_dir(tmp_path / "photo_corpus") == tmp_path / "photo_corpus"
