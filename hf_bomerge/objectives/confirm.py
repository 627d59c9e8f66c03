"""An honest number: the held-out documents (or a metric's questions) split into a search part (all the GP sees)
and a confirm part, and a paired bootstrap interval over the confirm part's units for (merge − best baseline).

The best of many trials on one set is biased low; the confirm part was never used to choose anything, so the
merge and every baseline are compared there on equal terms. Whole documents go to one part (`split_documents`),
and the bootstrap resamples documents, so the blocks of one document are drawn together. An interval is reported
only from at least `MIN_UNITS` units: fewer would give a "95% interval" that means nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..defaults import DEFAULT_CONFIRM_FRACTION  # noqa: F401  (re-exported)

MIN_UNITS = 20  # fewer confirm units: the bootstrap's percentiles are too coarse and too optimistic to report
MIN_RUN = 64  # tokens: a run of one long text shorter than this says more about its neighbours than about itself
BOOTSTRAP_SAMPLES = 2000
Statistic = Callable[[Sequence, Sequence[int]], float]  # (per-unit outcomes, unit indices) -> objective value


def confirm_indices(n: int, fraction: float) -> list[int]:
    """The units of the confirm part: every i where ⌊(i+1)·f⌋ > ⌊i·f⌋ (f = 0.25: 3, 7, 11, …), spread so that
    both parts cover the whole set. Fewer than 2 confirm units (or no search unit left): none.

    >>> confirm_indices(8, 0.25), confirm_indices(4, 0.25)
    ([3, 7], [])
    """
    picked = [i for i in range(n) if math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)]
    return picked if fraction > 0 and 2 <= len(picked) < n else []


def split_documents(docs: Sequence[Sequence[int]], fraction: float, run: int) -> tuple[list, list, str]:
    """(search documents, confirm documents, what a confirm unit is). Whole documents go to one part: every
    document `confirm_indices` picks (every 4th for 0.25) is a confirm document, when that gives `MIN_UNITS` of
    them. When the documents are too few for that (long texts), the documents are cut into contiguous runs (of
    `run` tokens at most, shorter where that makes `MIN_UNITS` confirm runs, never under `MIN_RUN`) and the last
    runs, as many as the rule picks from the runs, are the confirm part: one contiguous stretch at the end, never
    interleaved with the search's. Below `MIN_UNITS` either way, documents are kept where there are any.

    >>> split_documents([[i] for i in range(8)], 0.25, 2)
    ([[0], [1], [2], [4], [5], [6]], [[3], [7]], 'documents')
    >>> split_documents([list(range(8))], 0.25, 1)
    ([[0], [1], [2], [3], [4], [5]], [[6], [7]], 'runs')
    >>> search, held, unit = split_documents([list(range(16384))], 0.25, 2048)  # one long text, 2048-token blocks
    >>> len(held), len(held[0]), unit
    (20, 204, 'runs')
    """
    if fraction <= 0:
        return list(docs), [], "documents"
    picked = confirm_indices(len(docs), fraction)
    if len(picked) < MIN_UNITS:
        total = sum(len(d) for d in docs)
        size = max(1, min(run, max(MIN_RUN, int(total * fraction) // MIN_UNITS)))
        runs = [doc[i:i + size] for doc in docs for i in range(0, len(doc), size)]
        k = len(confirm_indices(len(runs), fraction))
        if k >= MIN_UNITS or (k and not picked):
            return runs[:-k], runs[-k:], "runs"
    kept = set(picked)
    return [d for i, d in enumerate(docs) if i not in kept], [docs[i] for i in picked], "documents"


def too_few(units: int, unit: str, tokens: int, remedy: str = "") -> str:
    """What the summary and the card say instead of an interval from fewer than `MIN_UNITS` units; `remedy` is
    the objective's (`Objective.remedy`), else the held-out cap to raise.

    >>> too_few(8, "documents", 16384)
    'not enough held-out data for an interval (8 documents, 20 needed): raise --max-eval-tokens (now 16384) to about 40960'
    """
    return f"not enough held-out data for an interval ({units} {unit}, {MIN_UNITS} needed): " + (
        remedy or raise_cap(units, tokens))


def raise_cap(units: int, tokens: int) -> str:
    """The cap that would give about `MIN_UNITS` units, scaled from `units` read under `tokens`."""
    wanted = math.ceil(tokens * MIN_UNITS / max(units, 1) / 4096) * 4096
    return f"raise --max-eval-tokens (now {tokens}) to about {wanted}"


@dataclass(frozen=True)
class Confirmation:
    """The merge and the baselines on the confirm part, and the 95% interval of (merge − best baseline), None
    from fewer than `MIN_UNITS` units. `loss` holds the objective's value (a metric's, when `higher_is_better`);
    `units` counts the bootstrap's units and `unit` says what they are ("documents", "runs" of one long text,
    "questions"); `exported` names what the output holds ("merge", or the baseline `--fallback` kept). `as_dict`
    is `--json`'s `confirm`; `c["loss"]` reads a field as that dict would."""

    loss: float
    baselines: dict[str, float]
    best_baseline: str
    interval: tuple[float, float] | None
    units: int
    higher_is_better: bool = False
    exported: str = "merge"
    unit: str = "units"
    max_eval_tokens: int = 0  # the cap the held-out data was read under (what `too_few` says to raise)
    remedy: str = ""  # what gives more units, when the objective's data is not capped by --max-eval-tokens

    @property
    def verdict(self) -> str:
        """"better" (the whole interval), "better, interval includes 0", "better, no interval" (too few units)
        or "not better"."""
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
    def no_interval(self) -> str | None:
        """Why there is no interval (too few units, and the flag that fixes it), or None."""
        return None if self.interval else too_few(self.units, self.unit, self.max_eval_tokens, self.remedy)

    @property
    def delta(self) -> float:
        """merge − best baseline, in the objective's unit."""
        return self.loss - self.baselines[self.best_baseline]

    def as_dict(self) -> dict:
        return {"loss": self.loss, "baselines": self.baselines, "best_baseline": self.best_baseline,
                "interval": list(self.interval) if self.interval else None, "units": self.units, "unit": self.unit,
                "exported": self.exported, "max_eval_tokens": self.max_eval_tokens, "remedy": self.remedy}

    @classmethod
    def from_dict(cls, data: dict, higher_is_better: bool = False) -> Confirmation:
        """From `as_dict` (a study of schema 3 recorded `blocks`, and an interval from any number of them)."""
        units = data["units"] if "units" in data else data["blocks"]
        interval = tuple(data["interval"]) if data.get("interval") and units >= MIN_UNITS else None
        return cls(data["loss"], dict(data["baselines"]), data["best_baseline"], interval, units,
                   higher_is_better, data.get("exported", "merge"), data.get("unit", "blocks"),
                   data.get("max_eval_tokens", 0), data.get("remedy", ""))

    def __getitem__(self, key: str):
        return self.as_dict()[key]


def verdict(confirmed: dict, higher_is_better: bool = False) -> str:
    """What the confirm part says of the merge against the best baseline (`--json`'s `confirm`): "better" (the
    whole interval), "better, interval includes 0", "better, no interval" (fewer than `MIN_UNITS` units), or
    "not better".

    >>> verdict({"loss": 2.0, "baselines": {"a": 2.1}, "best_baseline": "a", "interval": [-0.2, 0.05]})
    'better, interval includes 0'
    """
    sign = -1 if higher_is_better else 1  # a gain is a lower loss, a higher metric
    delta = sign * (confirmed["loss"] - confirmed["baselines"][confirmed["best_baseline"]])
    if delta >= 0:
        return "not better"
    if not confirmed.get("interval"):
        return "better, no interval"
    worst_end = max(sign * v for v in confirmed["interval"])
    return "better" if worst_end < 0 else "better, interval includes 0"


def mean(values: Sequence[float], idx: Sequence[int]) -> float:
    """The mean of the per-unit values at `idx`."""
    return sum(values[i] for i in idx) / len(idx)


def confirm(merged: Sequence, baselines: dict[str, Sequence], statistic: Statistic = mean,
            higher_is_better: bool = False, seed: int = 0, unit: str = "units", max_eval_tokens: int = 0,
            remedy: str = "") -> Confirmation:
    """Per-unit outcomes (same units, same order) of the merge and of each baseline -> a `Confirmation`: e.g.
    per-unit values with `mean` (lower is better), per-document (NLL sum, tokens) with the loss's ratio, or
    per-question predictions with a metric's `statistic` (higher is better). Each bootstrap draw resamples the
    units and takes (merge − best baseline) on the same draw. From fewer than `MIN_UNITS` units, no interval.

    >>> c = confirm([1.0, 1.1, 0.9, 1.0] * 5, {"a": [1.2, 1.2, 1.1, 1.3] * 5, "b": [1.5, 1.4, 1.6, 1.5] * 5})
    >>> c.best_baseline, round(c.loss - c.baselines["a"], 3), c.merge_is_better
    ('a', -0.2, True)
    >>> confirm([1.00, 1.10], {"a": [1.05, 1.20]}).interval is None
    True
    """
    n = len(merged)
    every = range(n)
    value = {name: statistic(v, every) for name, v in baselines.items()}
    best = (max if higher_is_better else min)(value, key=value.get)
    interval = None
    if n >= MIN_UNITS:
        rng = random.Random(seed)
        draws = []
        for _ in range(BOOTSTRAP_SAMPLES):
            idx = [rng.randrange(n) for _ in every]
            draws.append(statistic(merged, idx) - statistic(baselines[best], idx))
        draws.sort()
        interval = draws[int(0.025 * BOOTSTRAP_SAMPLES)], draws[int(0.975 * BOOTSTRAP_SAMPLES) - 1]
    return Confirmation(statistic(merged, every), value, best, interval, n, higher_is_better, unit=unit,
                        max_eval_tokens=max_eval_tokens, remedy=remedy)
