"""`python -m residency_gate ...`: the same as the `residency-gate` console script."""

import sys

from .cli import main

sys.exit(main())
