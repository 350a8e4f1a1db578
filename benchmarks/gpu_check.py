"""The CUDA path checked and measured in one run: bf16 vs float32 search and training, throughput against
the GPU's bf16 matmul peak, paper-preset memory, DDP, tiled 4096 x 4096 sampling.

    python benchmarks/gpu_check.py                   # every check; estimated 4-6 minutes on an H100 / H200
    python benchmarks/gpu_check.py --quick --json gpu.json
    python benchmarks/gpu_check.py --budget 300      # seconds: later checks are skipped, and say so

The same as `chimle bench gpu`; `chimle bench gpu --help` lists every option.
Without a GPU it runs the bf16 agreement checks on the CPU and names the checks it skipped.
"""

import sys

from chimle.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
