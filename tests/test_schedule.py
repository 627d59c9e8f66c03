"""Schedule-shaped merges (WSM): the weight shapes, the `schedule` search space, progress from revision names, and
`--method wsm-*` / `--search schedule` through the command line on the demo trajectory (a local folder source)."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_bomerge.cli import main
from hf_bomerge.errors import RevisionError, StudyError, WeightsError
from hf_bomerge.merging import schedules as S
from hf_bomerge.merging import weights as W
from hf_bomerge.searching.weight_spaces import make_space, space_for
from hf_bomerge.sources.revisions import progress_values

MIX = 1.0 / math.pi


def emulated_decay(progress, window, m, substeps=20_000):
    """Independent of the closed form: run the constant-LR path θ(t) (straight between checkpoints, each
    checkpoint a unit vector) with the LR multiplier m over the window, summing m(t)·dθ over small steps."""
    theta = [1.0] + [0.0] * (len(progress) - 1)  # θ(p₀) = e₀
    start = progress[-1] - window
    for j in range(1, len(progress)):
        dt = (progress[j] - progress[j - 1]) / substeps
        for i in range(substeps):
            t = progress[j - 1] + (i + 0.5) * dt
            scale = 1.0 if t < start else m((t - start) / window)
            theta[j] += scale / substeps  # the update moves θ from θⱼ₋₁ toward θⱼ
            theta[j - 1] -= scale / substeps
    return theta


@pytest.mark.parametrize("decay, shape, m", [
    ("linear", 0.0, lambda u: 1 - u),
    ("cosine", 0.0, lambda u: (1 + math.cos(math.pi * u)) / 2),
    ("sqrt", 0.0, lambda u: 1 - math.sqrt(u)),
    ("exp", 3.0, lambda u: (math.exp(-3 * u) - math.exp(-3)) / (1 - math.exp(-3))),
    ("exp", -5.0, lambda u: (math.exp(5 * u) - math.exp(5)) / (1 - math.exp(5))),
])
def test_weights_equal_an_emulated_decay_on_the_constant_lr_path(decay, shape, m):
    progress, window = [0.0, 1.0, 1.5, 4.0, 5.0, 7.0], 5.5  # uneven; the window starts inside a segment
    closed = S.decay_weights(progress, window, decay, shape)
    assert closed == pytest.approx(emulated_decay(progress, window, m), abs=2e-5)


def test_each_decay_family_known_values():
    even = [0.0, 1.0, 2.0]
    assert S.decay_weights(even, 2.0, "linear") == pytest.approx([0.25, 0.5, 0.25])  # the trapezoid rule
    assert S.decay_weights(even, 2.0, "cosine") == pytest.approx([0.5 - MIX, 2 * MIX, 0.5 - MIX])
    assert S.decay_weights(even, 2.0, "sqrt") == pytest.approx(
        [math.sqrt(2) / 3, 1 - math.sqrt(2) / 3 - (1 - 2 / 3 * 2 * (1 - 0.5 ** 1.5)), 1 - 2 / 3 * 2 * (1 - 0.5 ** 1.5)])
    assert S.decay_weights(even, 2.0, "exp", 1e-9) == pytest.approx(S.decay_weights(even, 2.0, "linear"), abs=1e-9)
    assert S.decay_weights(even, 2.0, "exp", 1e-5) == pytest.approx(S.decay_weights(even, 2.0, "linear"), abs=1e-5)
    # the LR floor stays on the latest checkpoint: floor 1 (no decay) is the latest alone
    assert S.decay_weights(even, 2.0, "cosine", floor=1.0) == [0.0, 0.0, 1.0]
    half = S.decay_weights(even, 2.0, "linear", floor=0.5)
    assert half == pytest.approx([0.125, 0.25, 0.625])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=30), st.floats(1e-3, 1.5),
       st.sampled_from(sorted(S.DECAYS)), st.floats(-16.0, 16.0), st.floats(0.0, 1.0))
def test_weights_sum_to_one_and_are_non_negative(gaps, fraction, decay, shape, floor):
    progress = [0.0]
    for g in gaps:
        progress.append(progress[-1] + g)
    w = S.decay_weights(progress, fraction * progress[-1], decay, shape, floor)
    assert len(w) == len(progress) and all(x >= 0 for x in w) and math.isclose(sum(w), 1.0, abs_tol=1e-9)
    start = progress[-1] * (1 - fraction)
    # nothing before the segment the window starts in
    assert all(x == 0 for p, x in zip(progress[1:], w) if p < start)


def test_window_edges():
    p = [0.0, 10.0, 20.0, 30.0]
    tiny = S.decay_weights(p, 1e-6, "linear")
    assert tiny[:2] == [0.0, 0.0] and tiny[3] == pytest.approx(1.0, abs=1e-6)
    inside = S.decay_weights(p, 5.0, "linear")  # the window inside the last segment: the last two only
    assert inside[:2] == [0.0, 0.0] and inside[2] == pytest.approx(0.25) and inside[3] == pytest.approx(0.75)
    exact = S.decay_weights(p, 20.0, "linear")  # the window starts at a checkpoint: nothing before it
    assert exact == pytest.approx([0.0, 0.25, 0.5, 0.25]) and exact[0] == 0.0
    longer = S.decay_weights(p, 40.0, "linear")  # beyond the span: the mass before p₀ lands on the oldest
    assert longer[0] > longer[1] and sum(longer) == pytest.approx(1.0)
    with pytest.raises(WeightsError, match="positive"):
        S.decay_weights(p, 0.0)
    with pytest.raises(WeightsError, match="increase"):
        S.decay_weights([0.0, 2.0, 1.0], 1.0)


def test_uneven_spacing_weighs_by_progress_not_by_index():
    # a checkpoint added inside a segment splits that segment's share; the others keep theirs
    coarse = S.decay_weights([0, 2, 4], 4.0, "linear")
    fine = S.decay_weights([0, 1, 2, 4], 4.0, "linear")
    assert fine[0] + fine[1] + fine[2] == pytest.approx(coarse[0] + coarse[1])
    assert fine[3] == pytest.approx(coarse[2])
    # equal progress spacing gives equal interior weights whatever the names' indices
    assert S.decay_weights([0, 3, 6, 9], 9.0, "linear")[1:3] == pytest.approx([1 / 3, 1 / 3])


@pytest.mark.parametrize("progress", [list(range(16)), [0, 1, 3, 4, 8, 9, 10, 15, 20, 21, 30, 31]])
def test_space_round_trip(progress):
    space = make_space("schedule", len(progress), progress=progress)
    rng = random.Random(0)
    for _ in range(8):
        p = {"window": rng.uniform(0.3, 1.0), "shape": rng.uniform(-10.0, 10.0), "floor": rng.uniform(0.0, 0.9)}
        back = space.params_for(space.weights(p))
        assert back is not None and back == pytest.approx(p, rel=1e-5, abs=1e-6), p


def test_space_seeds_latest_uniform_ema_and_wsm_linear():
    even = make_space("schedule", 16, progress=[100 * i for i in range(16)])
    labels = [f"step{100 * i}" for i in range(16)]
    seeds = dict(even.seeds(labels))
    assert list(seeds) == ["step1500", "uniform", "ema", "wsm-linear", "wsm-linear-half"]
    in_space = {label for label, w in seeds.items() if even.params_for(w) is not None}
    assert in_space == {"step1500", "uniform", "wsm-linear", "wsm-linear-half"}  # EMA: evaluated beside the study
    for label in in_space:
        assert even.weights(even.params_for(seeds[label])) == pytest.approx(seeds[label], abs=1e-9), label
    uneven = make_space("schedule", 5, progress=[0, 1, 2, 8, 9])
    assert uneven.params_for(W.uniform(5)) is None  # by index, not by progress: not a schedule here


def test_auto_needs_progress_and_falls_back_to_family():
    assert space_for("auto", [f"step{i}" for i in range(1, 10)]).kind == "schedule"
    assert space_for("auto", [f"run-{c}" for c in "abcdefghi"]).kind == "family"  # names without numbers
    assert space_for("auto", [f"step{i}" for i in range(1, 5)]).kind == "simplex"
    with pytest.raises(RevisionError, match="no step or token count"):
        space_for("schedule", [f"run-{c}" for c in "abc"])
    with pytest.raises(StudyError, match="progress"):
        make_space("schedule", 4)
    assert make_space("family", 12).kind == "family"  # still available


def test_progress_values_from_revision_names():
    assert progress_values(["stage1-step1000-tokens5B", "stage1-step2000-tokens10B"]) == ([5e9, 1e10], "tokens")
    assert progress_values(["train_00220B", "train_00440B"]) == ([2.2e11, 4.4e11], "tokens")
    assert progress_values(["step1000", "step3000"]) == ([1000.0, 3000.0], "steps")
    assert progress_values(["step1000", "step3000"], 4e6) == ([4e9, 1.2e10], "tokens")
    with pytest.raises(RevisionError, match="stage"):
        progress_values(["stage1-step900", "stage2-step100"])  # the step count restarts
    with pytest.raises(RevisionError, match="mix"):
        progress_values(["step1000", "train_00220B"])


def test_wsm_rules_are_fixed_merges():
    names = ["step100", "step200", "step400"]
    assert {"wsm-linear", "wsm-cosine", "wsm-sqrt"} <= set(W.METHODS)
    assert W.rule("wsm-linear", 3, names=names, window=200) == pytest.approx([0.0, 0.5, 0.5])
    assert W.rule("wsm-cosine", 3, names=names) == S.decay_weights([100, 200, 400], 300, "cosine")
    assert W.rule("wsm-linear", 3, names=names, window=2e6, tokens_per_step=1e4) == pytest.approx([0.0, 0.5, 0.5])
    with pytest.raises(WeightsError, match="longer than the revisions span"):
        W.rule("wsm-sqrt", 3, names=names, window=301)
    with pytest.raises(WeightsError, match="has none"):
        W.rule("ema", 3, window=100)


def _cli(*args, capsys):
    code = main([*args, "--quiet", "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


@pytest.mark.e2e  # real merges and a real search: the e2e tier, as the repo's other searches
def test_method_wsm_through_the_cli(trajectory, tmp_path, capsys):
    common = [str(trajectory), "--revisions", "step300..step600", "--cache-dir", str(tmp_path / "c")]
    code, summary, err = _cli(*common, "--method", "wsm-linear", "--window", "200", "--output", str(tmp_path / "a"),
                              "--dataset", str(trajectory / "heldout" / "validation.jsonl"), "--max-eval-tokens",
                              "2048", capsys=capsys)
    assert code == 0, err
    assert summary["revisions"] == [f"step{s}" for s in range(300, 601, 50)]
    assert summary["weights"] == pytest.approx([0, 0, 0.125, 0.25, 0.25, 0.25, 0.125])
    assert summary["weights"] == pytest.approx(S.decay_weights(range(300, 601, 50), 200, "linear"))
    assert math.isfinite(summary["loss"])
    tokens = json.loads((trajectory / "trajectory.json").read_text())["tokens_per_step"]
    code, again, err = _cli(*common, "--method", "wsm-linear", "--window", str(200 * tokens), "--tokens-per-step",
                            str(tokens), "--no-eval", "--output", str(tmp_path / "b"), capsys=capsys)
    assert code == 0 and again["weights"] == pytest.approx(summary["weights"]), err
    code, _, err = _cli(*common, "--method", "wsm-sqrt", "--window", "400", "--no-eval", "--output",
                        str(tmp_path / "c2"), capsys=capsys)
    assert code != 0 and "longer than the revisions span" in err
    code, _, err = _cli(*common, "--method", "ema", "--window", "100", "--no-eval", "--output",
                        str(tmp_path / "d"), capsys=capsys)
    assert code != 0 and "--window" in err and "wsm-linear" in err


@pytest.mark.e2e
def test_search_schedule_through_the_cli(trajectory, tmp_path, capsys):
    code, summary, err = _cli(str(trajectory), "--revisions", "step250..step600", "--search", "schedule",
                              "--trials", "7", "--dataset", str(trajectory / "heldout" / "validation.jsonl"),
                              "--max-eval-tokens", "2048", "--output", str(tmp_path / "s"),
                              "--cache-dir", str(tmp_path / "c"), capsys=capsys)
    assert code == 0, err
    assert summary["trials"] == 7 and "wsm-linear" in summary["baselines"] and "ema" in summary["baselines"]
    space = make_space("schedule", 8, progress=range(250, 601, 50))
    assert space.params_for(summary["weights"]) is not None  # the merge is a schedule-shaped one
    assert summary["loss"] <= min(v for k, v in summary["baselines"].items() if k != "ema") + 1e-12
    assert "schedule search, 7 trials" in (tmp_path / "s" / "README.md").read_text()  # the card says how
