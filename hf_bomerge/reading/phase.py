"""A cheap check before a merge: where in training does the window lie, and does a revision jump out of it?

Read from the checkpoints themselves, on a few sampled weight matrices (and from `trainer_state.json` where the
HF Trainer wrote one):

- **Early training** (PMA, Li et al. 2025: merging there can hurt): the weights still drift steadily in one
  direction, so an average of the window lags behind its latest checkpoint. The signal is the cosine between
  consecutive updates Δᵢ = θᵢ₊₁ − θᵢ and Δᵢ₊₁: clearly positive while the weights drift (0.20 at steps 50→100→150
  of the trajectories benchmarks/phase_bench.py trains) and near zero or negative in the stable phase (below 0.03
  from step 250 on, 50 steps apart). Above `ALIGNED` the window warns, unless it lies in a decay (below).
- **A learning-rate decay** (cosine, WSD; Pythia's late checkpoints lie in a cosine decay to 10%): the merge gain
  of the stable phase largely disappears there (0.002–0.08 nats/token for the uniform average over the latest
  checkpoint in the decays trained here, 0.09–0.14 at a constant rate from step 350 on), and an average spanning
  much of the decay loses to its latest checkpoint. Adam's update size follows the learning rate and barely moves
  at a constant one: the fitted norm of the sampled updates, window end over start, stayed within 0.98–1.09 over
  the constant-LR run's 8-checkpoint windows (early ones included) and 0.84–0.97 over its windows spaced 200–300
  steps, and fell to 0.14–0.87 over the decays. So the window is a decay below `SHRUNK` (evenly spaced revisions
  only) — or, where every revision's trainer_state.json logs the learning rate, where that falls below `LR_DECAYED`
  times its start. A decay's steady direction also raises the cosine above (0.13–0.29 for decay windows spaced
  200–300 steps): a decaying window is never called early.
- **A discontinuity**: a revision whose sampled tensor is much farther from its neighbours than they are from each
  other (pythia-12b's step50000 serves the final model's first shard, EleutherAI/pythia#206). For an interior
  revision j the score is min(‖θⱼ − θⱼ₋₁‖, ‖θⱼ₊₁ − θⱼ‖) / ‖θⱼ₊₁ − θⱼ₋₁‖ (about 0.5 for a steady drift, 1 for noise
  around a point); for the first or last revision, its distance to its neighbour over that neighbour's to the next
  one. Distances are per square root of progress (steps or tokens, from the names), so uneven spacing is not read
  as a jump. Above `JUMP` for any sampled tensor, the revision is named with the distances (every revision of every
  window of the trajectories trained here scored at most 1.22).

The thresholds are calibrated in benchmarks/phase_bench.py (benchmarks/README.md, "Merging across LR phases").
It needs at least 3 checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import RevisionError
from ..sources.revisions import progress_values
from .trainer_state import learning_rates
from .verdict import Jump, WindowPhase

logger = logging.getLogger("hf_bomerge")

SAMPLE_TENSORS = 4  # weight matrices read per checkpoint (evenly spaced through the model; + one per other shard)
SAMPLE_ELEMENTS = 1 << 20  # at most this many evenly strided elements of each, in float64
ALIGNED = 0.1  # cos(Δᵢ, Δᵢ₊₁) above this: the weights still drift one way (see the module docstring)
SHRUNK = 0.8  # fitted update norm, window end / start, below this: a decay
LR_DECAYED = 0.8  # logged learning rate, window end / start, below this: a decay
EVEN = 1.5  # the update norms decide a decay only where no gap between revisions is EVEN× another
JUMP = 3.0  # a revision this many times farther from its neighbours than the trend: a discontinuity


@dataclass(frozen=True)
class Phase:
    """What the check measured over the window (oldest first)."""

    changes: list[float]  # ‖θᵢ₊₁ − θᵢ‖ / ‖θᵢ₊₁‖ for each consecutive pair
    cosines: list[float]  # cos(Δᵢ, Δᵢ₊₁) for each two consecutive updates
    updates: list[float] = field(default_factory=list)  # ‖Δᵢ‖ per √(progress between them)
    positions: list[float] = field(default_factory=list)  # each revision's progress (its index without one)
    jumps: list[Jump] = field(default_factory=list)
    rates: list[float] | None = None  # the logged learning rate per revision (trainer_state.json), if all log it

    @property
    def update_ratio(self) -> float | None:
        """The update norm at the window's end over its start, from a least-squares line through log ‖Δᵢ‖."""
        pts = [((a + b) / 2, math.log(u)) for a, b, u in zip(self.positions, self.positions[1:], self.updates)
               if u > 0]
        if len(pts) < 2:
            return None
        mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else 0.0
        return math.exp(slope * (pts[-1][0] - pts[0][0]))

    @property
    def lr_ratio(self) -> float | None:
        return self.rates[-1] / self.rates[0] if self.rates and self.rates[0] > 0 else None

    @property
    def decaying(self) -> bool:
        if self.lr_ratio is not None:
            return self.lr_ratio < LR_DECAYED
        ratio, gaps = self.update_ratio, [b - a for a, b in zip(self.positions, self.positions[1:])]
        even = max(gaps) <= EVEN * min(gaps)  # uneven spacing mixes drift (∝ gap) with noise (∝ √gap): no verdict
        return even and ratio is not None and ratio < SHRUNK

    @property
    def early(self) -> bool:
        return max(self.cosines, default=0.0) > ALIGNED and not self.decaying


def sample_names(ckpts, k: int = SAMPLE_TENSORS) -> list[str]:
    """Up to `k` merged weight matrices (2-D), evenly spaced in the checkpoint's order (else any merged tensors),
    and one more from every weight file none of those is in (a swapped shard shows in its own tensors).

    The largest matrices (embeddings, head) are left out when enough others remain: they cost the most to read."""
    names = ckpts.merged_names
    matrices = [n for n in names if len(ckpts.infos[n].shape) == 2] or names
    if not matrices:
        return []
    largest = max(ckpts.infos[n].numel for n in matrices)
    smaller = [n for n in matrices if ckpts.infos[n].numel < largest]
    matrices = smaller if len(smaller) >= k else matrices
    if len(matrices) <= k:
        return matrices
    picked = [matrices[round(i * (len(matrices) - 1) / (k - 1))] for i in range(k)] if k > 1 else matrices[-1:]
    where = ckpts.reference.file_index
    covered = {where(n) for n in picked}
    for name in sorted(names, key=lambda n: (len(ckpts.infos[n].shape) != 2, ckpts.infos[n].numel)):  # a matrix
        if where(name) not in covered:
            picked.append(name)
            covered.add(where(name))
    return picked


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    step = max(1, -(-flat.numel() // SAMPLE_ELEMENTS))
    return flat[::step].double()


def measure(ckpts, names: Sequence[str] | None = None, labels: Sequence[str] | None = None,
            folders: Sequence | None = None) -> Phase | None:
    """The window's `Phase` over the tensors `names` (default `sample_names`); None for fewer than 3 checkpoints.
    `labels` (the revision names) place the revisions in training progress; `folders`, where given, are read for
    trainer_state.json's learning rates.

    >>> measure(CheckpointSet(["run/step100", "run/step200", "run/step300"]))   # doctest: +SKIP
    Phase(changes=[0.53, 0.45], cosines=[0.2], ...)
    """
    n = len(ckpts)
    if n < 3:
        return None
    names = list(names) if names is not None else sample_names(ckpts)
    positions = _positions(labels, n)
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    diff, norm, dot = [0.0] * (n - 1), [0.0] * (n - 1), [0.0] * (n - 2)
    per_tensor = []
    for name in names:
        tensors = [_sample(t) for t in ckpts.tensors(name)]
        deltas = [b - a for a, b in zip(tensors, tensors[1:])]
        sq = [float(torch.sum(d * d)) for d in deltas]
        dots = [float(torch.sum(a * b)) for a, b in zip(deltas, deltas[1:])]
        for i in range(n - 1):
            diff[i] += sq[i]
            norm[i] += float(torch.sum(tensors[i + 1] ** 2))
            if i < n - 2:
                dot[i] += dots[i]
        per_tensor.append((name, sq, dots))
        ckpts.release(name)
    changes = [math.sqrt(d / m) if m > 0 else 0.0 for d, m in zip(diff, norm)]
    cosines = [x / math.sqrt(diff[i] * diff[i + 1]) if diff[i] * diff[i + 1] > 0 else 0.0 for i, x in enumerate(dot)]
    updates = [math.sqrt(d / g) for d, g in zip(diff, gaps)]
    found = learning_rates(folders) if folders is not None else None
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    jumps = _jumps(per_tensor, gaps, labels)
    return Phase(changes, cosines, updates, positions, jumps, found[0] if found else None)


def _positions(labels: Sequence[str] | None, n: int) -> list[float]:
    """Each revision's training progress from its name, else its index (even spacing)."""
    if labels is not None:
        try:
            return progress_values(list(labels))[0]
        except RevisionError:  # names without progress (or spanning stages): even spacing assumed
            pass
    return [float(i) for i in range(n)]


def _jumps(per_tensor, gaps: Sequence[float], labels: Sequence[str]) -> list[Jump]:
    """Revisions discontinuous with their neighbours (see the module docstring), the worst tensor each."""
    n = len(labels)
    worst: dict[int, Jump] = {}
    for name, sq, dots in per_tensor:
        for j in range(n):
            jump = _jump(j, name, sq, dots, gaps, labels)
            if jump.score > JUMP and jump.score > getattr(worst.get(j), "score", 0.0):
                worst[j] = jump
    return [worst[j] for j in sorted(worst)]


def _jump(j: int, name: str, sq: Sequence[float], dots: Sequence[float], gaps: Sequence[float],
          labels: Sequence[str]) -> Jump:
    """Revision j's score on one tensor: the distances that show it (squared ones per unit of progress compared)."""

    def dist(i: int, k: int) -> float:  # ‖θₖ − θᵢ‖², k = i + 1 or i + 2
        return sq[i] if k == i + 1 else max(0.0, sq[i] + sq[i + 1] + 2 * dots[i])

    def rate(i: int, k: int) -> float:
        return dist(i, k) / sum(gaps[i:k])

    n = len(labels)
    if 0 < j < n - 1:  # its two legs against the direct path between its neighbours
        pairs, base, around = [(j - 1, j), (j, j + 1)], (j - 1, j + 1), [j - 1, j + 1]
    elif j == 0:  # its leg (and the path past its neighbour) against the neighbour's next leg
        pairs, base, around = [(0, 1), (0, 2)], (1, 2), [1, 2]
    else:
        pairs, base, around = [(n - 2, n - 1), (n - 3, n - 1)], (n - 3, n - 2), [n - 2, n - 3]
    low = min(rate(*p) for p in pairs)
    score = math.sqrt(low / rate(*base)) if rate(*base) > 0 else 0.0  # identical neighbours: `duplicates`' business
    return Jump(labels[j], [labels[i] for i in around], name, [math.sqrt(dist(*p)) for p in pairs],
                math.sqrt(dist(*base)), score)


def verdict(found: Phase | None, labels: Sequence[str]) -> WindowPhase | None:
    """The record the result carries: the stage and what measured it."""
    if found is None:
        return None
    cosine = max(found.cosines, default=0.0)
    if found.decaying:
        if found.lr_ratio is not None:
            evidence = (f"the learning rate trainer_state.json logs falls from {found.rates[0]:.3g} at {labels[0]} to "
                        f"{found.rates[-1]:.3g} at {labels[-1]}")
        else:
            evidence = (f"the sampled updates shrink to {found.update_ratio:.2f}x their size along it, "
                        f"{labels[0]} to {labels[-1]}, as the learning rate does in a decay")
        stage = "decay"
    elif found.early:
        i = found.cosines.index(cosine)
        evidence = (f"the updates {labels[i]}→{labels[i + 1]}→{labels[i + 2]} have a cosine of {cosine:.2f}, "
                    f"a stable phase's are near 0 or below; relative change {found.changes[i]:.2g} per checkpoint")
        stage = "early"
    else:
        stage, evidence = "stable", ""
    return WindowPhase(stage, evidence, found.update_ratio, cosine, found.rates, list(found.jumps))


def check(ckpts, labels: Sequence[str], folders: Sequence | None = None) -> WindowPhase | None:
    """Measure the window, log a warning for early training, a decay and each discontinuity (the summary and the
    card say them again), and return the record.

    >>> check(CheckpointSet(folders, names), names, folders)   # doctest: +SKIP
    """
    found = verdict(measure(ckpts, labels=labels, folders=folders), labels)
    for sentence in found.sentences() if found is not None else ():
        logger.warning(sentence)
    return found
