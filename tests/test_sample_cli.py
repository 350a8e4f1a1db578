"""Sampling and the command line: N different outputs and a grid, from-level, errors as one line."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from chimle.apps.cli import main
from chimle.data.imageio import list_images, load_image, save_image, to_uint8
from chimle.data.tasks import make_task
from chimle.inference.sample import generate
from chimle.inference.tiling import pad_to_tower
from chimle.inference.weights import load_with_task
from chimle.model import TowerConfig, TowerModel
from chimle.rng import seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting


@pytest.fixture(scope="module")
def weights(tmp_path_factory, photo_dir):
    """A briefly trained tiny 4x SR tower, exported as safetensors."""
    out = tmp_path_factory.mktemp("run")
    rc = main(
        [
            "train",
            "--task",
            "sr",
            "--scale",
            "4",
            "--data",
            str(photo_dir),
            "--preset",
            "tiny",
            "--crop",
            "16",
            "--out",
            str(out),
            "--steps",
            "6",
            "--device",
            "cpu",
            "--set",
            "train.pool_size=4",
            "--set",
            "search.samples_per_level=[3,2]",
            "--set",
            "search.distance=alex",
            "--set",
            "train.sample_every=0",
        ]
    )
    assert rc == 0 and (out / "checkpoints" / "last.pt").exists()
    path = out / "w.safetensors"
    assert main(["export", str(out / "checkpoints" / "last.pt"), str(path)]) == 0
    return path


def test_sample_writes_n_different_outputs_and_grid(weights, photo_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    lr = load_image(list_images(photo_dir)[0])[:, :11, :13]  # odd, non-square low-res input
    save_image(lr, src / "a.png")
    out = tmp_path / "out"
    assert main(["sample", str(weights), str(src / "a.png"), "--num", "4", "--out", str(out), "--seed", "1"]) == 0
    files = sorted(out.glob("a_0*.png"))
    assert len(files) == 4
    imgs = [load_image(f) for f in files]
    assert all(tuple(i.shape) == (3, 44, 52) for i in imgs)  # 4x of the input, framing restored
    for i in range(4):
        for j in range(i + 1, 4):
            assert (imgs[i] - imgs[j]).abs().mean() > 1e-3  # different samples
    grid = load_image(out / "a_grid.png")
    assert grid.shape[-1] > 5 * 44  # input + 4 samples side by side
    # same seed, same samples
    out2 = tmp_path / "out2"
    main(["sample", str(weights), str(src), "--num", "4", "--out", str(out2), "--seed", "1"])
    assert torch.equal(load_image(out2 / "a_000.png"), imgs[0])


def test_degrade_grid_has_target_and_interpolate(weights, photos, tmp_path):
    # 128 px crops of two photos: the whole photos would be sampled at 4x (2048 px) for the same checks
    crops = [tmp_path / "crop0.png", tmp_path / "crop1.png"]
    for photo, path in zip(photos, crops):
        save_image(photo[:, :128, :128], path)
    out = tmp_path / "o"
    assert main(["sample", str(weights), str(crops[0]), "--num", "2", "--out", str(out), "--degrade"]) == 0
    assert (out / "crop0_grid.png").exists()
    out3 = tmp_path / "interp"
    assert (
        main(
            [
                "sample",
                str(weights),
                str(crops[1]),
                "--out",
                str(out3),
                "--interpolate",
                "--steps",
                "5",
            ]
        )
        == 0
    )
    frames = sorted(out3.glob("*_0*.png"))
    assert len(frames) == 5
    a, b, c = (load_image(frames[i]) for i in (0, 1, 4))
    assert (a - b).abs().mean() < (a - c).abs().mean()  # a smooth path: neighbours are closer


@pytest.mark.parametrize("layout", ["same", "upscale"])
def test_from_level_keeps_coarser_levels(layout):
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout=layout)).eval()
    x = torch.rand(2, 3, 16, 16) if layout == "same" else torch.rand(2, 3, 4, 4)
    for k in (2, 3):
        outs = generate(model, x, 3, seeded(k), from_level=k, all_levels=True)
        for l in range(model.cfg.levels):
            spread = (outs[l] - outs[l][:1]).abs().max()
            if l + 1 < k:
                assert spread == 0  # levels < k identical across samples
            else:
                assert spread > 1e-4  # levels >= k vary
    same = generate(model, x[:1].expand(2, -1, -1, -1), 2, seeded(0), same_code=True)
    assert torch.equal(same[:, 0], same[:, 1])  # one code for every input


def test_pad_to_tower_restores_framing():
    model = TowerModel(TowerConfig.preset("tiny"))
    x = torch.rand(1, 3, 13, 18)
    padded, (h, w) = pad_to_tower(x, model)
    assert padded.shape[-2] % 4 == 0 and padded.shape[-1] % 4 == 0 and (h, w) == (13, 18)
    assert torch.equal(padded[..., :13, :18], x)


def test_cli_errors_are_one_line(tmp_path, photo_dir, capsys):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"definitely not a png")
    rc = main(
        ["train", "--task", "sr", "--scale", "4", "--data", str(bad), "--crop", "16", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "a.png" in err
    rc = main(["train", "--data", str(photo_dir), "--set", "train.stepz=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "train.stepz" in err and len(err.splitlines()) == 1
    rc = main(["sample", str(tmp_path / "missing.safetensors"), str(photo_dir), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "missing.safetensors" in err
    assert not (tmp_path / "s").exists()  # nothing written on failure


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "chimle", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "demo" in r.stdout and "sample" in r.stdout


def test_tiled_sampling_matches_untiled_away_from_seams(weights, photo_dir, tmp_path):
    """`chimle sample --tile`: same codes as untiled, so the samples agree except near the seams."""
    src = tmp_path / "in"
    src.mkdir()
    save_image(load_image(list_images(photo_dir)[1])[:, :40, :24], src / "b.png")  # 2 tiles of 24 down
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    assert main(["sample", str(weights), str(src), "--num", "2", "--out", str(whole), "--seed", "3"]) == 0
    assert (
        main(
            [
                "sample",
                str(weights),
                str(src),
                "--num",
                "2",
                "--out",
                str(tiled),
                "--seed",
                "3",
                "--tile",
                "24",
                "--overlap",
                "8",
            ]
        )
        == 0
    )
    a, b = load_image(whole / "b_001.png"), load_image(tiled / "b_001.png")
    assert a.shape == b.shape == (3, 160, 96)
    err = (a - b).abs()
    print(f"tiled vs untiled: mean {err.mean():.2e}, max {err.max():.2e}")
    assert err.mean() < 0.01 and err.max() > 0  # measured 3.1e-3: tiled for real, and close
    assert main(["sample", str(weights), str(src), "--out", str(tmp_path / "x"), "--tile", "big"]) == 2


@pytest.mark.parametrize("draw", [[], ["--from-level", "2"], ["--same-code"]])
def test_streamed_samples_draw_the_codes_generate_draws(weights, photo_dir, tmp_path, draw):
    """`chimle sample --tile` streams each sample into its PNG (pypng, one code at a time from
    `draw_codes`): the files hold exactly the 8-bit pixels of `generate(..., tile=...)` for the same seed."""
    lr = load_image(list_images(photo_dir)[0])[:, :11, :13]
    save_image(lr, tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["sample", str(weights), str(tmp_path / "a.png"), "--num", "3", "--seed", "2", "--out", str(out)]
    assert main([*args, "--tile", "6", "--overlap", "2", *draw]) == 0
    model, task_cfg = load_with_task(weights)
    x, (h, w) = pad_to_tower(load_image(tmp_path / "a.png")[None], model)
    options = {"from_level": 2} if "--from-level" in draw else {"same_code": True} if draw else {}
    want = generate(
        model, x, 3, torch.Generator().manual_seed(2), task=make_task(**task_cfg), tile=6, overlap=2, **options
    )
    want = to_uint8(want[:, 0, :, : h * 4, : w * 4]).permute(0, 2, 3, 1).numpy()
    got = np.stack([np.asarray(Image.open(out / f"a_{k:03d}.png")) for k in range(3)])
    assert got.shape == (3, 44, 52, 3) and np.array_equal(got, want)
    assert not np.array_equal(got[0], got[1])  # three samples, not one thrice
