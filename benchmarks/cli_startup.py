"""Start-up time of the `chimle` command: how long `chimle --help` and an argument error take.

    python benchmarks/cli_startup.py             # best of 3 runs of each
    python benchmarks/cli_startup.py --runs 5

Each case runs `python -m chimle ...` (what the `chimle` script runs) as a fresh subprocess and times it
from start to exit; the best of `--runs` is printed, with the modules it imported that matter for the time
(torch). The first run also pays for reading the files from disk; the best one is the page-cached figure
a user sees from the second call on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = {
    "chimle --help": ["--help"],
    "chimle bench speed --help": ["bench", "speed", "--help"],
    "chimle sample (argument error: no INPUT)": ["sample", "sr8-small"],
    "chimle trian (argument error: unknown command)": ["trian"],
}


def time_once(args: list[str]) -> tuple[float, int]:
    """Seconds from start to exit of `python -m chimle ARGS`, and its exit status."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "chimle", *args], capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode


def imports_torch(args: list[str]) -> bool:
    """Whether `chimle ARGS` imports torch before it exits (argparse exits through SystemExit)."""
    code = (
        "import sys\nfrom chimle.apps.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    return proc.stderr.strip().splitlines()[-1:] == ["True"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each case; the best is printed (default 3)")
    a = p.parse_args(argv)
    base = min(time_once_python() for _ in range(a.runs))
    print(f"{'case':48s} {'best s':>7s} {'exit':>4s}  torch imported")
    print(f"{'python -c pass (the interpreter alone)':48s} {base:7.3f} {0:4d}  -")
    for name, args in CASES.items():
        runs = [time_once(args) for _ in range(a.runs)]
        best, rc = min(runs)
        print(f"{name:48s} {best:7.3f} {rc:4d}  {'yes' if imports_torch(args) else 'no'}")
    return 0


def time_once_python() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
