"""A new user's first hour (issue 31): the command answers `--help` without importing torch, messages name
what is wrong and what to do, `--threads`, `chimle demo --resume`, and `chimle.sample` from Python."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chimle.apps.cli import main

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


def test_convert_parses_with_its_own_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "their.pth"])
    assert e.value.code == 2
    assert "chimle convert: error: the following arguments are required: out, --task" in capsys.readouterr().err
    assert main(["convert", "missing.pth", "out.safetensors", "--task", "sr"]) == 2
    assert "chimle convert: error: checkpoint 'missing.pth' does not exist" in capsys.readouterr().err
