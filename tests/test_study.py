"""The Optuna study: seeding, budget, resume, reproducibility and NaN handling.

The objective here is the real held-out loss of the trained test trajectory (the `trajectory` fixture),
evaluated by the same resident model the CLI uses, so the GP sees a real loss landscape.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from hf_bomerge.errors import StudyError
from hf_bomerge.searching.study import make_space, run_search


@pytest.fixture(scope="module")
def evaluator(trajectory, tmp_path_factory):
    """weights -> held-out loss over the last 4 checkpoints of the trajectory (resident, in memory)."""
    from hf_bomerge.objectives.evaluator import Evaluator as _Evaluator
    from hf_bomerge.objectives.heldout import HeldOutSpec
    from hf_bomerge.prepare import prepare as _prepare

    cache = tmp_path_factory.mktemp("cache")
    prep = _prepare(str(trajectory), "last:4", 8, None, cache, progress=False)
    spec = HeldOutSpec.parse(str(trajectory / "heldout" / "validation.jsonl"))
    ev = _Evaluator(prep, dataset=spec, block_size=None, max_eval_tokens=4096, batch_size=8,
                    eval_dtype=None, device="cpu", trust_remote_code=False, cache_dir=cache)
    calls: list[list[float]] = []

    def evaluate(weights):
        calls.append(list(weights))
        return ev(weights)

    evaluate.calls = calls
    evaluate.labels = prep.names
    return evaluate


def _run(evaluate, tmp_path: Path, kind: str, n: int, trials: int, name="s", seed=0, labels=None, **kw):
    space = make_space(kind, n, kw.pop("lambda_min", 0.0))
    return run_search(evaluate, space, labels or [f"step{i}" for i in range(n)], trials=trials,
                      storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name=name, inputs={"n": n, "kind": kind},
                      seed=seed, progress=False, **kw)


@pytest.mark.e2e
def test_pairwise_evaluates_both_bounds_first(evaluator, tmp_path):
    pair = lambda w: evaluator([0.0, 0.0, *w])  # the last two checkpoints
    start = len(evaluator.calls)
    out = _run(pair, tmp_path, "pairwise", 2, trials=8, labels=evaluator.labels[-2:], lambda_min=0.3)
    first = evaluator.calls[start:start + 2]
    assert [w[2:] for w in first] == [[0.0, 1.0], [pytest.approx(0.7), pytest.approx(0.3)]]
    assert len(out.trials) == 8
    lam = out.best.weights[1]
    assert 0.3 - 1e-9 <= lam <= 1.0


@pytest.mark.e2e
def test_simplex_is_seeded_with_the_baselines_and_beats_them(evaluator, tmp_path):
    out = _run(evaluator, tmp_path, "simplex", 4, trials=12, labels=evaluator.labels)
    assert [t.seed for t in out.trials[:6]] == [*reversed(evaluator.labels), "uniform", "ema"]
    assert list(out.baselines) == [*evaluator.labels, "uniform", "ema"]
    assert len(out.trials) == 12
    assert out.best.loss < min(out.baselines.values())


@pytest.mark.e2e
def test_resume_finishes_the_budget_without_repeating_trials(evaluator, tmp_path):
    _run(evaluator, tmp_path, "simplex", 4, trials=7, labels=evaluator.labels)
    start = len(evaluator.calls)
    out = _run(evaluator, tmp_path, "simplex", 4, trials=9, labels=evaluator.labels)
    assert len(evaluator.calls) - start == 2  # only the two new trials ran
    assert [t.number for t in out.trials] == list(range(9))


@pytest.mark.e2e
def test_same_seed_same_trials(evaluator, tmp_path):
    a = _run(evaluator, tmp_path, "simplex", 4, trials=9, name="a", seed=7, labels=evaluator.labels)
    b = _run(evaluator, tmp_path, "simplex", 4, trials=9, name="b", seed=7, labels=evaluator.labels)
    assert [t.weights for t in a.trials] == [t.weights for t in b.trials]


@pytest.mark.e2e
def test_family_scales_to_dozens_of_checkpoints(tmp_path):
    """A 44-revision range searched in two dimensions; EMA is evaluated beside the study (not in the space)."""
    target = [0.0] * 34 + [0.1] * 10

    def loss(w):
        return sum((a - b) ** 2 for a, b in zip(w, target))

    out = _run(loss, tmp_path, "family", 44, trials=14)
    assert set(out.baselines) == {"step43", "uniform", "ema"} and "ema" in out.extra
    assert out.best.loss < min(out.baselines.values())  # beats the latest, the uniform average and EMA
    assert sum(1 for w in out.best.weights if w > 0) < 44  # and concentrates on a late window


def test_nan_trials_fail_and_do_not_count(tmp_path):
    seen, reported = [], []

    def loss(w):
        seen.append(w)
        return float("nan") if len(seen) % 3 == 0 else sum(x * x for x in w)

    out = _run(loss, tmp_path, "simplex", 3, trials=8, on_trial=lambda t, done, budget: reported.append((t, done)))
    assert [t.weights for t, _ in reported] == seen  # every trial this process ran, in order
    assert sum(math.isnan(t.loss) for t, _ in reported) == len(seen) - 8
    assert reported[-1][1] == 8 and reported[0][0].seed == "step2"
    assert len(out.trials) == 8 and all(math.isfinite(t.loss) for t in out.trials)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and len(seen) == 8 + len(failed)


def test_all_nan_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(StudyError, match="NaN"):
        _run(lambda w: float("nan"), tmp_path, "simplex", 3, trials=4)


def test_resuming_a_study_with_different_inputs_is_refused(tmp_path):
    space = make_space("simplex", 3)
    kw = dict(trials=4, storage=f"sqlite:///{tmp_path / 'db.sqlite'}", study_name="mine", seed=0, progress=False)
    run_search(lambda w: sum(w), space, ["a", "b", "c"], inputs={"dataset": "x"}, **kw)
    with pytest.raises(StudyError, match="dataset"):
        run_search(lambda w: sum(w), space, ["a", "b", "c"], inputs={"dataset": "y"}, **kw)


def test_a_study_with_another_parameterization_is_refused(tmp_path):
    """A simplex study an older hf-bomerge made (stick-breaking z0..z{N-2}) is not silently resumed."""
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    old = optuna.create_study(storage=storage, study_name="old", direction="minimize")
    old.set_user_attr("inputs", {"n": 3})
    old.add_trial(optuna.trial.create_trial(params={"z0": 0.5, "z1": 0.5}, value=1.0,
                                            distributions={f"z{k}": optuna.distributions.FloatDistribution(0, 1)
                                                           for k in range(2)}))
    with pytest.raises(StudyError, match="z0, z1"):
        run_search(lambda w: sum(w), make_space("simplex", 3), ["a", "b", "c"], trials=4, storage=storage,
                   study_name="old", inputs={"n": 3}, seed=0, progress=False)


def test_sampler_and_storage_are_injectable():
    """Any Optuna sampler (or a factory (seed, n_seeds) -> sampler) and any Optuna storage drive the same loop:
    the baselines are still enqueued first, and the factory is told how many there are."""
    made = []

    def tpe(seed, n_seeds):
        made.append((seed, n_seeds))
        return optuna.samplers.TPESampler(seed=seed)

    storage = optuna.storages.InMemoryStorage()
    out = run_search(lambda w: (w[1] - 0.3) ** 2, make_space("pairwise", 2), ["a", "b"], trials=6, storage=storage,
                     study_name="tpe", inputs={}, seed=3, progress=False, sampler=tpe)
    assert made == [(3, 4)]  # 2 bounds + uniform + EMA
    assert [t.seed for t in sorted(out.trials, key=lambda t: t.number)][:4] == ["b", "a", "uniform", "ema"]
    study = optuna.load_study(study_name="tpe", storage=storage)
    assert isinstance(study.sampler, optuna.samplers.TPESampler) and len(study.trials) == 6
    again = run_search(lambda w: (w[1] - 0.3) ** 2, make_space("pairwise", 2), ["a", "b"], trials=7,
                       storage=storage, study_name="tpe", inputs={}, progress=False,
                       sampler=optuna.samplers.RandomSampler(seed=0))
    assert len(again.trials) == 7  # resumed the same study with an instance instead of a factory
    with pytest.raises(StudyError, match="sampler"):
        run_search(sum, make_space("pairwise", 2), ["a", "b"], trials=2, storage=optuna.storages.InMemoryStorage(),
                   study_name="x", inputs={}, progress=False, sampler="tpe")


@pytest.mark.parametrize(("window", "after", "waiting"), [("ask-new", 6, 0), ("ask-queued", 2, 3), ("tell", 3, 2)])
def test_an_interrupt_between_the_objective_and_the_storage_leaves_no_trial_running(window, after, waiting):
    """Ctrl-C/SIGTERM landing while Optuna writes a trial (in `ask` once the trial is RUNNING, or in `tell`) is
    held to the next safe point: no trial stays RUNNING, a finished one is kept, a queued seed is queued again."""
    import os
    import signal

    class Interrupting(optuna.storages.InMemoryStorage):
        armed = False

        def create_new_trial(self, study_id, template_trial=None):
            trial_id = super().create_new_trial(study_id, template_trial)
            if window == "ask-new" and self.armed and template_trial is None:
                os.kill(os.getpid(), signal.SIGINT)
            return trial_id

        def set_trial_state_values(self, trial_id, state, values=None):
            done = super().set_trial_state_values(trial_id, state, values)
            if self.armed and (window, state) in (("ask-queued", optuna.trial.TrialState.RUNNING),
                                                  ("tell", optuna.trial.TrialState.COMPLETE)):
                os.kill(os.getpid(), signal.SIGINT)
            return done

    storage = Interrupting()
    calls = []

    def loss(w):
        calls.append(w)
        storage.armed = len(calls) == after
        return sum(x * x for x in w)

    with pytest.raises(KeyboardInterrupt):
        run_search(loss, make_space("simplex", 3), ["a", "b", "c"], trials=10, storage=storage, study_name="i",
                   inputs={}, seed=0, progress=False)
    states = [t.state for t in optuna.load_study(study_name="i", storage=storage).trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.COMPLETE) == after  # one interrupted in `tell` is kept
    assert states.count(optuna.trial.TrialState.WAITING) == waiting  # the 5 seeds not yet run, in order
