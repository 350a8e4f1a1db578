"""Speed and memory of the latent search, the training step and sampling, per model preset.

    python benchmarks/speed.py                          # tiny + small (+ paper on CUDA), table on stdout
    python benchmarks/speed.py --quick                  # < 30 s smoke run
    python benchmarks/speed.py --presets paper          # the authors' size (on a CPU: tiny counts, slow)
    python benchmarks/speed.py --threads 1 --json out.json

The same as `chimle bench speed`; `chimle bench speed --help` lists every option.
"""

import sys

from chimle.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", *sys.argv[1:]]))
