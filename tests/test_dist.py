"""torchrun + DDP on the CPU (gloo): two ranks stay in sync and match one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from chimle.data.imageio import read_csv_columns
from chimle.inference.weights import load_state

ARGS = [
    "train",
    "--task",
    "sr",
    "--scale",
    "4",
    "--preset",
    "tiny",
    "--crop",
    "16",
    "--steps",
    "6",
    "--device",
    "cpu",
    "--set",
    "train.pool_size=6",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.steps_per_round=4",
    "--set",
    "search.batch=2",
    "--set",
    "search.samples_per_level=[3,2]",
    "--set",
    "search.distance=alex",
    "--set",
    "train.sample_every=0",
    "--set",
    "train.lr=1e-3",
]


def run(cmd, tmp_dir=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tmp_dir is not None:  # torchrun's agent leaves a torchelastic_* folder in the temp folder
        env["TMPDIR"] = str(tmp_dir)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_run(single: Path, multi: Path) -> None:
    """Two 6-step runs (one process, and sharded over ranks or nodes) end at the same pool, weights and losses."""
    a, b = load_state(single / "checkpoints" / "last.pt"), load_state(multi / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    # the pool searched in two shards equals the pool searched in one process (its winners, which fix the codes)
    assert torch.equal(a["pool"]["picks"], b["pool"]["picks"]) and a["pool"]["picks"].shape == (6, 2)
    # Gradients are summed in another order, and Adam magnifies that float noise on parameters whose
    # gradient is ~0 (measured: max gap 7e-5, most < 1e-6); a wrong batch split moves weights ~1e-3.
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=3e-4, msg=k)
    la, lb = read_csv_columns(single / "log.csv")["loss"], read_csv_columns(multi / "log.csv")["loss"]
    assert len(la) == len(lb) == 6
    assert max(abs(p - q) for p, q in zip(la, lb)) < 1e-3  # the logged loss is the global batch's


def test_two_gloo_ranks_match_single_process(photo_dir, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run([sys.executable, "-m", "chimle", *ARGS, "--data", str(photo_dir), "--out", str(single)])
    # the trainer itself checks after the last step that both ranks hold identical parameters
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "chimle",
            *ARGS,
            "--data",
            str(photo_dir),
            "--out",
            str(multi),
        ],
        tmp_dir=tmp_path,
    )
    assert_same_run(single, multi)
    # resume under another world size: continue the 2-rank run in one process
    run(
        [
            sys.executable,
            "-m",
            "chimle",
            *ARGS[:-2],
            "--set",
            "train.lr=1e-3",
            "--steps",
            "8",
            "--data",
            str(photo_dir),
            "--out",
            str(multi),
            "--resume",
        ]
    )
    assert load_state(multi / "checkpoints" / "last.pt")["step"] == 8


def test_a_bare_cuda_device_gets_an_index(monkeypatch):
    """`--device cuda` on one GPU: torch.cuda.set_device refuses a device without an index (torch 2.11,
    seen on an H200), so the current device's index is filled in."""
    from chimle.training import dist

    seen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    assert dist.local_device("cuda") == torch.device("cuda", 0)
    assert seen == [torch.device("cuda", 0)]
    assert dist.local_device("cuda:0") == torch.device("cuda", 0) and seen[-1].index == 0
