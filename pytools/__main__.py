"""`python -m turboquant_llama ...` is `tq ...` (where the console script is not on PATH)."""

import sys

from .cli import main

sys.exit(main())
