"""The confirm part: a deterministic 3:1 split of the held-out documents (whole documents to one part), the paired
bootstrap interval over documents (none from fewer than 20), and `--fallback`. (That the search sees only its part
and the confirm numbers are the saved model's is checked against transformers' own loss in test_cli.py and
test_reported_numbers.py.)"""

from __future__ import annotations

import random

import pytest
import torch
from measure import confirm_document_losses, documents, split_by_document

from hf_bomerge.api import _confirm
from hf_bomerge.objectives.confirm import MIN_UNITS, confirm, split_documents
from hf_bomerge.objectives.evaluator import CONFIRM
from hf_bomerge.objectives.heldout import HeldOutSpec, load_texts, tokenize_documents
from hf_bomerge.objectives.loss import HeldOutLoss
from hf_bomerge.result import MergeResult


def test_split_takes_whole_documents_deterministic_and_disjoint():
    docs = [[i] * (i % 3 + 1) for i in range(20)]
    search, held, unit = split_documents(docs, 0.25, 2)
    assert held == [docs[i] for i in (3, 7, 11, 15, 19)] and unit == "documents"
    assert search == [d for i, d in enumerate(docs) if i % 4 != 3]
    assert split_documents(docs, 0.25, 2) == (search, held, unit)
    assert split_documents(docs, 0.0, 2)[1] == []  # 0 turns it off
    # Too few documents (one long text): contiguous runs, the last quarter confirms, none interleaved.
    search, held, unit = split_documents([list(range(40)), list(range(100, 120))], 0.25, 4)
    assert unit == "runs" and held == [[108, 109, 110, 111], [112, 113, 114, 115], [116, 117, 118, 119]]
    assert [t for r in search for t in r] == list(range(40)) + list(range(100, 108))  # 15 runs: 3 confirm


def test_long_texts_at_the_cpu_default_cap_still_give_an_interval():
    """Three long texts filling the CPU default (16384 tokens, 2048-token blocks): 3 documents cannot give 20
    confirm units, so the texts are cut into runs short enough for 20, the confirm part the last ones, in order."""
    docs = [list(range(k * 10_000, k * 10_000 + 6000)) for k in range(2)] + [list(range(50_000, 54_384))]
    search, held, unit = split_documents(docs, 0.25, 2048)
    flat = [t for d in docs for t in d]
    assert unit == "runs" and len(held) >= MIN_UNITS and 64 <= len(held[0]) <= 2048
    assert [t for r in search for t in r] + [t for r in held for t in r] == flat  # contiguous, nothing interleaved
    scores = [(1.0 * len(r), len(r)) for r in held]
    ratio = HeldOutLoss.statistic  # Σ NLL sums / Σ tokens over the drawn units (it reads nothing of its object)
    c = confirm(scores, {"b": [(1.1 * len(r), len(r)) for r in held]}, statistic=lambda o, i: ratio(None, o, i))
    assert c.interval is not None and c.merge_is_better


def test_the_confirm_part_is_the_documents_an_independent_split_picks(trajectory):
    """Whole documents (here: the lines of a .txt file) go to one part; the units and their losses are what an
    independent split by document (tests/measure.py) and transformers' own `labels=` loss give."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, text = trajectory / "step600", str(trajectory / "heldout" / "validation.txt")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = load_texts(HeldOutSpec(text, None, "train"))
    docs = tokenize_documents(texts, tokenizer, 128, 8192)
    assert docs == documents(texts, tokenizer, 8192)  # the same documents as the reference reads
    objective = HeldOutLoss.of_documents(docs, 128, 4, 0.25, tokenizer.eos_token_id)
    want_search, want_held, _ = split_by_document(docs, 128)
    assert torch.equal(objective.blocks, want_search)
    assert len(want_held) >= MIN_UNITS and objective.confirm_unit == "documents"
    real = objective.owner >= 0  # the packing's unit membership: each token's confirm document, in order
    assert objective.confirm[real].tolist() == [t for d in want_held for t in d]
    assert objective.owner[real].tolist() == [i for i, d in enumerate(want_held) for _ in d]
    scores = objective.confirm_scores(model)
    reference = [s for s in confirm_document_losses(model, want_held, split_by_document(docs, 128)[2]) if s[1]]
    assert objective.confirm_size == len(scores) == len(reference)
    assert [n for _, n in scores] == [n for _, n in reference]
    assert [t for t, _ in scores] == pytest.approx([t for t, _ in reference], rel=1e-5)
    every = range(len(scores))
    loss = objective.statistic(scores, every)
    assert loss == pytest.approx(sum(t for t, _ in reference) / sum(n for _, n in reference), rel=1e-6)
    checked = confirm(scores, {"same": scores}, objective.statistic, unit=objective.confirm_unit)
    assert checked.units == len(scores) >= MIN_UNITS and checked.interval == (0.0, 0.0)


def test_no_interval_from_fewer_than_20_units():
    c = confirm([1.00, 1.10], {"a": [1.05, 1.20]}, max_eval_tokens=16384, unit="blocks")
    assert c.interval is None and not c.merge_is_better and c.merge_wins and c.verdict == "better, no interval"
    assert c.no_interval.startswith("not enough held-out data for an interval (2 blocks, 20 needed)")
    assert "--max-eval-tokens" in c.no_interval and c.as_dict()["interval"] is None
    rng = random.Random(0)
    base = [3.0 + rng.gauss(0, 0.3) for _ in range(MIN_UNITS)]
    assert confirm([b - 0.1 for b in base][:-1], {"a": base[:-1]}).interval is None  # 19 units
    assert confirm([b - 0.1 for b in base], {"a": base}).merge_is_better  # 20 units: an interval, clear of 0


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


LOSS = HeldOutLoss(torch.zeros(8, 4, dtype=torch.long), 1)  # the loss objective's statistic and direction


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
    per_doc = lambda losses: [(v * 10, 10) for v in losses]  # (NLL sum, tokens) of each confirm document
    losses = {(0.4, 0.6): per_doc([2.3, 2.4, 2.2]), (1.0, 0.0): per_doc([2.5] * 3),
              (0.0, 1.0): per_doc([2.1, 2.2, 2.0]), (0.5, 0.5): per_doc([2.2] * 3)}
    kept = _confirm(_result(), _evaluate(losses), baselines, False, LOSS)
    assert kept.confirm["exported"] == "merge" and kept.weights == [0.4, 0.6]
    assert kept.confirm["best_baseline"] == "b" and kept.confirm["loss"] == pytest.approx(2.3)
    fell = _confirm(_result(), _evaluate(losses), baselines, True, LOSS)
    assert fell.confirm["exported"] == "b" and fell.weights == [0.0, 1.0] and fell.loss == 2.1
    better = {**losses, (0.4, 0.6): per_doc([2.0, 2.1, 1.9])}
    won = _confirm(_result(), _evaluate(better), baselines, True, LOSS)
    assert won.confirm["exported"] == "merge" and won.weights == [0.4, 0.6]


def test_a_metric_confirm_part_is_split_by_question_and_higher_is_better():
    """A metric's bootstrap resamples questions and recomputes the metric (not a mean of per-unit values)."""
    from hf_bomerge.objectives.tasks import split_questions

    n = 80  # 20 confirm questions: the fewest an interval is reported from
    pairs = {"ids": torch.arange(2 * n)[:, None], "lengths": torch.ones(2 * n), "choice_lengths": torch.ones(2 * n),
             "item": torch.arange(n).repeat_interleave(2), "answers": torch.tensor([i % 2 for i in range(n)])}
    search, held = split_questions(pairs, 0.25)
    assert held["answers"].tolist() == [i % 2 for i in range(3, n, 4)] and len(search["answers"]) == 60
    assert held["item"].tolist() == [i // 2 for i in range(40)]  # renumbered from 0, two choices each
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
