"""An honest number: held-out blocks split into a search part (all the GP sees) and a confirm part, and a
paired bootstrap interval over confirm blocks for (merge − best baseline).

The best of many trials on one set is biased low; the confirm part was never used to choose anything, so the
merge and every baseline are compared there on equal terms.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_CONFIRM_FRACTION = 0.25  # search:confirm = 3:1
BOOTSTRAP_SAMPLES = 2000


def split_blocks(blocks: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(search, confirm): every block i where ⌊(i+1)·f⌋ > ⌊i·f⌋ goes to confirm (f = 0.25: blocks 3, 7, 11, …),
    interleaved so that both parts cover the whole text. Fewer than 2 confirm blocks: no confirm part.

    >>> [len(p) for p in split_blocks(torch.zeros(8, 2), 0.25)]
    [6, 2]
    """
    n = len(blocks)
    picked = [i for i in range(n) if math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)]
    if fraction <= 0 or len(picked) < 2 or len(picked) >= n:
        return blocks, blocks[:0]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[picked] = True
    return blocks[~mask], blocks[mask]


@dataclass
class Confirmation:
    """The merge and the baselines on the confirm part, and the 95% interval of (merge − best baseline)."""

    loss: float
    baselines: dict[str, float]
    best_baseline: str
    interval: tuple[float, float]
    blocks: int

    @property
    def merge_is_better(self) -> bool:
        """Whether the whole interval says the merge's loss is lower than the best baseline's."""
        return self.interval[1] < 0

    def as_dict(self) -> dict:
        return {"loss": self.loss, "baselines": self.baselines, "best_baseline": self.best_baseline,
                "interval": list(self.interval), "blocks": self.blocks}


def confirm(merged: Sequence[float], baselines: dict[str, Sequence[float]], seed: int = 0) -> Confirmation:
    """Per-block losses (same blocks, same order) of the merge and of each baseline -> a `Confirmation`.

    >>> c = confirm([1.0, 1.1, 0.9, 1.0], {"a": [1.2, 1.2, 1.1, 1.3], "b": [1.5, 1.4, 1.6, 1.5]})
    >>> c.best_baseline, round(c.loss - c.baselines["a"], 3), c.merge_is_better
    ('a', -0.2, True)
    """
    mean = {name: sum(v) / len(v) for name, v in baselines.items()}
    best = min(mean, key=mean.get)
    diffs = [m - b for m, b in zip(merged, baselines[best])]
    rng = random.Random(seed)
    n = len(diffs)
    draws = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    lo, hi = draws[int(0.025 * BOOTSTRAP_SAMPLES)], draws[int(0.975 * BOOTSTRAP_SAMPLES) - 1]
    return Confirmation(sum(merged) / n, mean, best, (lo, hi), n)
