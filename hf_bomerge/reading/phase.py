"""A cheap check before a merge: does the window reach into early training, where merging can hurt (PMA)?

PMA (Li et al. 2025) merges checkpoints of the constant-learning-rate phase. Early in training the weights
still drift steadily in one direction: an average of the window then lags behind its latest checkpoint and
can be worse than it. Later, the movement between checkpoints is dominated by noise around a slowly moving
point, which averaging removes. The signal is read from the checkpoints themselves, on a few sampled weight
matrices: the cosine between consecutive updates Δᵢ = θᵢ₊₁ − θᵢ and Δᵢ₊₁. It is clearly positive while the
weights drift (0.20 at steps 50→100→150 of benchmarks/reproduce.py's trajectory) and near zero or negative in
the stable phase (below 0.02 from step 250 on, −0.04 to −0.1 late). A window warns when any of its
consecutive update pairs has a cosine above `ALIGNED`: calibrated on that trajectory, where it warns on both
windows whose uniform average was worse than their latest checkpoint and on none of the 11 where it was better
(benchmarks/README.md, "Reproducing the papers"). It needs at least 3 checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("hf_bomerge")

SAMPLE_TENSORS = 4  # weight matrices read per checkpoint (evenly spaced through the model)
SAMPLE_ELEMENTS = 1 << 20  # at most this many evenly strided elements of each, in float64
ALIGNED = 0.1  # cos(Δᵢ, Δᵢ₊₁) above this: the weights still drift one way (see the module docstring)
MESSAGE = ("the window reaches into early training, where merging can hurt (PMA): the weights still drift one way "
           "there ({detail}). Prefer later revisions, or check the merge against the latest checkpoint.")


@dataclass(frozen=True)
class Phase:
    """What the check measured over the window (oldest first)."""

    changes: list[float]  # ‖θᵢ₊₁ − θᵢ‖ / ‖θᵢ₊₁‖ for each consecutive pair
    cosines: list[float]  # cos(Δᵢ, Δᵢ₊₁) for each two consecutive updates

    @property
    def early(self) -> bool:
        return max(self.cosines, default=0.0) > ALIGNED


def sample_names(ckpts, k: int = SAMPLE_TENSORS) -> list[str]:
    """Up to `k` merged weight matrices (2-D), evenly spaced in the checkpoint's order (else any merged tensors).

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
    return [matrices[round(i * (len(matrices) - 1) / (k - 1))] for i in range(k)] if k > 1 else matrices[-1:]


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    step = max(1, -(-flat.numel() // SAMPLE_ELEMENTS))
    return flat[::step].double()


def measure(ckpts, names: Sequence[str] | None = None) -> Phase | None:
    """The window's `Phase` over the tensors `names` (default `sample_names`); None for fewer than 3 checkpoints.

    >>> measure(CheckpointSet(["run/step100", "run/step200", "run/step300"]))   # doctest: +SKIP
    Phase(changes=[0.53, 0.45], cosines=[0.2])
    """
    n = len(ckpts)
    if n < 3:
        return None
    names = list(names) if names is not None else sample_names(ckpts)
    diff, norm, dot = [0.0] * (n - 1), [0.0] * (n - 1), [0.0] * (n - 2)
    for name in names:
        tensors = [_sample(t) for t in ckpts.tensors(name)]
        deltas = [b - a for a, b in zip(tensors, tensors[1:])]
        for i, d in enumerate(deltas):
            diff[i] += float(torch.sum(d * d))
            norm[i] += float(torch.sum(tensors[i + 1] ** 2))
            if i + 1 < len(deltas):
                dot[i] += float(torch.sum(d * deltas[i + 1]))
        ckpts.release(name)
    changes = [math.sqrt(d / m) if m > 0 else 0.0 for d, m in zip(diff, norm)]
    cosines = [x / math.sqrt(diff[i] * diff[i + 1]) if diff[i] * diff[i + 1] > 0 else 0.0 for i, x in enumerate(dot)]
    return Phase(changes, cosines)


def warn_if_early(ckpts, labels: Sequence[str]) -> Phase | None:
    """Log a warning when the merge window reaches into early training; return what was measured.

    >>> warn_if_early(CheckpointSet(folders, names), names)   # doctest: +SKIP
    """
    found = measure(ckpts)
    if found is not None and found.early:
        i = found.cosines.index(max(found.cosines))
        detail = (f"the updates {labels[i]}→{labels[i + 1]}→{labels[i + 2]} have a cosine of {found.cosines[i]:.2f}, "
                  f"a stable phase's are near 0 or below; relative change {found.changes[i]:.2g} per checkpoint")
        logger.warning(MESSAGE.format(detail=detail))
    return found
