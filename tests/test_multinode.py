"""Two nodes on one machine: two torchrun agents (c10d rendezvous, gloo, CPU), one worker each, train the tiny
tower of tests/test_dist.py with `chimle train`; one worker is killed (SIGKILL) after a checkpoint, torchrun
(`--max-restarts 1`) restarts the group, which goes on from that checkpoint and ends where one uninterrupted
process ends on the same global batch (docs/distributed.md).

One launch serves both tests (a launch costs ~25 s on 2 cores, nearly all of it Python and torch starting up).
This file is also the workers' entry point (`torchrun ... tests/test_multinode.py --worker MARKS ARGS`), so
that the crash is injected at an exact step rather than by a timed kill that could miss the run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_dist import ARGS as DIST_ARGS
from test_dist import assert_same_run

from chimle.data.imageio import read_csv_columns
from chimle.inference.weights import load_state

# test_dist.py's tiny 4x SR run (two rounds of 4 steps), with a checkpoint every 2 steps to restart from
ARGS = [
    *DIST_ARGS,
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.dist_timeout=60",  # a stuck rank fails the test in a minute, not ten
]
KILL_AT = 4  # rank 1 dies right after the checkpoint of this step, on the first attempt only


def _worker(marks: Path, argv: list[str]) -> int:
    """One torchrun worker: `chimle train`, noting (rank, restart count, first step) of each attempt in `marks`,
    and killing itself, rank 1 once, as a crash would: SIGKILL, nothing saved or said."""
    from chimle.apps.cli import main
    from chimle.training.trainer import Trainer

    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    run, save = Trainer.run, Trainer.save

    def noted_run(self):
        (marks / f"start.{os.getpid()}").write_text(f"{rank} {attempt} {self.step}")
        return run(self)

    def crashing_save(self, sync: bool = True):
        save(self, sync)  # with sync, every rank returns only once rank 0 has written the checkpoint
        if rank == 1 and self.step == KILL_AT and not (marks / "killed").exists():
            (marks / "killed").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.run, Trainer.save = noted_run, crashing_save
    return main(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(entry: list[str], args: list[str], tmp: Path, timeout: float = 300) -> list[str]:
    """Start two torchrun agents as nodes 0 and 1 of one job and wait for both; returns their outputs."""
    port, job = _free_port(), uuid.uuid4().hex[:8]
    # torchrun's agents leave torchelastic_* folders in the temp folder; one thread per process on 2 cores.
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the workers' store is then made afresh by each attempt, not kept by
    # the agent, where a restarted rank can read the dead one's gloo address and fail to connect (seen here;
    # pytorch/pytorch#135712); docs/distributed.md says the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),  # (c10d assigns the ranks itself; kept as a SLURM script passes it)
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            job,
            # node 0's agent hosts the rendezvous store (both would claim it: 127.0.0.1 is every node here);
            # a missing node fails the job in 60 s, not torchrun's default 600
            "--rdzv-conf",
            f"is_host={int(node == 0)},join_timeout=60",
            "--max-restarts",
            "1",
            *entry,
            *args,
        ]
        log = open(tmp / f"node{node}.log", "w+")
        agents.append(
            (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log)
        )
    try:
        for p, _ in agents:
            p.wait(timeout=timeout)
    finally:
        for p, _ in agents:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for p, log in agents:
        log.seek(0)
        outputs.append(log.read())
        log.close()
        assert p.returncode == 0, outputs[-1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def runs(photo_dir, tmp_path_factory, one_thread):
    """The same run by one process and by two nodes whose rank 1 is killed at step KILL_AT."""
    from chimle.apps.cli import main

    tmp = tmp_path_factory.mktemp("multinode")
    single, multi, marks = tmp / "single", tmp / "multi", tmp / "marks"
    marks.mkdir()
    assert main([*ARGS, "--data", str(photo_dir), "--out", str(single)]) == 0
    logs = _two_nodes(
        [str(Path(__file__).resolve()), "--worker", str(marks)],
        [*ARGS, "--data", str(photo_dir), "--out", str(multi)],
        tmp,
    )
    return single, multi, marks, logs


def test_two_nodes_match_one_process(runs):
    single, multi, _, _ = runs
    assert_same_run(single, multi)  # the pool, the weights (Adam magnifies float noise to ~1e-4) and the losses


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(runs):
    _, multi, marks, logs = runs
    assert (marks / "killed").exists(), "rank 1 was never killed: the crash was not injected"
    starts = sorted(tuple(map(int, p.read_text().split())) for p in marks.glob("start.*"))
    # two attempts of two ranks; the second began at the checkpoint of step 4, not at 0 (a restart that
    # started over would also end at the same weights, so this is what shows the resume)
    assert [(r, s) for r, _, s in starts] == [(0, 0), (0, KILL_AT), (1, 0), (1, KILL_AT)], starts
    assert max(n for _, n, _ in starts) == 1  # torchrun's count of the restart
    assert any("failed (exitcode: -9)" in log for log in logs)  # the agent saw its worker killed
    # every step logged once: the resumed log dropped nothing and repeated nothing
    assert read_csv_columns(multi / "log.csv")["step"] == [1, 2, 3, 4, 5, 6]
    assert load_state(multi / "checkpoints" / "previous.pt")["step"] == 6 - 2  # the resumed run's own saves


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # torchrun's entry point (see the docstring)
    sys.exit(_worker(Path(sys.argv[2]), sys.argv[3:]))
