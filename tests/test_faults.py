"""Faults, injected for real: divergence, damaged and foreign checkpoints, a full disk, a second writer,
kill -9, a dead or stuck rank, huge tiled outputs. Every case checks the message (one line), the exit
code and that nothing already written was lost or damaged (README "When things go wrong")."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from chimle.apps.cli import main
from chimle.data.imageio import load_image, read_csv_columns, save_image, to_uint8
from chimle.data.tasks import make_task
from chimle.inference.files import SampleOptions, Tiling, sample_paths
from chimle.inference.sample import generate
from chimle.inference.tiling import pad_to_tower
from chimle.inference.weights import CheckpointError, load_state
from chimle.model import TowerConfig, TowerModel
from chimle.training import trainer as trainer_mod
from chimle.training.checkpoint import save_state
from chimle.training.config import load_config
from chimle.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: a second thread only adds waiting

# A tiny 4x SR run: 6 crops of 16 px, 2 levels, AlexNet LPIPS; a step takes a few ms.
TRAIN = [
    "train",
    "--task",
    "sr",
    "--scale",
    "4",
    "--preset",
    "tiny",
    "--crop",
    "16",
    "--device",
    "cpu",
    "--set",
    "train.pool_size=6",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.steps_per_round=100",
    "--set",
    "search.batch=6",
    "--set",
    "search.samples_per_level=[3,2]",
    "--set",
    "search.distance=alex",
    "--set",
    "train.sample_every=0",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.lr=1e-3",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def train_args(photo_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [*TRAIN, "--data", str(photo_dir), "--out", str(out), "--steps", str(steps), *extra]


def cli(args: list[str], capsys) -> tuple[int, str]:
    """Run `chimle ARGS` in this process: (exit code, stderr)."""
    rc = main(args)
    return rc, capsys.readouterr().err


def one_line_error(err: str) -> str:
    """The error line of the CLI (exactly one), whatever warnings came before it."""
    lines = [l for l in err.splitlines() if l.startswith("chimle train: error:") or ": error: " in l]
    assert len(lines) == 1, err
    return lines[0]


def ckpt(out: Path, name: str = "last.pt") -> Path:
    return out / "checkpoints" / name


def spawn(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chimle", *args],
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond, procs: list[subprocess.Popen], deadline_s: float = 50.0) -> None:
    """Wait until cond() (a file appears, ...): fail if a process ends first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process ended early (rc {p.returncode}): {p.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# 1. Divergence


def test_huge_learning_rate_stops_with_one_line_and_writes_nothing_nonfinite(photo_dir, tmp_path, capsys):
    """--set train.lr=1e12: a real divergence. The first update leaves finite weights whose outputs are
    NaN; they are checked before the checkpoint, so none is written. One line: the step, what is not
    finite, the learning rate, what to do; exit code 2; no NaN in any file."""
    out = tmp_path / "run"
    args = train_args(photo_dir, out, 20, "--set", "train.lr=1e12", "--set", "train.checkpoint_every=1")
    rc, err = cli(args, capsys)
    line = one_line_error(err)
    assert rc == 2, err
    assert line.endswith(
        "training diverged at step 1: the updated weights give NaN/inf outputs, learning rate 1e+12; no "
        "checkpoint was written yet: start over with a lower train.lr"
    ), line
    assert not ckpt(out).exists() and not list(out.glob("samples/*.png"))  # no NaN checkpoint, no NaN grid
    # with checkpoints further apart, the NaN shows in the next step's loss: same stop, the step named
    rc, err = cli(train_args(photo_dir, tmp_path / "run2", 20, "--set", "train.lr=1e12"), capsys)
    line = one_line_error(err)
    assert rc == 2 and "training diverged at step 2: loss nan (the model's outputs hold NaN/inf)" in line, line
    assert not ckpt(tmp_path / "run2").exists()


def _poison(monkeypatch, at_calls: set[int], what: str = "weights"):
    """Inject a NaN into the optimizer steps numbered `at_calls` (1-based, counted from now), through the real
    forward, loss, backward and optimizer: "weights" sets a weight to NaN first (as a blown-up update
    leaves them), "gradients" scales the loss by NaN (an overflow in the backward pass)."""
    real, calls = trainer_mod.optimize_step, [0]

    def poisoned(model, opt, x, *a, **kw):
        calls[0] += 1
        if calls[0] in at_calls and what == "weights":
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        if calls[0] in at_calls and what == "gradients":
            kw["loss_scale"] = float("nan")
        return real(model, opt, x, *a, **kw)

    monkeypatch.setattr(trainer_mod, "optimize_step", poisoned)


def test_nonfinite_loss_never_overwrites_the_last_good_checkpoint(photo_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, {5})
    rc, err = cli(train_args(photo_dir, out, 8), capsys)
    line = one_line_error(err)
    assert rc == 2
    assert "training diverged at step 5: non-finite weights in levels.0." in line and "learning rate 0.001;" in line
    assert f"the last good checkpoint is '{ckpt(out)}' (step 4)" in line and "--resume" in line
    assert load_state(ckpt(out))["step"] == 4 and load_state(ckpt(out, "previous.pt"))["step"] == 2
    assert read_csv_columns(out / "log.csv")["step"] == [1, 2, 3, 4, 5]  # the log shows what happened
    # the user's next move: resume with rollback; the same NaN comes back at step 5 and is rolled back
    monkeypatch.undo()
    _poison(monkeypatch, {1})
    rc, err = cli([*train_args(photo_dir, out, 8, "--set", "train.on_nonfinite=rollback"), "--resume"], capsys)
    assert rc == 0, err
    assert "rolled back to" in err and "going on at learning rate 0.0005" in err, err
    assert load_state(ckpt(out))["step"] == 8


def test_skip_drops_the_update_of_a_nonfinite_step(photo_dir, tmp_path, monkeypatch, capsys):
    sets = [a for a in TRAIN if "=" in a]  # the --set values of TRAIN
    base = {"data.task": "sr", "data.scale": 4, "preset": "tiny", "data.crop": 16, "train.device": "cpu"}
    cfg = load_config(overrides=[*sets, f"data.data={photo_dir}", f"out={tmp_path}", "train.steps=2"], base=base)
    cfg.train.on_nonfinite = "skip"
    tr = Trainer(cfg, quiet=True)
    tr.run()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    _poison(monkeypatch, {1}, "gradients")
    tr.cfg.train.steps = 3
    tr.run()  # step 3 is poisoned: skipped
    err = capsys.readouterr().err
    assert "step 3: non-finite gradients (loss " in err and "; step skipped, its update not applied (1 in a row)" in err
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())  # weights unchanged
    assert tr.step == 3 and load_state(tr.checkpoint_path)["step"] == 3
    assert read_csv_columns(tmp_path / "log.csv")["step"] == [1, 2, 3]


def test_rollback_reloads_the_last_checkpoint_at_half_the_learning_rate(photo_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, {7})
    rc, err = cli(train_args(photo_dir, out, 10, "--set", "train.on_nonfinite=rollback"), capsys)
    assert rc == 0, err
    assert f"learning rate 0.001; rolled back to '{ckpt(out)}' (step 6) and going on at learning rate 0.0005" in err, (
        err
    )
    state = load_state(ckpt(out))
    assert state["step"] == 10 and state["optimizer"]["param_groups"][0]["lr"] == 5e-4
    assert read_csv_columns(out / "log.csv")["step"] == list(range(1, 11))  # step 7 redone, not logged twice
    assert all(bool(v.isfinite().all()) for v in state["model"].values())


# ---------------------------------------------------------------------------------------------------
# 2. Checkpoints: damaged, foreign, another format; a write that fails


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, photo_dir) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4): treat as read-only, copy to damage."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(train_args(photo_dir, out, 4)) == 0
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_foreign_and_other_format_checkpoints_each_have_their_own_line(run_dir, photo_dir, tmp_path, capsys):
    good = ckpt(run_dir).read_bytes()
    cases = {
        "truncated.pt": (good[: len(good) // 2], "is damaged (truncated or corrupted)"),
        "empty.pt": (b"", "is damaged: the file is empty"),
        "zeroed.pt": (good[:4096] + bytes(len(good) - 4096), "is damaged (truncated or corrupted)"),
        "image.pt": ((run_dir / "loss.png").read_bytes(), "is not a chimle checkpoint: it is an image"),
        "text.pt": (b"hello\n", "is not a chimle checkpoint: not a PyTorch file"),
    }
    other = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    cases["plain.pt"] = (other.read_bytes(), "is not a chimle checkpoint: a PyTorch file holding a dict")
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        rc, err = cli(["sample", str(tmp_path / name), str(run_dir / "loss.png"), "--out", str(tmp_path / "s")], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err and name in err, (name, err)
        assert "Weights only load failed" not in err
    # another format version: refused by --resume with its own line, and nothing touched
    run = _copy_run(run_dir, tmp_path / "old")
    state = load_state(ckpt(run))
    state["format"] = "chimle-train-1"
    save_state(ckpt(run), state, keep_previous=False)
    save_state(ckpt(run, "previous.pt"), state, keep_previous=False)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    rc, err = cli([*train_args(photo_dir, run, 6), "--resume"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "has format 'chimle-train-1', written by another chimle version" in line, line
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_damaged(run_dir, photo_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    data = ckpt(run).read_bytes()
    ckpt(run).write_bytes(data[: len(data) // 3])  # a disk error, a bad copy
    with pytest.warns(UserWarning) as warned:
        rc, err = cli([*train_args(photo_dir, run, 6), "--resume"], capsys)
    assert rc == 0, err
    msg = " ".join(str(w.message) for w in warned)
    assert f"checkpoint '{ckpt(run)}' is damaged" in msg and "resuming from the previous checkpoint" in msg, msg
    assert load_state(ckpt(run))["step"] == 6
    assert load_state(ckpt(run, "previous.pt"))["step"] == 4  # the damaged file was not kept as a fallback
    assert read_csv_columns(run / "log.csv")["step"] == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone from step 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EACCES])
def test_a_checkpoint_write_that_fails_keeps_both_checkpoints(run_dir, photo_dir, tmp_path, monkeypatch, capsys, code):
    """The disk fills up (or fails, or refuses) halfway through writing the step-6 checkpoint."""
    run = _copy_run(run_dir, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    real = torch.save

    def failing_save(obj, f, *a, **kw):
        if obj.get("step") == 6:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(code, os.strerror(code))
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    rc, err = cli([*train_args(photo_dir, run, 8), "--resume"], capsys)
    line = one_line_error(err)
    assert rc == 2
    assert f"cannot write checkpoint '{ckpt(run)}': {os.strerror(code)}; '{ckpt(run)}' (step 4) is intact" in line
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing half-written
    assert read_csv_columns(run / "log.csv")["step"][:4] == [1, 2, 3, 4]
    monkeypatch.undo()
    assert cli([*train_args(photo_dir, run, 8), "--resume"], capsys)[0] == 0  # space freed: it goes on
    assert load_state(ckpt(run))["step"] == 8 and load_state(ckpt(run, "previous.pt"))["step"] == 6


# ---------------------------------------------------------------------------------------------------
# 3. One writer per run folder, and kill -9


def test_second_writer_is_refused_and_a_killed_run_resumes(photo_dir, tmp_path, capsys):
    """A real process trains; a second `chimle train` on its folder is refused with its PID; then it is
    killed with kill -9 (wherever it is, even halfway through a checkpoint), and --resume takes over its
    stale lock and goes on from its last checkpoint. (The second and third runs are in this process.)"""
    out = tmp_path / "run"
    lock = out / "train.lock"
    first = spawn(train_args(photo_dir, out, 100000))
    try:
        wait_for(lambda: lock.exists() and lock.read_text().startswith(f"{first.pid} "), [first])
        rc, err = cli(train_args(photo_dir, out, 10), capsys)
        line = one_line_error(err)
        assert rc == 2 and f"run folder '{out}' is in use by process {first.pid} on" in line, err
        wait_for(lambda: ckpt(out, "previous.pt").exists(), [first])  # two checkpoints written
    finally:
        first.kill()  # kill -9
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    step = load_state(ckpt(out))["step"]  # whole, not half-written
    assert load_state(ckpt(out, "previous.pt"))["step"] in (step - 2, step)  # (step: killed while rotating)
    assert read_csv_columns(out / "log.csv")["step"][:step] == list(range(1, step + 1))  # flushed with it
    assert lock.read_text().startswith(f"{first.pid} ")  # the dead process's lock is still there: stale
    with pytest.warns(UserWarning, match=f"took over the lock of '{out}' from process {first.pid}"):
        rc, err = cli([*train_args(photo_dir, out, step + 2), "--resume"], capsys)
    assert rc == 0, err
    assert load_state(ckpt(out))["step"] == step + 2
    assert read_csv_columns(out / "log.csv")["step"] == list(range(1, step + 3))
    assert not lock.exists() and not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------
# 4. A dead or stuck rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(args: list[str]) -> list[subprocess.Popen]:
    """What torchrun does for 2 local processes, without its agent (which would kill the survivor for
    us): the survivor must end by itself."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    return [spawn(args, **env, RANK=str(r), LOCAL_RANK=str(r)) for r in range(2)]


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_saves_then_stops_the_process_with_code_130(photo_dir, tmp_path, signals):
    """SIGTERM (a scheduler's pre-emption, `kill`) or Ctrl-C: the finished steps are saved, then the
    process ends with 130 and one line naming the checkpoint, never the success message (a caller such
    as `chimle reproduce` must not go on to its next tower). A second SIGTERM (a wrapper such as `timeout`
    or `srun` forwarding the one the process also got) must not cut the save short."""
    out = tmp_path / "run"
    p = spawn(train_args(photo_dir, out, 100000))
    try:
        wait_for(lambda: ckpt(out).exists(), [p])
        for _ in range(signals):
            p.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        stdout, err = p.communicate(timeout=50)
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == 130 and "trained" not in stdout, err
    lines = [line for line in err.splitlines() if line.startswith("chimle train: interrupted")]
    assert len(lines) == 1, err
    step = load_state(ckpt(out))["step"]
    assert 0 < step < 100000
    assert f"stopped at step {step} of 100000; the last good checkpoint is '{ckpt(out)}' (step {step})" in lines[0]


def test_sigterm_during_a_search_stops_between_chunks_and_resumes_the_same(photo_dir, tmp_path, monkeypatch, capsys):
    """A round's search can outlast a scheduler's grace period: a SIGTERM during it stops the search
    before the next chunk, saves the finished steps, and a resumed run searches the round again and
    ends where an uninterrupted one does."""

    def args(out: Path) -> list[str]:  # 2 rounds of 3 steps; the pool of 6 searched in 3 chunks of 2
        return train_args(photo_dir, out, 6, "--set", "train.steps_per_round=3", "--set", "search.batch=2")

    assert cli(args(tmp_path / "straight"), capsys)[0] == 0
    searched, search = [], Trainer._search

    def search_then_sigterm(self, x, y, chunk):
        searched.append((self.round, chunk))
        if self.round == 1:  # the second round's first chunk of three: the signal arrives while it runs
            os.kill(os.getpid(), signal.SIGTERM)
        return search(self, x, y, chunk)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_search", search_then_sigterm)
        rc, err = cli(args(out), capsys)
    assert rc == 130 and searched == [(0, 0), (0, 1), (0, 2), (1, 0)], (searched, err)
    assert f"stopped at step 3 of 6; the last good checkpoint is '{ckpt(out)}' (step 3)" in err
    state = load_state(ckpt(out))
    assert (state["step"], state["round"], state["pool"]) == (3, 1, None)
    assert cli([*args(out), "--resume"], capsys)[0] == 0
    straight = load_state(ckpt(tmp_path / "straight"))["model"]
    resumed = load_state(ckpt(out))["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_dead_or_stuck_rank_stops_the_other_with_a_message(photo_dir, tmp_path, capsys, fault):
    """kill -9 of rank 1 (a crash, out of memory): rank 0 sees the closed connection at once. SIGSTOP of
    rank 1 (a hung process, a lost machine): rank 0 gives up after train.dist_timeout. Either way rank 0
    ends by itself with one line and exit code 2, its checkpoints whole, and --resume goes on in one
    process."""
    out = tmp_path / "run"
    # The timeout must cover how far one rank may run ahead of the other in normal operation (start-up on a
    # busy machine, one search chunk each): a stuck rank is noticed after that long.
    timeout = 60 if fault == "kill" else 20
    args = train_args(photo_dir, out, 100000, "--set", f"train.dist_timeout={timeout}", "--set", "search.batch=3")
    ranks = _two_ranks(args)
    try:
        wait_for(lambda: ckpt(out).exists(), ranks)
        assert (out / "train.lock").read_text().startswith(f"{ranks[0].pid} ")  # rank 0 holds the folder
        os.kill(ranks[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        _, err = ranks[0].communicate(timeout=50)
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
    assert ranks[0].returncode == 2, err
    line = one_line_error(err)
    expected = "another rank died" if fault == "kill" else "no answer from another rank within 20 s"
    assert f"rank 0: {expected}" in line and "go on with --resume (any number of processes)" in line, line
    step = load_state(ckpt(out))["step"]
    assert f"'{ckpt(out)}' (step {step})" in line
    rc, err = cli([*train_args(photo_dir, out, step + 2, "--set", "search.batch=3"), "--resume"], capsys)  # 1 rank
    assert rc == 0, err
    assert load_state(ckpt(out))["step"] == step + 2


# ---------------------------------------------------------------------------------------------------
# 5. Huge outputs: tiled sampling streams


def _weights(tmp_path: Path, task: str, **cfg) -> tuple[Path, TowerModel]:
    torch.manual_seed(0)
    model = TowerModel(TowerConfig.preset("tiny", **cfg)).eval()
    t = make_task(task, **({"scale": model.cfg.scale} if task == "sr" else {}))
    path = tmp_path / f"{task}.safetensors"
    meta = {"model": json.dumps(model.cfg.to_dict()), "task": json.dumps(t.config())}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path, model


@pytest.mark.parametrize(
    "task,cfg,hw", [("sr", {"layout": "upscale", "levels": 2}, (23, 30)), ("colorize", {"layout": "same"}, (50, 61))]
)
def test_streamed_tiled_sample_is_the_tiled_sample(tmp_path, task, cfg, hw):
    """`chimle sample --tile` writes the same 8-bit image as `generate(..., tile=...)`, band by band."""
    if task == "colorize":
        cfg = {**cfg, "in_channels": 1, "out_channels": 2}
    path, model = _weights(tmp_path, task, **cfg)
    t = make_task(task, **({"scale": model.cfg.scale} if task == "sr" else {}))
    img = torch.rand(3, *hw)
    save_image(img, tmp_path / "in.png")
    options = SampleOptions(seed=5, tiling=Tiling(12, overlap=4))
    written = sample_paths(path, tmp_path / "in.png", 2, tmp_path / "out", options, progress=False)
    x = load_image(tmp_path / "in.png")
    x = x if task == "sr" else t.prepare_input(x)
    xp, (h, w) = pad_to_tower(x[None], model)
    want = generate(model, xp, 2, torch.Generator().manual_seed(5), task=t, tile=12, overlap=4)
    s = model.cfg.scale
    for k in range(2):
        got = np.asarray(Image.open(tmp_path / "out" / f"in_{k:03d}.png"))
        assert np.array_equal(got, to_uint8(want[k, 0, :, : h * s, : w * s]).permute(1, 2, 0).numpy())
    assert (tmp_path / "out" / "in_grid.png") in written and load_image(tmp_path / "out" / "in_grid.png").shape[
        -1
    ] > 3 * w


# Two `chimle sample --tile` runs in one process, a small input then a large one: the growth of the peak
# RSS between them is what the large output costs per pixel (the model, the libraries and the tiles'
# activations are already paid for by the first run, at the same tile size; both grids show previews of
# 1024 x 768 px).
_MEMORY_CHILD = """
import resource, sys
from chimle.apps.cli import main
weights, small, large, out = sys.argv[1:]
peaks = []
for img in (small, large):
    args = ["sample", weights, img, "--num", "1", "--out", out, "--tile", "auto", "--memory-budget", "64MB"]
    assert main(args) == 0
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KB on Linux
print(*peaks)
"""


def test_tiled_sample_memory_per_output_pixel(tmp_path):
    """8x SR of 128 x 96 then 256 x 192 px (2.36 M more output pixels): streamed, the peak grows by the
    codes' noise (2.7 bytes per output pixel for this tower) and one band of tiles; the old path held
    float copies of the whole output and grew by ~85 bytes per pixel (measured on it: 86)."""
    if sys.platform != "linux":
        pytest.skip("ru_maxrss is in KB on Linux only")
    path, model = _weights(tmp_path, "sr", layout="upscale", levels=3)
    save_image(torch.rand(3, 96, 128), tmp_path / "small.png")
    save_image(torch.rand(3, 192, 256), tmp_path / "large.png")
    args = [str(path), str(tmp_path / "small.png"), str(tmp_path / "large.png"), str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, *args], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    small_kb, large_kb = map(int, r.stdout.split()[-2:])
    per_pixel = (large_kb - small_kb) * 1024 / (2048 * 1536 - 1024 * 768)
    print(f"peak RSS {small_kb / 1024:.0f} -> {large_kb / 1024:.0f} MB: {per_pixel:.1f} bytes per output pixel")
    assert load_image(tmp_path / "out" / "large_000.png").shape == (3, 1536, 2048)
    assert per_pixel < 20, per_pixel


def test_checkpoint_error_is_a_value_error():
    """The CLI prints a one-line message for ValueError and OSError: the fault errors are those."""
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(trainer_mod.TrainingDiverged, ValueError)
    assert issubclass(trainer_mod.CheckpointWriteError, OSError)
    assert issubclass(trainer_mod.RunFolderBusy, OSError) and issubclass(trainer_mod.RankLost, OSError)


# ---------------------------------------------------------------------------------------------------
# 6. Bad input at start-up (the first paragraph): one line naming the file or key, exit code 2,
# nothing written.


def _bad_input(tmp_path: Path, photo_dir: Path, case: str) -> tuple[list[str], str, dict]:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    out = str(tmp_path / "run")
    if case == "truncated jpeg":
        jpg = data / "cut.jpg"
        Image.open(photo_dir / sorted(os.listdir(photo_dir))[0]).convert("RGB").save(jpg, quality=90)
        jpg.write_bytes(jpg.read_bytes()[:2000])
        return train_args(data, Path(out), 2), "bad image", {"name": "cut.jpg"}
    if case == "empty folder":
        empty = tmp_path / "empty"
        empty.mkdir()
        return train_args(empty, Path(out), 2), "no images", {"name": "empty"}
    if case == "unknown key":
        return train_args(data, Path(out), 2, "--set", "train.stepz=3"), "unknown key 'train.stepz'", {}
    if case == "wrong type":
        return train_args(data, Path(out), 2, "--set", "train.lr=fast"), "train.lr: expected float", {}
    if case == "unmatched pairs":
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        save_image(torch.rand(3, 32, 32), inputs / "nobody.png")
        args = [a if a != "sr" else "paired" for a in train_args(inputs, Path(out), 2)]
        return [*args, "--target", str(data)], "have no partner with the same name", {"name": "nobody (input only)"}
    if case == "non-image input":
        (tmp_path / "notes.png").write_text("not an image")
        weights, _ = _weights(tmp_path, "sr", layout="upscale", levels=2)
        args = ["sample", str(weights), str(tmp_path / "notes.png"), "--out", out]
        return args, "not an image", {"name": "notes.png"}
    if case == "missing LPIPS weights":
        return train_args(data, Path(out), 2), "LPIPS weights file", {"env": str(tmp_path / "missing.ckpt")}
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated jpeg",
        "empty folder",
        "unknown key",
        "wrong type",
        "unmatched pairs",
        "non-image input",
        "missing LPIPS weights",
    ],
)
def test_bad_input_is_one_line_at_start_up(photo_dir, tmp_path, monkeypatch, capsys, case):
    args, expected, extra = _bad_input(tmp_path, photo_dir, case)
    if "env" in extra:
        monkeypatch.setenv("CHIMLE_LPIPS_WEIGHTS", extra["env"])
    rc, err = cli(args, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert extra.get("name", "") in err
    assert not ckpt(tmp_path / "run").exists()


def test_resumed_log_keeps_its_rows_on_disk_before_any_flush(tmp_path):
    """A resume drops the rows that will be redone by an atomic replace and appends after them: a kill -9
    before the first flush must not leave log.csv empty (a truncate-and-rewrite did, losing every session)."""
    from chimle.training.runlog import CsvLog

    path = tmp_path / "log.csv"
    first = CsvLog(path, 0)
    for s in range(1, 6):
        first.write({"step": s, "loss": 0.5})
    first.close()
    log = CsvLog(path, 3)  # resumed from the checkpoint of step 3: steps 4 and 5 will be redone
    assert read_csv_columns(path)["step"] == [1, 2, 3]  # on disk now, while the new log is still open
    log.write({"step": 4, "loss": 0.25})
    log.close()
    assert read_csv_columns(path) == {"step": [1, 2, 3, 4], "loss": [0.5, 0.5, 0.5, 0.25]}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    CsvLog(path, 4).close()  # nothing to drop: the file is untouched
    assert read_csv_columns(path)["step"] == [1, 2, 3, 4]
    with open(path, "ab") as f:  # a kill mid-write: the last row cut short, without its line end
        f.write(b"5,0.1")
    log = CsvLog(path, 5)  # kept (step 5), and the next row starts on a line of its own
    log.write({"step": 6, "loss": 0.125})
    log.close()
    assert read_csv_columns(path) == {"step": [1, 2, 3, 4, 5, 6], "loss": [0.5, 0.5, 0.5, 0.25, 0.1, 0.125]}
