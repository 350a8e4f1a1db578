"""The batched latent search against a straightforward one: same codes, how much faster.

    python benchmarks/search_vs_naive.py                    # tiny + small presets
    python benchmarks/search_vs_naive.py --presets paper    # the authors' size (slow on a CPU)

`chimle.search.reference_hierarchical` runs Algorithm 1 of CHIMLE one candidate at a time, rerunning
the earlier levels and recomputing the target's LPIPS features for every candidate, in float32,
without chunking or weight-norm caching. Both searches draw the same candidates; the benchmark
asserts they choose the same codes and prints the speed-up measured in the same run, beside the
fast search's per-level throughput.
"""

import sys

from chimle.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", "--only", "search,naive", *sys.argv[1:]]))
