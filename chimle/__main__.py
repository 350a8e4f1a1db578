"""`python -m chimle ...` (also what `torchrun -m chimle train ...` runs)."""

import sys

from .apps.cli import main

sys.exit(main())
