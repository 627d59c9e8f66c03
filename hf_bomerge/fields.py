"""How a spec field declares its command-line option (`option`), and the checks its value gets (`positive`,
`one_of`, `text`): one small module that imports nothing heavy, for `hf_bomerge.specs` (`hf_bomerge.cli.options` reads the
declarations).

>>> positive("--batch-size", 0)
Traceback (most recent call last):
...
hf_bomerge.errors.OptionError: --batch-size must be positive, got 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from .errors import OptionError

EVAL_DTYPES = ("float32", "float16", "bfloat16", "float64")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# `SourceSpec.config`, `SourceSpec.key_map`: what a folder of distributed checkpoints (DCP) needs
DCP_CONFIG = dict(help="DCP checkpoints: the HF config (folder or config.json) of the model the run trains",
                  metavar="PATH", shown="the checkpoint folder's config.json")
DCP_KEY_MAP = dict(help="DCP checkpoints: a file of `RUN_NAME = HF_NAME` rules, or accelerate, torchtitan-llama, "
                   "identity", metavar="FILE_OR_NAME", shown="from the run's names")


def option(default: Any, help: str, **cli) -> Any:
    """A spec field that is also a command-line option and a Python keyword (`hf_bomerge.cli.options` builds both):
    its default and help are written here, once. `cli`: `type`, `choices`, `metavar`, `action`, `flag` (default
    `--field-name`), `keyword` (default the field's name), `dest`, `shown` (the default as the help words it,
    where the value alone would not say it), `unset` (the option's own default is None: "not given").

    >>> field_ = option(4, "blocks per forward pass", type=int)
    >>> field_.default, field_.metadata["help"]
    (4, 'blocks per forward pass')
    """
    return field(default=default, metadata={"help": help, **cli})


def positive(flag: str, value, allow_zero: bool = False, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        floor = "0 or more" if allow_zero else "positive"
        raise OptionError(f"{flag} must be {floor}, got {value!r}.")


def one_of(flag: str, value, choices: Sequence[str], optional: bool = True) -> None:
    if not (optional and value is None) and value not in choices:
        raise OptionError(f"Unknown {flag} {value!r}; choose one of {', '.join(choices)}.")


def text(flag: str, value, optional: bool = True) -> None:
    if not (optional and value is None) and not (isinstance(value, str) and value.strip()):
        raise OptionError(f"{flag} takes a non-empty text, got {value!r}.")
