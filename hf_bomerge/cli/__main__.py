"""`python -m hf_bomerge.cli ...`: the same as the `hf-bomerge` command."""

import sys

from . import main

sys.exit(main())
