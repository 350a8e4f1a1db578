"""The photo corpus (``data.data: photos``): real photographs that Debian packages ship, for training the
8x super-resolution and colourisation models.

``scripts/fetch_photos.sh`` downloads the packages named in SOURCES (``apt-get download``), unpacks each
with ``dpkg -x`` into ROOT/<package>/ and runs ``build``, which

* takes exactly the files each Source names (an allow-list or a deny-list of names, whichever is shorter;
  a listed name that the package no longer ships is an error, so the corpus cannot change silently),
  including files inside Qt resource bundles (``.rcc``, GCompris) and Enlightenment backgrounds
  (``.edj``: the largest JPEG inside);
* drops photos under LONG_SIDE px on the long side (never upscaled) and photos with transparent pixels;
* de-duplicates: exact copies (the same pixels) and near copies (the same photo at another
  resolution or re-encoded: a 16x16 difference hash within NEAR_BITS bits), keeping the largest;
* drops any photo that matches one of scikit-image's photos (the held-out evaluation set);
* downscales to LONG_SIDE px on the long side (Lanczos) and writes PNGs atomically (a temporary name,
  then a rename) into DEST, removes PNGs of earlier runs that are no longer in the corpus, and writes
  DEST/.complete last.

    python scripts/photo_corpus.py packages          # the packages to download, one a line
    python scripts/photo_corpus.py complete DEST     # exit 0 if DEST already holds this corpus
    python scripts/photo_corpus.py build ROOT DEST   # build it from the unpacked packages

Needs Pillow and numpy only (scikit-image, a chimle dependency, for the held-out check).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None  # trusted files (Debian packages); wallpapers can be many megapixels

LONG_SIDE = 640
HASH_SIZE = 16  # the difference hash: HASH_SIZE x HASH_SIZE bits
NEAR_BITS = 20  # near copies differ in at most this many of the 256 bits (seen: 0-2; distinct photos: 37 or more)
MARKER = ".complete"


@dataclass(frozen=True)
class Source:
    """Photos of one Debian package, in one folder.

    ``folder``: a folder of the unpacked package, or ``BUNDLE.rcc!FOLDER`` for a folder inside a Qt
    resource bundle. ``pattern``: a glob over the names relative to that folder (``*`` and ``?`` do
    not match ``/``); symbolic links are skipped (another name for a file that is there). ``keep``: the
    allow-list, or ``drop``: the deny-list, of those names (at most one of them). ``turn``: files stored
    on their side, with the clockwise turn that makes them upright (as the package's own index records
    it, where no EXIF tag does)."""

    package: str
    folder: str
    pattern: str
    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    turn: tuple[tuple[str, int], ...] = ()


_GC = "usr/share/gcompris-qt/rcc/{0}.rcc!gcompris/src/activities/{0}/resource"
_OPENCV = "usr/share/doc/opencv-doc/examples"

SOURCES: tuple[Source, ...] = (
    # Desktop wallpapers
    Source("mate-backgrounds", "usr/share/backgrounds/mate/nature", "*.jpg"),
    Source(
        "lomiri-wallpapers-16.04",
        "usr/share/backgrounds",
        "*.jpg",
        drop=("analogpattern_by_Peter_Nerlich.jpg", "umang_by_Abhishek_Mudgal.jpg"),
    ),
    Source(
        "plasma-workspace-wallpapers",
        "usr/share/wallpapers",
        "*/contents/images/*",
        keep=tuple(
            f"{n}/contents/images/2560x1600.jpg"  # the other sizes are links to it
            for n in (
                "BytheWater",
                "ColorfulCups",
                "DarkestHour",
                "EveningGlow",
                "FallenLeaf",
                "OneStandsOut",
                "Path",
                "summer_1am",
            )
        ),
    ),
    Source(
        "enlightenment-data",
        "usr/share/enlightenment/data/backgrounds",
        "*.edj",
        keep=tuple(
            f"{n}.edj"
            for n in (
                "Bamboo",
                "God-Rays",
                "Green-Maple",
                "Lichen-Branches",
                "Mountain",
                "Peaks",
                "Red-Maple",
                "Sea-of-Lanterns",
                "Snow-Trees",
                "Spruce-Needles",
                "Sunset-Clouds",
                "Sunset-Hills",
                "White-Flower",
                "Yellow-Flower",
            )
        ),
    ),
    Source(
        "lxqt-themes",
        "usr/share/lxqt/wallpapers",
        "*",
        keep=(
            "Butterfly-Kenneth-Wimer.jpg",
            "Valendas.png",
            "after-the-rain.jpg",
            "appleflower.png",
            "beam.png",
            "butterfly.png",
            "cloud.png",
            "drop.png",
            "flowers.png",
            "fog.jpg",
            "this-is-not-windows.jpg",
        ),
    ),
    Source("sddm-theme-maldives", "usr/share/sddm/themes/maldives", "*.jpg", keep=("background.jpg",)),
    # Games and teaching programs
    Source("palapeli-data", "usr/share/palapeli/collection", "*.jpg"),
    Source("gcompris-qt-data", _GC.format("erase"), "*.webp"),
    Source("gcompris-qt-data", _GC.format("explore_farm_animals"), "animals/*.webp"),
    Source("gcompris-qt-data", _GC.format("explore_world_animals"), "animals/*.webp"),
    Source("gcompris-qt-data", _GC.format("explore_world_music"), "music/*.webp"),
    Source("gcompris-qt-data", _GC.format("explore_monuments"), "*/*.webp", drop=("usa/castleClinton.webp",)),
    Source(
        "gcompris-qt-data",
        _GC.format("details"),
        "image/*_background.webp",
        keep=tuple(
            f"image/{n}_background.webp"
            for n in (
                "Chenonceau",
                "EgeskovSlotSpejling",
                "EilanDonanCastle",
                "GizahPyramids",
                "Louvre_2007_02_24_c",
                "Nagoya",
                "Neuschwanstein",
                "OperaSidney",
                "TowerBridgeLondon",
            )
        ),
    ),
    Source("gcompris-qt-data", _GC.format("clickgame"), "sea*.webp"),
    Source("tuxpaint-data", "usr/share/tuxpaint/templates", "*.jpg"),
    Source(
        "tuxtype-data", "usr/share/tuxtype/images", "*.jpg", keep=(*(f"kcas{k}.jpg" for k in range(12)), "hidden.jpg")
    ),
    Source("puzzle-jigsaw", "usr/share/puzzle-jigsaw/samples", "*", keep=("pexels-photo-302304.jpeg",)),
    # Photo software, documentation and examples
    Source(
        "kphotoalbum",
        "usr/share/kphotoalbum/demo",
        "*.jpg",
        drop=("qt-logo.jpg",),
        turn=(("grand_canyon_1.jpg", 180), ("new_wave_1.jpg", 90), ("pool_2.jpg", 270), ("wayne.jpg", 90)),  # index.xml
    ),
    Source(
        "opencv-doc",
        f"{_OPENCV}/data",
        "*",
        keep=(
            "aero1.jpg",
            "aero3.jpg",
            "aloeL.jpg",
            "board.jpg",
            "building.jpg",
            "ela_original.jpg",
            "graf1.png",
            "leuvenA.jpg",
            "pca_test1.jpg",
            "stuff.jpg",
        ),
    ),
    Source(
        "opencv-doc",
        f"{_OPENCV}/text",
        "scenetext*.jpg",
        keep=(
            *(f"scenetext0{k}.jpg" for k in range(1, 7)),
            *(f"scenetext_segmented_word0{k}.jpg" for k in range(1, 6)),
        ),
    ),
    Source(
        "scribus-template",
        "usr/share/scribus/templates",
        "*/*.jpg",
        keep=(
            "br2/brightness.jpg",
            "br2/halfmoon.jpg",
            "br2/moon.jpg",
            "br2/nature.jpg",
            "br2/sunset.jpg",
            "cal2/moon.jpg",
            "menu2/pizza.jpg",
        ),
    ),
    Source(
        "hugin-data",
        "usr/share/hugin/xrc/data/help_en_EN",
        "*.jpg",
        keep=("800px-C_Marchi-GrandCentral-adj.jpg", "CA_tCA00.jpg"),
    ),
    Source(
        "qtdeclarative5-examples",
        "usr/lib/x86_64-linux-gnu/qt5/examples/quick/customitems/scrollbar/pics",
        "*.jpg",
        keep=("niagara_falls.jpg",),
    ),
    Source("python3-sklearn", "usr/lib/python3/dist-packages/sklearn/datasets/images", "*.jpg"),
)


def packages(sources: Iterable[Source] = SOURCES) -> list[str]:
    """The Debian packages the sources come from, sorted, each once."""
    return sorted({s.package for s in sources})


def sources_digest(sources: Iterable[Source] = SOURCES) -> str:
    """A short digest of the source lists and the settings: a changed list rebuilds the corpus."""
    text = repr((LONG_SIDE, HASH_SIZE, NEAR_BITS, tuple(sources)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def glob_match(name: str, pattern: str) -> bool:
    """Whether the relative path ``name`` matches the glob ``pattern`` (``*``, ``?``; neither matches ``/``)."""
    rx = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name) is not None


# -- containers ---------------------------------------------------------------------------------------


def rcc_entries(data: bytes) -> dict[str, bytes]:
    """The files of a Qt binary resource bundle (``rcc -binary``, format versions 1-3) as {path: bytes}.
    zlib-compressed entries are inflated; zstd-compressed ones (flag 4) are not supported."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource bundle")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node = 14 if version == 1 else 22

    def name(offset: int) -> str:
        (n,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        return data[names + offset + 6 : names + offset + 6 + 2 * n].decode("utf-16-be")

    out: dict[str, bytes] = {}
    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        p = tree + index * node
        name_offset, flags = struct.unpack(">IH", data[p : p + 6])
        path = f"{prefix}{name(name_offset)}" if index else ""
        if flags & 2:  # a directory: its children are count nodes from first
            count, first = struct.unpack(">II", data[p + 6 : p + 14])
            stack.extend((c, f"{path}/" if index else "") for c in range(first, first + count))
            continue
        (offset,) = struct.unpack(">I", data[p + 10 : p + 14])
        q = payload + offset
        (size,) = struct.unpack(">I", data[q : q + 4])
        blob = data[q + 4 : q + 4 + size]
        if flags & 4:
            raise ValueError(f"{path}: zstd-compressed resource")
        out[path] = zlib.decompress(blob[4:]) if flags & 1 else blob  # qCompress: 4-byte length, then zlib
    return out


def edj_largest_jpeg(data: bytes) -> bytes:
    """The largest JPEG image of an Enlightenment ``.edj`` file (an Eet archive; wallpapers keep each size
    of the photo as a plain JPEG entry ``edje/images/N``)."""
    magic, entries, _ = struct.unpack(">III", data[:12])
    if magic != 0x1EE70F42:
        raise ValueError("not an Eet archive")
    best = b""
    for k in range(entries):
        offset, size, _, name_offset, name_size, _ = struct.unpack(">6I", data[12 + 24 * k : 36 + 24 * k])
        name = data[name_offset : name_offset + name_size].rstrip(b"\0")
        blob = data[offset : offset + size]
        if name.startswith(b"edje/images/") and blob[:3] == b"\xff\xd8\xff" and len(blob) > len(best):
            best = blob
    if not best:
        raise ValueError("no JPEG image inside")
    return best


def source_files(root: Path, source: Source) -> Iterator[tuple[str, bytes, int]]:
    """(output name, image file bytes, clockwise turn in degrees) of each file the source names, in name
    order. Raises ValueError when a listed name is missing, or when nothing matches."""
    if source.keep and source.drop:
        raise ValueError(f"{source.package}: {source.folder} has both an allow-list and a deny-list")
    base = root / source.package
    folder, _, inner = source.folder.partition("!")
    if inner:
        members = rcc_entries((base / folder).read_bytes())
        prefix = inner.rstrip("/") + "/"
        files: dict[str, Callable[[], bytes]] = {
            k[len(prefix) :]: (lambda v=v: v) for k, v in members.items() if k.startswith(prefix)
        }
    else:
        files = {
            p.relative_to(base / folder).as_posix(): p.read_bytes
            for p in (base / folder).rglob("*")
            if p.is_file() and not p.is_symlink()
        }
    names = sorted(n for n in files if glob_match(n, source.pattern))
    listed = (*(source.keep or source.drop), *(n for n, _ in source.turn))
    missing = sorted(set(listed) - set(names))
    if missing:
        raise ValueError(f"{source.package}: {source.folder} has no {', '.join(missing)}")
    if source.keep:
        names = [n for n in names if n in source.keep]
    elif source.drop:
        names = [n for n in names if n not in source.drop]
    if not names:
        raise ValueError(f"{source.package}: nothing matches {source.pattern} in {source.folder}")
    stem = Path(folder).stem if inner else ""
    turns = dict(source.turn)
    for n in names:
        data = files[n]()
        if n.endswith(".edj"):
            data = edj_largest_jpeg(data)
        label = "_".join(x for x in (source.package, stem, n.rsplit(".", 1)[0]) if x)
        yield re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace("/", "_")), data, turns.get(n, 0)


# -- images ---------------------------------------------------------------------------------------------


_TURNS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def open_photo(data: bytes, turn: int = 0) -> Image.Image:
    """A photo file as an upright RGB image (its EXIF orientation applied, then ``turn`` degrees
    clockwise). Raises ValueError for one with transparent pixels."""
    im = Image.open(io.BytesIO(data))
    if max(im.size) >= 8 * LONG_SIDE:  # JPEG: decode at 1/4 scale or finer (still >= 2x the output)
        im.draft("RGB", (im.width // 4, im.height // 4))
    im = ImageOps.exif_transpose(im)
    if turn:
        im = im.transpose(_TURNS[turn])
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ValueError("transparent pixels")
    return im.convert("RGB")


def downscale(im: Image.Image, long_side: int = LONG_SIDE) -> Image.Image:
    """``im`` resized (Lanczos) so that its long side is ``long_side`` px, the aspect ratio kept; an image
    already that size is returned as it is. Raises ValueError for a smaller one (never upscaled)."""
    w, h = im.size
    if max(w, h) < long_side:
        raise ValueError(f"{w}x{h} is under {long_side} px on the long side")
    if max(w, h) == long_side:
        return im
    s = long_side / max(w, h)
    size = (long_side, max(1, round(h * s))) if w >= h else (max(1, round(w * s)), long_side)
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def dhash(im: Image.Image, size: int = HASH_SIZE) -> np.ndarray:
    """A difference hash: ``size`` x ``size`` booleans, whether each pixel of the grey image shrunk to
    (size + 1) x size is brighter than its right neighbour. Resolution and re-encoding barely change it."""
    g = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.BOX), dtype=np.int16)
    return (g[:, 1:] > g[:, :-1]).ravel()


@dataclass
class Photo:
    """A kept candidate: its output name, the downscaled image and what de-duplication compares."""

    name: str
    pixels: int  # of the source file: the largest copy of a photo is the one kept
    digest: str  # of the downscaled pixels, for exact copies
    hash: np.ndarray
    image: Image.Image  # downscaled


def dedupe(photos: list[Photo], near_bits: int = NEAR_BITS) -> tuple[list[Photo], list[tuple[str, str]]]:
    """The photos without exact or near copies (hash distance <= near_bits), keeping the one with the
    most source pixels of each group (the first on a tie), in input order; and (dropped, kept) name pairs."""
    n = len(photos)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n:
        hashes = np.stack([p.hash for p in photos])
        dist = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)
        for i in range(n):
            for j in range(i + 1, n):
                if dist[i, j] <= near_bits or photos[i].digest == photos[j].digest:
                    parent[find(j)] = find(i)
    best: dict[int, int] = {}
    for i in range(n):
        r = find(i)
        if r not in best or photos[i].pixels > photos[best[r]].pixels:
            best[r] = i
    keep = sorted(best.values())
    dropped = [(photos[i].name, photos[best[find(i)]].name) for i in range(n) if best[find(i)] != i]
    return [photos[i] for i in keep], dropped


def load_photo(name: str, data: bytes, turn: int = 0) -> Photo:
    """A source file as a Photo (downscaled). Raises ValueError when it is not kept (too small, transparent)."""
    with Image.open(io.BytesIO(data)) as im:
        pixels = im.width * im.height
    small = downscale(open_photo(data, turn))
    digest = hashlib.sha256(small.tobytes()).hexdigest()
    return Photo(name, pixels, digest, dhash(small), small)


def held_out_hashes() -> list[tuple[str, np.ndarray]]:
    """The difference hashes of scikit-image's photos (the held-out evaluation set), by file name."""
    import skimage.data  # a chimle dependency

    folder = Path(skimage.data.__file__).parent
    out = []
    for f in sorted(folder.glob("*")):
        if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(f) as im:
                out.append((f.name, dhash(im.convert("RGB"))))
    return out


def write_png(im: Image.Image, path: Path) -> None:
    """Save ``im`` as a PNG atomically: a temporary name in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_complete(dest: Path, sources: Iterable[Source] = SOURCES) -> bool:
    """Whether ``dest`` holds the corpus of these source lists (its marker names their digest and the
    number of PNGs, and that many are there)."""
    try:
        digest, count = (dest / MARKER).read_text().split()
    except (OSError, ValueError):
        return False
    return digest == sources_digest(sources) and len(list(dest.glob("*.png"))) == int(count)


def build(root: Path, dest: Path, sources: Iterable[Source] = SOURCES, log: Callable[[str], None] = print) -> int:
    """Build the corpus from the unpacked packages under ``root`` into ``dest``; returns the photo count."""
    sources = tuple(sources)
    photos: list[Photo] = []
    for source in sources:
        for name, data, turn in source_files(root, source):
            try:
                photos.append(load_photo(name, data, turn))
            except ValueError as e:
                log(f"  left out {name}: {e}")
    kept, dropped = dedupe(photos)
    for a, b in dropped:
        log(f"  left out {a}: a copy of {b}")
    held = held_out_hashes()
    clean = []
    for p in kept:
        match = [f for f, h in held if int((h != p.hash).sum()) <= NEAR_BITS]
        if match:
            log(f"  left out {p.name}: matches scikit-image's {match[0]} (held out)")
        else:
            clean.append(p)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MARKER).unlink(missing_ok=True)
    names = {f"{p.name}.png" for p in clean}
    for p in clean:
        write_png(p.image, dest / f"{p.name}.png")
    for f in dest.glob("*.png"):
        if f.name not in names:
            f.unlink()
    (dest / MARKER).write_text(f"{sources_digest(sources)} {len(clean)}\n")
    return len(clean)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("packages", help="the Debian packages to download, one a line")
    c = sub.add_parser("complete", help="exit 0 if DEST already holds this corpus")
    c.add_argument("dest", type=Path)
    b = sub.add_parser("build", help="build the corpus from ROOT/<package>/ (dpkg -x trees) into DEST")
    b.add_argument("root", type=Path)
    b.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "packages":
        print("\n".join(packages()))
        return 0
    if a.cmd == "complete":
        return 0 if is_complete(a.dest) else 1
    n = build(a.root, a.dest)
    print(f"wrote {n} photos into {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
