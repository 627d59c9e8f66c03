"""The objective contract: a new objective is one registered class, and everything that reports a number (the
study's direction, the best trial, the summary, the card) follows what the class says, never its name."""

from __future__ import annotations

import json
import math

import pytest

from hf_bomerge.objectives import OBJECTIVES, objective_class, register
from hf_bomerge.objectives.loss import HeldOutLoss


class BitsPerToken(HeldOutLoss):
    """A minimized objective that is not called "loss": the held-out NLL in bits."""

    name = "bits"
    unit = " bits/token"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec == "bits"

    @classmethod
    def header(cls, name: str) -> str:
        return "bits per token"

    @classmethod
    def perplexity(cls, value: float) -> float | None:
        return None

    def __call__(self, model) -> float:
        return super().__call__(model) / math.log(2)


class NegativeLoss(HeldOutLoss):
    """A maximized objective built on the loss: its negative."""

    name = "neg-loss"
    higher_is_better = True
    unit = ""
    layout = "score"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec == "neg-loss"

    @classmethod
    def perplexity(cls, value: float) -> float | None:
        return None

    def __call__(self, model) -> float:
        return -super().__call__(model)


@pytest.fixture
def registered():
    added = [register(BitsPerToken), register(NegativeLoss)]
    yield
    for cls in added:
        OBJECTIVES.remove(cls)


def test_the_registry_finds_each_objective_by_name(registered):
    assert objective_class("loss") is HeldOutLoss and objective_class(None) is HeldOutLoss
    assert objective_class("bits") is BitsPerToken and objective_class("neg-loss") is NegativeLoss
    assert objective_class("accuracy").higher_is_better  # any other name: an `evaluate` metric


def test_direction_follows_the_class_not_the_name(registered):
    from hf_bomerge.searching.study import best_of, direction

    assert direction("bits") == "minimize" and direction("neg-loss") == "maximize"
    assert best_of([3.0, 1.0, 2.0], objective="bits") == 1.0
    assert best_of([-3.0, -1.0, -2.0], objective="neg-loss") == -1.0


@pytest.mark.e2e
def test_a_new_objective_is_one_class_and_a_search_minimizes_it(registered, trajectory, tmp_path):
    """A real search on the demo run with the minimized "bits" objective: the best trial is the lowest value, the
    numbers are the loss in bits (checked against a fixed merge scored on the loss), and the card says bits."""
    import hf_bomerge
    from hf_bomerge.cli.output import format_summary

    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    data = str(trajectory / "heldout" / "validation.jsonl")
    result = hf_bomerge.search(str(trajectory), ",".join(steps), dataset=data, trials=6, objective="bits",
                               confirm_fraction=0.0, cache_dir=tmp_path / "cache", progress=False, device="cpu")
    assert result.objective == "bits"
    values = [t.loss for t in result.trace if t.loss is not None]
    assert result.loss == pytest.approx(min(values))
    plain = hf_bomerge.merge(str(trajectory), ",".join(steps), weights=result.weights, dataset=data,
                             cache_dir=tmp_path / "cache", progress=False, device="cpu")
    assert result.loss == pytest.approx(plain.loss / math.log(2), rel=1e-6)
    text = format_summary(result)
    assert "bits/token" in text and "nats/token" not in text and "ppl" not in text
    card = result.save_pretrained(tmp_path / "out", progress=False) / "README.md"
    assert "bits per token" in card.read_text() or "bits" in card.read_text()


@pytest.mark.e2e
def test_a_maximized_objective_is_maximized(registered, trajectory, tmp_path):
    import hf_bomerge

    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-2:]
    data = str(trajectory / "heldout" / "validation.jsonl")
    result = hf_bomerge.search(str(trajectory), ",".join(steps), dataset=data, trials=5, objective="neg-loss",
                               confirm_fraction=0.0, cache_dir=tmp_path / "cache", progress=False, device="cpu")
    values = [t.loss for t in result.trace if t.loss is not None]
    assert result.loss == pytest.approx(max(values)) and result.loss < 0
