"""Defaults the command line shows in `--help`, in a module that imports nothing (`engine` and `heldout`, which
use them, import torch; `hf-bomerge --help` must not)."""

VERSION = "0.1.0"  # hf_bomerge.__version__; recorded in every recipe
DEFAULT_MAX_SHARD_SIZE = "2GB"  # transformers 5 would write one 50 GB shard
DEFAULT_MAX_EVAL_TOKENS = 16384  # keeps a CPU run in minutes
DEFAULT_CONFIRM_FRACTION = 0.25  # search:confirm = 3:1 (every 4th held-out block)
