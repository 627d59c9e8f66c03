"""The confirm part: a deterministic 3:1 split of the held-out blocks, the paired bootstrap interval, and
`--fallback`. (That the search sees only its part and the confirm numbers are the saved model's is checked
against transformers' own loss in test_cli.py and test_reported_numbers.py.)"""

from __future__ import annotations

import random

import pytest
import torch

from hf_bomerge.api import _confirm
from hf_bomerge.objectives.confirm import confirm, split_blocks
from hf_bomerge.objectives.evaluator import CONFIRM
from hf_bomerge.objectives.loss import HeldOutLoss
from hf_bomerge.result import MergeResult


def test_split_is_interleaved_deterministic_and_disjoint():
    blocks = torch.arange(40).view(20, 2)
    search, held = split_blocks(blocks, 0.25)
    assert held[:, 0].tolist() == [6, 14, 22, 30, 38]  # blocks 3, 7, 11, 15, 19
    assert len(search) == 15 and not set(search[:, 0].tolist()) & set(held[:, 0].tolist())
    assert torch.equal(split_blocks(blocks, 0.25)[1], held)
    assert len(split_blocks(blocks, 0.0)[1]) == 0  # 0 turns it off
    assert len(split_blocks(blocks[:5], 0.25)[1]) == 0  # fewer than 2 confirm blocks: no confirm part


def test_bootstrap_interval_brackets_the_paired_difference():
    rng = random.Random(1)
    base = [3.0 + rng.gauss(0, 0.3) for _ in range(64)]
    better = [b - 0.05 + rng.gauss(0, 0.01) for b in base]  # a small, consistent gain on every block
    worse = [b + 0.02 + rng.gauss(0, 0.2) for b in base]
    good = confirm(better, {"latest": base, "uniform": [b + 0.1 for b in base]})
    assert good.best_baseline == "latest" and good.merge_is_better
    lo, hi = good.interval
    assert lo < good.loss - good.baselines["latest"] < hi < 0
    bad = confirm(worse, {"latest": base})
    assert not bad.merge_is_better and bad.interval[0] < bad.interval[1]
    assert confirm(worse, {"latest": base}).interval == bad.interval  # seeded: the same interval every time


LOSS = HeldOutLoss(torch.zeros(8, 4, dtype=torch.long), 1, 0.25)  # the loss objective's statistic and direction


def _result() -> MergeResult:
    return MergeResult("run", ["a", "b"], ["1" * 40, "2" * 40], [0.4, 0.6], loss=2.0,
                       baselines={"a": 2.2, "b": 2.1, "uniform": 2.05})


def _evaluate(losses: dict[tuple, list[float]]):
    def evaluate(weights, data=None, saved_dtype=False):
        assert data == CONFIRM and saved_dtype  # the confirm part, scored in the saved dtype
        return losses[tuple(weights)]
    return evaluate


def test_fallback_keeps_the_best_baseline_when_the_merge_is_not_better_on_confirm():
    baselines = {"a": [1.0, 0.0], "b": [0.0, 1.0], "uniform": [0.5, 0.5]}
    losses = {(0.4, 0.6): [2.3, 2.4, 2.2], (1.0, 0.0): [2.5] * 3, (0.0, 1.0): [2.1, 2.2, 2.0],
              (0.5, 0.5): [2.2] * 3}
    kept = _confirm(_result(), _evaluate(losses), baselines, False, LOSS)
    assert kept.confirm["exported"] == "merge" and kept.weights == [0.4, 0.6]
    assert kept.confirm["best_baseline"] == "b" and kept.confirm["loss"] == pytest.approx(2.3)
    fell = _confirm(_result(), _evaluate(losses), baselines, True, LOSS)
    assert fell.confirm["exported"] == "b" and fell.weights == [0.0, 1.0] and fell.loss == 2.1
    better = {**losses, (0.4, 0.6): [2.0, 2.1, 1.9]}
    won = _confirm(_result(), _evaluate(better), baselines, True, LOSS)
    assert won.confirm["exported"] == "merge" and won.weights == [0.4, 0.6]


def test_a_metric_confirm_part_is_split_by_question_and_higher_is_better():
    """A metric's bootstrap resamples questions and recomputes the metric (not a mean of per-unit values)."""
    from hf_bomerge.objectives.tasks import split_questions

    n = 40
    pairs = {"ids": torch.arange(2 * n)[:, None], "lengths": torch.ones(2 * n), "choice_lengths": torch.ones(2 * n),
             "item": torch.arange(n).repeat_interleave(2), "answers": torch.tensor([i % 2 for i in range(n)])}
    search, held = split_questions(pairs, 0.25)
    assert held["answers"].tolist() == [i % 2 for i in range(3, n, 4)] and len(search["answers"]) == 30
    assert held["item"].tolist() == [i // 2 for i in range(20)]  # renumbered from 0, two choices each
    assert not set(search["ids"].flatten().tolist()) & set(held["ids"].flatten().tolist())

    answers = held["answers"].tolist()
    accuracy = lambda preds, idx: sum(preds[i] == answers[i] for i in idx) / len(idx)
    right = list(answers)
    wrong_half = [a if i % 2 else 1 - a for i, a in enumerate(answers)]
    good = confirm(right, {"latest": wrong_half, "uniform": [1 - a for a in answers]}, accuracy, True)
    assert good.best_baseline == "latest" and good.loss == 1.0 and good.baselines["latest"] == 0.5
    assert good.merge_is_better and good.merge_wins and 0 < good.interval[0] <= 0.5 <= good.interval[1]
    bad = confirm(wrong_half, {"latest": right}, accuracy, True)
    assert not bad.merge_is_better and not bad.merge_wins and bad.interval[1] < 0
