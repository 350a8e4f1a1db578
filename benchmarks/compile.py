"""Does torch.compile pay off? Eager against compiled search and training step, same run.

    python benchmarks/compile.py --threads 1              # tiny + small presets on this machine

Prints the compiled throughput, its ratio to eager and the time of the first (compiling) call.
Keep `search.compile` (configs) off unless this shows a gain on your hardware; the training step
has no compile switch: on a CPU it measured no gain.
"""

import sys

from chimle.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "speed", "--compile", "--only", "search,train", *sys.argv[1:]]))
