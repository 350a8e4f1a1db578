"""Tests for chimle.data and chimle.imageio: tasks, resampling, Lab, datasets, file IO."""

from __future__ import annotations

import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from chimle.data import TASKS, ImageDataset, make_task
from chimle.data.imageio import (
    ImageError,
    builtin_photo_dir,
    builtin_photos,
    list_images,
    load_image,
    save_image,
    to_uint8,
)
from chimle.data.tasks import compose_lab, lab_to_rgb, rgb_to_ab01, rgb_to_l01, rgb_to_lab
from chimle.model import TowerConfig, TowerModel
from chimle.resample import downsample, quantize8, resize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


def in_unit_range(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and bool(x.min() >= 0) and bool(x.max() <= 1)


def is_8bit(x: torch.Tensor) -> bool:
    return torch.allclose(x * 255, (x * 255).round(), atol=1e-3)


# ---------------------------------------------------------------------------
# built-in photos


def test_builtin_photos_offline_and_exact(photo_dir, photos):
    import skimage.data

    names = [p.stem for p in list_images(photo_dir)]
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(names)
    assert all(p.shape[0] == 3 and in_unit_range(p) for p in photos)
    astro = photos[names.index("astronaut")]
    assert np.array_equal(to_uint8(astro).permute(1, 2, 0).numpy(), skimage.data.astronaut())
    assert len(builtin_photos()) == len(photos)


def test_builtin_photo_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIMLE_CACHE", str(tmp_path / "c"))
    d = builtin_photo_dir()
    assert d == tmp_path / "c" / "photos"
    first = sorted(d.glob("*.png"))
    assert first and builtin_photo_dir() == d and sorted(d.glob("*")) == first  # idempotent, no temp files


# ---------------------------------------------------------------------------
# tasks on real photos


@pytest.mark.parametrize("scale", [8, 16])
def test_sr_pairs(photo_dir, scale):
    task = make_task("sr", scale=scale)
    assert task.layout == "upscale" and task.scale == scale
    for train in (True, False):
        ds = ImageDataset(photo_dir, task, crop=128, train=train)
        assert ds.levels == int(np.log2(scale))
        for i in range(len(ds)):
            item = ds[i]
            x, y = item["input"], item["target"]
            assert y.shape == (3, 128, 128) and x.shape == (3, 128 // scale, 128 // scale)
            assert in_unit_range(x) and in_unit_range(y) and is_8bit(x)
            assert (x - downsample(y, scale)).abs().max() <= 0.5 / 255 + 1e-6


def test_sr_levels_must_match_scale(photo_dir):
    with pytest.raises(ValueError, match="levels=4"):
        ImageDataset(photo_dir, make_task("sr", scale=16), crop=128, levels=3)
    with pytest.raises(ValueError, match="power of two"):
        make_task("sr", scale=6)


def test_colorize_pairs(photo_dir):
    task = make_task("colorize")
    assert (task.in_channels, task.out_channels, task.layout) == (1, 2, "same")
    ds = ImageDataset(photo_dir, task, crop=64, levels=3, train=False)
    batch = torch.stack([ds[i]["target"] for i in range(len(ds))])
    inp = torch.stack([ds[i]["input"] for i in range(len(ds))])
    assert inp.shape == (len(ds), 1, 64, 64) and in_unit_range(inp)
    ab = rgb_to_ab01(batch)
    assert ab.shape == (len(ds), 2, 64, 64) and in_unit_range(ab)
    rgb = task.rgb(ab, inp)  # the true chroma must give back the photo
    assert in_unit_range(rgb) and torch.allclose(rgb, batch, atol=1e-4)
    # a coarser level's output is composed with the input resized to it (Task.rgb resizes x itself)
    small = task.rgb(resize(ab, (16, 16)), inp)
    assert small.shape == (len(ds), 3, 16, 16)
    torch.testing.assert_close(small, compose_lab(resize(inp, (16, 16)), resize(ab, (16, 16))))
    assert (small - resize(batch, (16, 16))).abs().mean() < 0.02  # still close to the photo at 16 px
    # RGB tasks pass outputs through; grey outputs are replicated
    out = torch.rand(2, 3, 8, 8)
    assert make_task("jpeg").rgb(out, out) is out
    grey = make_task("paired", in_channels=1, out_channels=1).rgb(out[:, :1], out[:, :1])
    assert grey.shape == (2, 3, 8, 8) and torch.equal(grey[:, 2], out[:, 0])


def test_jpeg_q1(photo_dir):
    task = make_task("jpeg")
    assert task.quality == 1
    for item in ImageDataset(photo_dir, task, crop=96, train=False):
        x, y = item["input"], item["target"]
        assert x.shape == y.shape == (3, 96, 96) and in_unit_range(x)
        assert (x - y).abs().mean() > 0.01  # visibly degraded ...
        assert abs(x.mean() - y.mean()) < 0.05  # ... but the same picture


def test_night_is_darker_and_seeded(photos):
    task = make_task("night")
    y = photos[0][:, :128, :128]
    x = task.degrade(y, 3)
    assert x.shape == y.shape and in_unit_range(x) and is_8bit(x)
    assert x.mean() < 0.5 * y.mean()
    assert x[2].mean() > x[0].mean()  # blue tint
    assert torch.equal(x, task.degrade(y, torch.Generator().manual_seed(3)))
    assert not torch.equal(x, task.degrade(y, 4))
    xb = task.degrade(torch.stack([y, y]), 0)  # batched works too
    assert xb.shape == (2, 3, 128, 128)


def test_task_registry():
    assert set(TASKS) == {"sr", "colorize", "jpeg", "night", "paired", "layout", "digit_sr", "digit_complete"}
    for name in TASKS:
        t = make_task(name)
        assert t.layout in ("same", "upscale") and make_task(**t.config()) == t
    with pytest.raises(ValueError, match="unknown task"):
        make_task("deblur")
    with pytest.raises(TypeError, match="quality"):
        make_task("jpeg", qualty=5)


# ---------------------------------------------------------------------------
# paired


def test_paired_aligned_crops(tmp_path, photo_dir):
    tgt, inp = tmp_path / "day", tmp_path / "night"
    shutil.copytree(photo_dir, tgt)
    shutil.copytree(photo_dir, inp)
    ds = ImageDataset(tgt, "paired", crop=64, train=True, input_root=inp)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for item in ds:  # identical files: any misaligned crop or flip would show
            assert torch.equal(item["input"], item["target"])
    # a real degradation, read back from files
    night = make_task("night")
    for p in list_images(photo_dir):
        save_image(night.degrade(load_image(p), 0), inp / p.name)
    ds = ImageDataset(tgt, "paired", crop=64, train=False, input_root=inp)
    item = ds[0]
    assert item["input"].mean() < item["target"].mean()


def test_paired_unmatched_names(tmp_path, photo_dir):
    tgt, inp = tmp_path / "day", tmp_path / "night"
    shutil.copytree(photo_dir, tgt)
    inp.mkdir()
    for p in list(list_images(photo_dir))[:2]:
        shutil.copy(p, inp / p.name)
    shutil.copy(p, inp / "stray.png")
    with pytest.raises(ValueError) as e:
        ImageDataset(tgt, "paired", crop=64, input_root=inp)
    msg = str(e.value)
    assert "stray (input only)" in msg and "rocket (target only)" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="input_root"):
        ImageDataset(tgt, "paired", crop=64)


def test_paired_size_mismatch_names_file(tmp_path, photo_dir):
    tgt, inp = tmp_path / "day", tmp_path / "night"
    shutil.copytree(photo_dir, tgt)
    shutil.copytree(photo_dir, inp)
    save_image(downsample(load_image(inp / "coffee.png"), 2), inp / "coffee.png")
    with pytest.raises(ValueError, match="coffee.png"):
        ImageDataset(tgt, "paired", crop=64, input_root=inp)


# ---------------------------------------------------------------------------
# Lab


def test_lab_matches_skimage(photos):
    from skimage.color import lab2rgb, rgb2lab

    rgb = photos[1]
    ref = rgb2lab(rgb.permute(1, 2, 0).double().numpy())
    lab64 = rgb_to_lab(rgb.double()).permute(1, 2, 0).numpy()
    assert np.abs(lab64 - ref).max() < 1e-4
    assert np.abs(rgb_to_lab(rgb).permute(1, 2, 0).numpy() - ref).max() < 1e-3  # float32
    back = lab_to_rgb(torch.from_numpy(ref).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.abs(back - lab2rgb(ref)).max() < 1e-4
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4)


def test_lab_batched_and_differentiable(photos):
    x = torch.stack([p[:, :32, :32] for p in photos[:3]])
    x[0, :, :4, :4] = 0.0  # black and white pixels sit on the formulas' branch points
    x[0, :, 4:8, :4] = 1.0
    assert torch.allclose(rgb_to_lab(x)[1], rgb_to_lab(x[1]))
    x.requires_grad_(True)
    l01, ab01 = rgb_to_l01(x), rgb_to_ab01(x)
    assert in_unit_range(l01.detach()) and l01.shape == (3, 1, 32, 32)
    compose_lab(l01, ab01).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# resampling


def test_input_pyramid_is_per_image_downsampling(photos):
    """The "same" layout feeds level l the input resized to it: per image, the resampling of chimle.resample."""
    batch = torch.stack([p[:, :64, :64] for p in photos])
    model = TowerModel(TowerConfig.preset("tiny", layout="same"))
    inputs = model.initial_state(batch).inputs
    assert [t.shape[-1] for t in inputs] == [16, 32, 64] and inputs[-1] is batch
    for level, t in enumerate(inputs[:-1]):
        f = 2 ** (2 - level)
        for i, p in enumerate(batch):
            assert torch.allclose(t[i], downsample(p, f), atol=1e-6)
    lr = batch[:, :, :8, :8]
    assert model.initial_state(lr).inputs[0].shape[-1] == 2
    assert TowerModel(TowerConfig.preset("tiny", layout="upscale")).initial_state(lr).inputs == [lr]
    with pytest.raises(ValueError, match="divisible by 2\\^\\(levels-1\\) = 4"):
        model.initial_state(batch[:, :, :30, :30])


def test_eight_bit_rounding_not_truncation(tmp_path):
    v = 100.7 / 255  # truncation gives 100, rounding 101
    img = torch.full((3, 16, 16), v)
    assert torch.allclose(downsample(img, 4, quantize=True), torch.full((3, 4, 4), 101 / 255))
    assert torch.allclose(quantize8(img), torch.full_like(img, 101 / 255))
    assert int(to_uint8(img)[0, 0, 0]) == 101
    save_image(img, tmp_path / "v.png")
    assert torch.allclose(load_image(tmp_path / "v.png"), torch.full_like(img, 101 / 255))
    y = make_task("sr", scale=4).degrade(img)
    assert torch.allclose(y, torch.full((3, 4, 4), 101 / 255))


# ---------------------------------------------------------------------------
# crops and seeds


def test_eval_crops_deterministic(photo_dir):
    a = ImageDataset(photo_dir, "night", crop=64, train=False, seed=5)
    b = ImageDataset(photo_dir, "night", crop=64, train=False, seed=5)
    a.set_epoch(3)  # eval ignores epochs
    for i in range(len(a)):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["input"], ib["input"]) and torch.equal(ia["target"], ib["target"])
        assert ia["name"] == ib["name"] and ia["index"] == i
    img = load_image(a.paths[0])
    h, w = img.shape[-2:]
    assert torch.equal(a[0]["target"], img[:, (h - 64) // 2 : (h - 64) // 2 + 64, (w - 64) // 2 : (w - 64) // 2 + 64])


def test_train_crops_vary_but_reproduce(photo_dir):
    def crops(seed, epoch):
        ds = ImageDataset(photo_dir, "night", crop=64, train=True, seed=seed)
        ds.set_epoch(epoch)
        return torch.stack([ds[i]["target"] for i in range(len(ds))]), torch.stack(
            [ds[i]["input"] for i in range(len(ds))]
        )

    t0, x0 = crops(0, 0)
    t0b, x0b = crops(0, 0)
    assert torch.equal(t0, t0b) and torch.equal(x0, x0b)
    assert not torch.equal(t0, crops(0, 1)[0])
    assert not torch.equal(t0, crops(1, 0)[0])


def test_small_images_are_upscaled_and_prescale(tmp_path, photos):
    save_image(photos[0][:, :40, :100], tmp_path / "small.png")
    ds = ImageDataset(tmp_path, "jpeg", crop=64, train=True)
    assert ds[0]["target"].shape == (3, 64, 64)
    # prescale 2: 512x512 -> 256x256 before cropping; centre crop of that is the whole image
    save_image(photos[0], tmp_path / "big.png")
    ds = ImageDataset([tmp_path / "big.png"], "jpeg", crop=256, train=False, prescale=2)
    assert torch.allclose(ds[0]["target"], downsample(load_image(tmp_path / "big.png"), 2))
    ds = ImageDataset([tmp_path / "big.png"], "jpeg", crop=384, train=False, prescale=4)
    assert ds._load(0)[0].shape == (3, 384, 384)  # never prescaled below the crop


def test_dataloader_batches(photo_dir):
    from torch.utils.data import DataLoader

    ds = ImageDataset(photo_dir, "colorize", crop=32, levels=2, train=True, cache=True)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input"].shape == (4, 1, 32, 32) and batch["target"].shape == (4, 3, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3] and len(batch["name"]) == 4
    with pytest.raises(ValueError, match="multiple of 4"):
        ImageDataset(photo_dir, "colorize", crop=30, levels=3)


# ---------------------------------------------------------------------------
# image files: modes and bad files


def test_load_modes(tmp_path):
    g16 = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(3, 0)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png")
    assert x.shape == (3, 3, 4) and torch.allclose(x[:, 0], torch.tensor(g16[0] / 65535.0, dtype=torch.float32))

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png")
    assert x.shape == (3, 4, 4)
    assert torch.equal(x[:, 0, 0], torch.tensor([1.0, 0, 0])) and torch.equal(x[:, 3, 0], torch.ones(3))

    pal = Image.new("P", (5, 3))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png")
    x = load_image(tmp_path / "pal.png")
    assert x.shape == (3, 3, 5) and torch.allclose(x[:, 1, 1] * 255, torch.tensor([10.0, 200, 30]))

    Image.new("LA", (3, 2), (128, 255)).save(tmp_path / "la.png")
    assert torch.allclose(load_image(tmp_path / "la.png"), torch.full((3, 2, 3), 128 / 255))
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    x = load_image(tmp_path / "cmyk.jpg")
    assert x.shape == (3, 2, 3) and x[0].mean() > 0.9 and x[1:].mean() < 0.1
    Image.new("L", (3, 2), 51).save(tmp_path / "grey.bmp")
    assert torch.allclose(load_image(tmp_path / "grey.bmp"), torch.full((3, 2, 3), 0.2))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert load_image(tmp_path / "rot.jpg").shape == (3, 6, 2)


def _one_line_naming(err: ImageError, path) -> None:
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and msg.startswith("bad image")


def test_bad_files(tmp_path, photos):
    save_image(photos[0], tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="truncated") as e:
        load_image(tmp_path / "half.jpg")
    _one_line_naming(e.value, tmp_path / "half.jpg")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no PIL traceback chained
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(tmp_path / "text.png")
    _one_line_naming(e.value, tmp_path / "text.png")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    assert isinstance(e.value, ValueError)
    again = pickle.loads(pickle.dumps(e.value))  # must survive DataLoader workers
    assert str(again) == str(e.value)


def test_skip_bad(tmp_path, photo_dir):
    root = tmp_path / "mixed"
    shutil.copytree(photo_dir, root)
    n_good = len(list_images(root))
    data = (root / "astronaut.png").read_bytes()
    (root / "aaa_half.png").write_bytes(data[: len(data) // 3])
    (root / "zzz_text.jpg").write_text("nope")
    with pytest.raises(ImageError) as e:  # at construction, first bad file in order
        ImageDataset(root, "jpeg", crop=64)
    assert "aaa_half.png" in str(e.value)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageDataset(root, "jpeg", crop=64, bad_files="skip")
    assert len(w) == 1 and "skipped 2 " in str(w[0].message)
    assert len(ds) == n_good and [p.split("/")[-1] for p, _ in ds.skipped] == ["aaa_half.png", "zzz_text.jpg"]
    assert "aaa_half" not in ds.names and ds[0]["target"].shape == (3, 64, 64)


def test_list_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)
    for rel in ["b.PNG", "a/c.jpeg", "a.txt", ".hidden.png", ".git/x.png", "a/b.webp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a/b.webp", "a/c.jpeg", "b.PNG"]


def test_save_image_checks_and_atomic(tmp_path):
    save_image(torch.rand(1, 8, 8), tmp_path / "sub" / "g.png")
    assert load_image(tmp_path / "sub" / "g.png").shape == (3, 8, 8)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["g.png"]
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        save_image(torch.rand(3, 8, 8) * 255, tmp_path / "x.png")
    with pytest.raises(ValueError, match="extension"):
        save_image(torch.rand(3, 8, 8), tmp_path / "x.xyz")
    assert not list(tmp_path.glob(".*"))


def test_truncation_detected_even_if_pil_is_lenient(tmp_path, photos, monkeypatch):
    from PIL import ImageFile

    save_image(photos[0], tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "half.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
