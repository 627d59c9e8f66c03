"""Defaults the command line shows in `--help`, in a module that imports nothing (`engine` and `heldout`, which
use them, import torch; `hf-bomerge --help` must not)."""

VERSION = "0.1.0"  # hf_bomerge.__version__; recorded in every recipe
DEFAULT_MAX_SHARD_SIZE = "2GB"  # transformers 5 would write one 50 GB shard
# The held-out token cap when --max-eval-tokens is not given, per device type. CPU: keeps a run in minutes (a trial
# of a 1B model is a forward over these tokens). CUDA: 4x the documents, so the confirm part (every 4th document)
# has its 20 units for an interval even where documents are long, at well under a second per trial there.
DEFAULT_MAX_EVAL_TOKENS = 16384
DEFAULT_MAX_EVAL_TOKENS_CUDA = 65536


def max_eval_tokens_for(device: str, given: int | None = None) -> int:
    """`given`, or the default cap for `device` ("cpu", "cuda", "cuda:1", ...).

    >>> max_eval_tokens_for("cpu"), max_eval_tokens_for("cuda:1"), max_eval_tokens_for("cuda", 4096)
    (16384, 65536, 4096)
    """
    if given:
        return given
    return DEFAULT_MAX_EVAL_TOKENS_CUDA if str(device).startswith("cuda") else DEFAULT_MAX_EVAL_TOKENS
DEFAULT_CONFIRM_FRACTION = 0.25  # search:confirm = 3:1 (every 4th held-out block)
