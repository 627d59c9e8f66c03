"""The learning rate a revision was saved at, from the HF Trainer's `trainer_state.json` beside its weights.

The Trainer writes `trainer_state.json` into every `checkpoint-N` folder; its `log_history` entries carry the
`learning_rate` of each logged step. The file is untrusted input like the weights: its size is capped, and only
finite, non-negative numbers of entries that are JSON objects are read; anything else means "not logged".

>>> import json, pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "trainer_state.json").write_text(json.dumps({"log_history": [
...     {"step": 10, "learning_rate": 3e-4, "loss": 4.1}, {"step": 20, "learning_rate": 2e-4}, {"eval_loss": 4.0}]}))
>>> learning_rate(d)
0.0002
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

NAME = "trainer_state.json"
MAX_BYTES = 64 << 20  # a long run's log_history is a few MB; more is not a Trainer's file


def logged_rates(folder: Path) -> list[float]:
    """The `learning_rate` of every `log_history` entry that has one, in the file's order ([] when none)."""
    path = Path(folder) / NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return []
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        return []
    rates = []
    for entry in history:
        value = entry.get("learning_rate") if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            rates.append(float(value))
    return rates


def learning_rate(folder: Path) -> float | None:
    """The last learning rate `trainer_state.json` logged before the revision was saved, or None."""
    rates = logged_rates(folder)
    return rates[-1] if rates else None


def learning_rates(folders: Sequence[Path]) -> tuple[list[float], float] | None:
    """Each revision's learning rate and the peak the latest one's log reached, or None unless every revision
    logs one (a window half logged says nothing of its shape)."""
    rates = [learning_rate(f) for f in folders]
    if any(r is None for r in rates):
        return None
    return rates, max(logged_rates(folders[-1]))
