"""`python -m chimle ...` (also what `torchrun -m chimle train ...` runs)."""

import sys

from .cli import main

sys.exit(main())
