"""A new user's first hour (issue 31): the command answers `--help` without importing torch, messages name
what is wrong and what to do, `--threads`, `chimle demo --resume`, and `chimle.sample` from Python."""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from PIL import Image

from chimle.apps.cli import main
from chimle.data.imageio import load_image, save_image
from chimle.model import TowerConfig, TowerModel

# Runs the command line in a fresh interpreter and reports, on the last line of stderr, whether torch got
# imported (argparse ends --help and argument errors with SystemExit).
_PROBE = (
    "import sys\nfrom chimle.apps.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
    "    print('exit', e.code)\nprint('torch' in sys.modules, file=sys.stderr)"
)


def _probe(*args: str) -> tuple[str, str, bool]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    *err, torch_loaded = proc.stderr.strip().splitlines()
    return proc.stdout, "\n".join(err), torch_loaded == "True"


@pytest.mark.parametrize(
    "args, exit_code, shown",
    [
        (["--help"], 0, "draw N different outputs per input image"),
        (["sample", "--help"], 0, "--tile TILE"),
        (["sample", "sr8-small"], 2, "the following arguments are required: input, --out"),
        (["trian"], 2, "invalid choice: 'trian'"),
        (["train", "--steps", "x"], 2, "argument --steps: invalid int value: 'x'"),
        (["bench", "speed", "--help"], 0, "--presets PRESETS"),
        (["explore", "--help"], 0, "(default: the shipped sr8-small)"),
        (["reproduce", "--quick", "--parts"], 2, "argument --parts: expected one argument"),
    ],
)
def test_help_and_argument_errors_do_not_import_torch(args, exit_code, shown):
    out, err, torch_loaded = _probe(*args)
    assert f"exit {exit_code}" in out
    assert shown in out + err
    assert not torch_loaded, f"`chimle {' '.join(args)}` imported torch"


def test_import_chimle_is_light_and_names_load_on_use():
    code = "import sys, chimle; print('torch' in sys.modules); chimle.TowerModel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_library_choices_are_checked_after_the_lazy_import(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "huge"])
    assert e.value.code == 2
    assert "argument --preset: invalid choice: 'huge' (choose from 'paper', 'small', 'tiny')" in capsys.readouterr().err


def test_convert_parses_with_the_one_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "their.pth"])
    assert e.value.code == 2
    assert "chimle convert: error: the following arguments are required: out, --task" in capsys.readouterr().err
    assert main(["convert", "missing.pth", "out.safetensors", "--task", "sr"]) == 2
    assert "chimle convert: error: checkpoint 'missing.pth' does not exist" in capsys.readouterr().err


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_runs_through_the_one_table():
    """Every command and benchmark of the parser has its entry in `COMMANDS`: a `cmd_NAME(args)` of an app
    module, which has no parser or `main` of its own; the names the help texts write out are the apps'."""
    from chimle.apps import bench_gpu, bench_speed, cli, reproduce

    commands = _subcommands(cli.build_parser())
    names = [n for n in commands if n != "bench"] + [f"bench {n}" for n in _subcommands(commands["bench"])]
    assert sorted(names) == sorted(cli.COMMANDS)
    for name, target in cli.COMMANDS.items():
        module_name, _, function = target.partition(":")
        module = importlib.import_module(f"chimle.apps.{module_name}")
        run = getattr(module, function)
        assert function == "cmd_" + name.replace("bench ", "bench_") and list(inspect.signature(run).parameters) in (
            ["a"],
            ["args"],
        ), target
        assert not hasattr(module, "main") and not hasattr(module, "build_parser"), module_name
    assert cli.REPRODUCE_PARTS == tuple(reproduce.PARTS) and cli.REPRODUCE_EXTRA_PARTS == tuple(reproduce.EXTRA_PARTS)
    assert cli.GPU_CHECKS == bench_gpu.CHECKS and cli.SPEED_BENCHMARKS == bench_speed.BENCHMARKS


@pytest.mark.parametrize(
    "args, said",
    [
        (["reproduce", "--parts", "mnist,tabel1"], "chimle reproduce: error: unknown part(s) ['tabel1']; choose from"),
        (["bench", "gpu", "--only", "serach"], "chimle bench gpu: error: unknown check 'serach': --only takes search,"),
        (["bench", "speed", "--only", "fast"], "chimle bench speed: error: unknown benchmark or case 'fast': --only"),
    ],
)
def test_an_app_command_fails_in_one_line_through_the_one_handler(args, said, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def tiny_sr(tmp_path_factory):
    """A random-init tiny 8x SR tower saved as a training checkpoint (the weights do not matter here)."""
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", layout="upscale"))
    path = tmp_path_factory.mktemp("tiny") / "tiny_sr8.pt"
    task = {"name": "sr", "scale": 8}
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "task_config": task}, path)
    return path


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "photo.png"
    save_image(torch.rand(3, 16, 20, generator=torch.Generator().manual_seed(3)), path)
    return path


@pytest.mark.parametrize(
    "name, said",
    [
        ("missing.png", "image file '{}' does not exist"),
        ("missing.JPG", "image file '{}' does not exist"),
        ("missing", "no image file or folder '{}' exists"),
    ],
)
def test_a_missing_input_is_named_as_a_file(tiny_sr, tmp_path, capsys, name, said):
    missing = tmp_path / name
    assert main(["sample", str(tiny_sr), str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "chimle sample: error: " + said.format(missing)


def _sample(weights, image, out, *extra):
    return main(["sample", str(weights), str(image), "--num", "2", "--seed", "4", "--out", str(out), *extra])


@pytest.mark.usefixtures("one_thread")
def test_an_input_over_the_budget_is_tiled_as_tile_auto_does_and_says_so(tiny_sr, small_input, tmp_path, capsys):
    assert _sample(tiny_sr, small_input, tmp_path / "auto", "--memory-budget", "16MB") == 0
    err = capsys.readouterr().err
    assert err.startswith(f"chimle sample: '{small_input}' (20x16 px) needs about 49 MB untiled, more than the memory")
    assert err.count("\n") == 1 and "tiled automatically, as --tile auto does (10 px tiles" in err
    asked = ["--tile", "auto", "--memory-budget", "16MB"]
    assert _sample(tiny_sr, small_input, tmp_path / "asked", *asked) == 0
    assert capsys.readouterr().err == ""  # asked for: nothing to say
    for k in range(2):
        auto, tiled = (load_image(tmp_path / d / f"photo_{k:03d}.png") for d in ("auto", "asked"))
        assert auto.shape == (3, 128, 160) and (auto == tiled).all()
    assert _sample(tiny_sr, small_input, tmp_path / "whole") == 0  # fits: run whole, quietly
    assert capsys.readouterr().err == ""
    whole, auto = (load_image(tmp_path / d / "photo_000.png") for d in ("whole", "auto"))
    assert not (whole == auto).all()


@pytest.mark.usefixtures("one_thread")
def test_without_a_budget_the_memory_available_decides(tiny_sr, small_input, tmp_path, capsys, monkeypatch):
    import chimle.inference.files as files

    monkeypatch.setattr(files, "available_memory", lambda device: 20 * 2**20)
    assert _sample(tiny_sr, small_input, tmp_path / "auto") == 0
    err = capsys.readouterr().err
    assert "needs about 49 MB untiled, more than the memory available (20 MB): tiled automatically" in err
    assert "(8 px tiles" in err  # within half the memory available: 10 MB
    assert _sample(tiny_sr, small_input, tmp_path / "lerp", "--interpolate", "--steps", "2") == 0
    err = capsys.readouterr().err
    assert err.strip().endswith("--interpolate and --project run it whole (it may not fit): --tile auto, without them")


@pytest.mark.usefixtures("one_thread")
def test_an_interrupted_demo_names_its_command_and_resumes_with_it(tmp_path, capsys, monkeypatch):
    """`chimle demo` stopped by Ctrl-C after a step says how to go on; `chimle demo ... --resume` then goes
    on from that step (the demo's own config, shrunk to a tiny search so that it runs in seconds)."""
    import chimle.apps.demo as demo

    def small_config(out, steps=None, device="auto"):
        cfg = demo_config(out, steps, device)
        cfg.search.samples_per_level, cfg.search.batch, cfg.search.distance = [2, 2, 1], 4, "alex"
        cfg.train.pool_size, cfg.train.batch_size = 4, 2
        return cfg

    started: list[tuple[bool, int]] = []

    class StoppedAfterOneStep(demo.Trainer):
        def __init__(self, cfg, resume=False, **kw):
            super().__init__(cfg, resume=resume, **kw)
            started.append((resume, self.step))

        def train_step(self, rows):
            out = super().train_step(rows)
            if len(started) == 1:  # the first run: Ctrl-C during its first step
                self._stop.requested = True
            return out

    demo_config = demo.demo_config
    monkeypatch.setattr(demo, "demo_config", small_config)
    monkeypatch.setattr(demo, "Trainer", StoppedAfterOneStep)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--device", "cpu"]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    command = f"chimle demo --out {out} --steps 3 --device cpu --resume"
    assert err == (
        f"chimle demo: interrupted: stopped at step 1 of 3; the last good checkpoint is "
        f"'{out / 'checkpoints' / 'last.pt'}' (step 1): go on with: {command}"
    )
    assert main(command.split()[1:]) == 0
    assert started == [(False, 0), (True, 1)]
    assert (out / "demo_grid.png").is_file() and "demo grid:" in capsys.readouterr().out
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize(
    "cores, load, env, expected",
    [
        (8, (2.4, 9.0, 9.0), {}, 6),  # the 1-minute figure, rounded: 2
        (8, (2.5, 0.0, 0.0), {}, 5),  # half rounds up (round() would give 2)
        (2, (7.3, 7.0, 7.0), {}, 1),  # a busy machine: at least one
        (None, (0.0, 0.0, 0.0), {}, 1),  # cpu_count unknown
        (16, (4.0, 0.0, 0.0), {"LOCAL_WORLD_SIZE": "4"}, 3),  # torchrun's processes share the free cores
        (16, (4.0, 0.0, 0.0), {"OMP_NUM_THREADS": "2"}, 2),  # the user's (or torchrun's) choice wins
    ],
)
def test_default_threads_are_the_free_cores(monkeypatch, cores, load, env, expected):
    from chimle import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: load)
    assert threads.default_threads() == expected


def test_default_threads_without_a_load_average(monkeypatch):
    from chimle import threads

    def no_loadavg():
        raise OSError("no load average")

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", no_loadavg)
    assert threads.default_threads() == 4


@pytest.mark.parametrize("given, applied", [(["--threads", "3"], 3), ([], 5)])
def test_threads_are_set_before_the_command_runs_and_restored(monkeypatch, tmp_path, given, applied):
    import chimle.inference.files as files
    from chimle import threads

    seen = []
    monkeypatch.setattr(files, "sample_paths", lambda *a, **kw: seen.append(torch.get_num_threads()) or [])
    monkeypatch.setattr(threads, "default_threads", lambda: 5)
    before = torch.get_num_threads()
    assert main(["sample", "w.safetensors", "in.png", "--out", str(tmp_path), *given]) == 0
    assert seen == [applied] and torch.get_num_threads() == before


@pytest.mark.parametrize(
    "command",
    [
        ["train"],
        ["sample"],
        ["eval"],
        ["demo"],
        ["mnist"],
        ["reproduce"],
        ["explore"],
        ["bench", "speed"],
        ["bench", "gpu"],
        ["bench", "efficiency"],
        ["bench", "ablation"],
    ],
)
def test_every_computing_command_takes_threads(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--threads N CPU threads for torch (default: the free cores, os.cpu_count() minus the 1-minute" in help_text


@pytest.fixture(scope="module")
def photo_crop(tmp_path_factory, photos):
    """A small real photo crop (odd size) written as a PNG."""
    path = tmp_path_factory.mktemp("crop") / "crop.png"
    save_image(photos[0][:, 40:61, 50:75], path)
    return path


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["sr8-small", "colorize-small"])
def test_chimle_sample_gives_the_pixels_chimle_sample_writes(name, photo_crop, tmp_path):
    import chimle
    from chimle.data.imageio import to_uint8

    assert main(["sample", name, str(photo_crop), "--num", "3", "--seed", "7", "--out", str(tmp_path)]) == 0
    written = torch.stack([load_image(tmp_path / f"crop_{k:03d}.png") for k in range(3)])
    img = load_image(photo_crop)
    scale = 8 if name == "sr8-small" else 1
    for image in (photo_crop, str(photo_crop), Image.open(photo_crop), img, img[None]):
        samples = chimle.sample(name, image, num=3, seed=7)
        assert samples.shape == (3, 3, 21 * scale, 25 * scale) and samples.dtype == torch.float32
        assert 0 <= float(samples.min()) and float(samples.max()) <= 1
        assert torch.equal(to_uint8(samples).float() / 255, written)
    other = chimle.sample(name, img, num=3, seed=8)
    assert not torch.equal(other, samples)
    path = chimle.save_image(samples[1], tmp_path / "again.png")
    assert torch.equal(load_image(path), written[1])


@pytest.mark.usefixtures("one_thread")
def test_chimle_sample_takes_a_model_and_its_task(photo_crop):
    import chimle
    from chimle.inference.weights import load_with_task

    model, task_cfg = load_with_task("colorize-small")
    by_name = chimle.sample("colorize-small", photo_crop, num=2, seed=1)
    assert torch.equal(chimle.sample(model, photo_crop, num=2, seed=1, task=task_cfg), by_name)
    assert torch.equal(chimle.sample(model, photo_crop, num=2, seed=1, task="colorize"), by_name)
    sr = chimle.load("sr8-small")  # no task: the image is the input (as sr's own task takes it)
    assert torch.equal(chimle.sample(sr, photo_crop, num=2, seed=1), chimle.sample("sr8-small", photo_crop, 2, 1))
    with pytest.raises(ValueError, match="input must be"):
        chimle.sample(model, photo_crop, num=1)  # no task: an RGB photo is no input of a colourisation tower


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.linspace(0, 2, 192).view(3, 8, 8), "an image tensor holds values in [0, 1], got [0, 2]"),
        (torch.full((3, 8, 8), float("nan")), "an image tensor holds values in [0, 1], got [nan, nan]"),
        (torch.zeros(2, 3, 8, 8), "an image tensor is (3, H, W) or (1, 3, H, W) (grey: 1 channel), got (2, 3, 8, 8)"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "an image tensor holds floats in [0, 1], got torch.uint8"),
    ],
)
def test_chimle_sample_refuses_bad_pixels_in_one_line(image, message):
    import chimle

    with pytest.raises(ValueError) as e:
        chimle.sample("sr8-small", image, num=1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
