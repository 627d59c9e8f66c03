"""An honest number: held-out blocks (or a metric's questions) split into a search part (all the GP sees) and a
confirm part, and a paired bootstrap interval over the confirm part's units for (merge − best baseline).

The best of many trials on one set is biased low; the confirm part was never used to choose anything, so the
merge and every baseline are compared there on equal terms.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..defaults import DEFAULT_CONFIRM_FRACTION  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # the interval's arithmetic needs no torch: a result (and --help) imports this module
    import torch

BOOTSTRAP_SAMPLES = 2000
Statistic = Callable[[Sequence, Sequence[int]], float]  # (per-unit outcomes, unit indices) -> objective value


def confirm_indices(n: int, fraction: float) -> list[int]:
    """The units of the confirm part: every i where ⌊(i+1)·f⌋ > ⌊i·f⌋ (f = 0.25: 3, 7, 11, …), interleaved so
    that both parts cover the whole set. Fewer than 2 confirm units (or no search unit left): none.

    >>> confirm_indices(8, 0.25), confirm_indices(4, 0.25)
    ([3, 7], [])
    """
    picked = [i for i in range(n) if math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)]
    return picked if fraction > 0 and 2 <= len(picked) < n else []


def split_blocks(blocks: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(search, confirm) blocks, the confirm part as `confirm_indices` picks it.

    >>> import torch
    >>> [len(p) for p in split_blocks(torch.zeros(8, 2), 0.25)]
    [6, 2]
    """
    import torch

    n, picked = len(blocks), confirm_indices(len(blocks), fraction)
    if not picked:
        return blocks, blocks[:0]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[picked] = True
    return blocks[~mask], blocks[mask]


@dataclass(frozen=True)
class Confirmation:
    """The merge and the baselines on the confirm part, and the 95% interval of (merge − best baseline).
    `loss` holds the objective's value (a metric's, when `higher_is_better`); `blocks` counts the units;
    `exported` names what the output holds ("merge", or the baseline `--fallback` kept). `as_dict` is `--json`'s
    `confirm`; `c["loss"]` reads a field as that dict would."""

    loss: float
    baselines: dict[str, float]
    best_baseline: str
    interval: tuple[float, float]
    blocks: int
    higher_is_better: bool = False
    exported: str = "merge"

    @property
    def verdict(self) -> str:
        """"better" (the whole interval), "better, interval includes 0", or "not better"."""
        return verdict(self.as_dict(), self.higher_is_better)

    @property
    def merge_is_better(self) -> bool:
        """Whether the whole interval says the merge beats the best baseline."""
        return self.verdict == "better"

    @property
    def merge_wins(self) -> bool:
        """Whether the merge beats the best baseline at all on the confirm part (interval aside)."""
        return self.verdict != "not better"

    @property
    def delta(self) -> float:
        """merge − best baseline, in the objective's unit."""
        return self.loss - self.baselines[self.best_baseline]

    def as_dict(self) -> dict:
        return {"loss": self.loss, "baselines": self.baselines, "best_baseline": self.best_baseline,
                "interval": list(self.interval), "blocks": self.blocks, "exported": self.exported}

    @classmethod
    def from_dict(cls, data: dict, higher_is_better: bool = False) -> Confirmation:
        return cls(data["loss"], dict(data["baselines"]), data["best_baseline"], tuple(data["interval"]),
                   data["blocks"], higher_is_better, data.get("exported", "merge"))

    def __getitem__(self, key: str):
        return self.as_dict()[key]


def verdict(confirmed: dict, higher_is_better: bool = False) -> str:
    """What the confirm part says of the merge against the best baseline (`--json`'s `confirm`): "better" (the
    whole interval), "better, interval includes 0", or "not better".

    >>> verdict({"loss": 2.0, "baselines": {"a": 2.1}, "best_baseline": "a", "interval": [-0.2, 0.05]})
    'better, interval includes 0'
    """
    sign = -1 if higher_is_better else 1  # a gain is a lower loss, a higher metric
    delta = sign * (confirmed["loss"] - confirmed["baselines"][confirmed["best_baseline"]])
    worst_end = max(sign * v for v in confirmed["interval"])
    return "better" if worst_end < 0 else "better, interval includes 0" if delta < 0 else "not better"


def mean(values: Sequence[float], idx: Sequence[int]) -> float:
    """The loss's statistic: the mean of the per-block losses at `idx`."""
    return sum(values[i] for i in idx) / len(idx)


def confirm(merged: Sequence, baselines: dict[str, Sequence], statistic: Statistic = mean,
            higher_is_better: bool = False, seed: int = 0) -> Confirmation:
    """Per-unit outcomes (same units, same order) of the merge and of each baseline -> a `Confirmation`: per-block
    losses with `mean` (lower is better), or per-question predictions with a metric's `statistic` (higher is
    better). Each bootstrap draw resamples the units and takes (merge − best baseline) on the same draw.

    >>> c = confirm([1.0, 1.1, 0.9, 1.0], {"a": [1.2, 1.2, 1.1, 1.3], "b": [1.5, 1.4, 1.6, 1.5]})
    >>> c.best_baseline, round(c.loss - c.baselines["a"], 3), c.merge_is_better
    ('a', -0.2, True)
    """
    n = len(merged)
    every = range(n)
    value = {name: statistic(v, every) for name, v in baselines.items()}
    best = (max if higher_is_better else min)(value, key=value.get)
    rng = random.Random(seed)
    draws = []
    for _ in range(BOOTSTRAP_SAMPLES):
        idx = [rng.randrange(n) for _ in every]
        draws.append(statistic(merged, idx) - statistic(baselines[best], idx))
    draws.sort()
    lo, hi = draws[int(0.025 * BOOTSTRAP_SAMPLES)], draws[int(0.975 * BOOTSTRAP_SAMPLES) - 1]
    return Confirmation(statistic(merged, every), value, best, (lo, hi), n, higher_is_better)
