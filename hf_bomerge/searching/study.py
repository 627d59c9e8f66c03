"""The Optuna study: a sampler (by default a GP, `optuna.samplers.GPSampler`) proposes weight vectors,
seeded with the baselines. The search spaces (how the sampler's parameters map to a weight vector) live in
`hf_bomerge.searching.weight_spaces`; the sampler and the storage can be injected into `run_search`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import optuna

from ..errors import StudyError
from ..merging.layers import LayerWeights
from ..objectives import objective_class
from . import interrupts, workers
from .storage import GRACE_S, default_storage, open_storage, safe_url
from .weight_spaces import MAX_SIMPLEX, SEARCHES, SIMPLEX_FLOOR, SearchSpace, make_space, same_weights  # noqa: F401 - re-exported

logger = logging.getLogger("hf_bomerge")
# A sampler, or a factory (seed, n_seeds) -> sampler (see `run_search`).
Sampler = optuna.samplers.BaseSampler | Callable[[int | None, int], optuna.samplers.BaseSampler]

POLL_S = 1.0  # how often a worker with nothing to run looks at the study again


@dataclass
class Trial:
    """One evaluated weight vector."""

    number: int
    weights: list[float]
    loss: float
    seed: str | None = None  # the baseline it is, if it is one
    # A layered merge (`--layer-groups`): {group: weights}; `weights` then holds their parameter-weighted mean.
    layer_weights: dict[str, list[float]] | None = None


@dataclass
class SearchOutcome:
    trials: list[Trial]
    baselines: dict[str, float]
    best: Trial
    extra: dict[str, float] = field(default_factory=dict)  # baselines evaluated beside the study (not trials)


def default_study_name(inputs: dict) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    name = str(inputs.get("source", "merge")).rstrip("/").split("/")[-1]
    return f"bomerge-{name}-{digest}"


def direction(objective: str) -> str:
    """The study's direction for the objective named `objective` (`Objective.higher_is_better`)."""
    return "maximize" if objective_class(objective).higher_is_better else "minimize"


def best_of(values, key=None, *, objective: str = "loss"):
    """The best of `values` for `objective` (the first one on a tie)."""
    return (min if direction(objective) == "minimize" else max)(values, key=key)


def open_study(storage: str | optuna.storages.BaseStorage, study_name: str, inputs: dict, space: SearchSpace,
               seed: int | None, seeds: Sequence[tuple[str, dict]], attrs: Mapping[str, object] = {},
               objective: str = "loss", sampler: Sampler | None = None) -> optuna.Study:
    """Create the study, or join/resume it; a study made from different inputs is refused.

    `attrs` (the study's record: `recipe`, `search`, `evaluation`; see `hf_bomerge.specs`) are stored when it is
    created.

    Whoever creates the study enqueues the baseline seeds, then marks it ready by storing its inputs; a
    worker that joins meanwhile waits for that, so the seeds are enqueued exactly once. `storage` is a URL
    (opened with heartbeats, `open_storage`) or an Optuna storage; `sampler` as in `run_search`.
    """
    sampler_for = _sampler_factory(sampler)
    rdb = open_storage(storage) if isinstance(storage, str) else storage
    try:
        study = optuna.create_study(storage=rdb, study_name=study_name, sampler=sampler_for(seed, len(seeds)),
                                    direction=direction(objective))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=rdb,
                                  sampler=sampler_for(workers.worker_seed(seed), len(seeds)))
    else:
        for label, params in seeds:
            study.enqueue_trial(params, user_attrs={"seed": label})
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        study.set_user_attr("inputs", inputs)
    stored = _ready(study, storage)
    if stored != inputs or study.direction.name.lower() != direction(objective):
        changed = sorted(k for k in set(stored) | set(inputs) if stored.get(k) != inputs.get(k)) or ["objective"]
        raise StudyError(f"Study {study_name!r} in {safe_url(storage)} was made from different inputs "
                         f"({', '.join(changed)} differ); resuming it would mix incomparable trials. Use another "
                         "--study-name, or drop --study-name to get one derived from the inputs.")
    return study


def gp_sampler(seed: int | None, n_seeds: int) -> optuna.samplers.GPSampler:
    """The default sampler: a GP whose startup trials are exactly the enqueued baselines (Optuna's default
    would add 10 random trials) and which fits no noise (the objective is deterministic).

    >>> gp_sampler(0, 4)._n_startup_trials
    4
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_seeds, deterministic_objective=True)


def _sampler_factory(sampler: Sampler | None) -> Callable[[int | None, int], optuna.samplers.BaseSampler]:
    if sampler is None:
        return gp_sampler
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return lambda seed, n_seeds: sampler
    if callable(sampler):
        return sampler
    raise StudyError(f"sampler must be an Optuna sampler or a function (seed, n_seeds) -> sampler, got {sampler!r}.")


def _ready(study: optuna.Study, storage: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (inputs := study.user_attrs.get("inputs")) is None:
        if time.monotonic() > deadline:
            raise StudyError(f"Study {study.study_name!r} in {safe_url(storage)} exists but was never set up "
                             "(the worker that created it died while enqueueing the baselines). Delete it "
                             f"(optuna delete-study --study-name {study.study_name} --storage URL) or use another "
                             "--study-name.")
        time.sleep(0.5)
    return inputs


def run_search(evaluate: Callable[[list[float]], float], space: SearchSpace, labels: Sequence[str], *, trials: int,
               storage: str | optuna.storages.BaseStorage, study_name: str, inputs: dict, seed: int | None = None,
               ema_alpha: float = 0.2, progress: bool = True,
               on_trial: Callable[[Trial, int, int], None] | None = None, attrs: Mapping[str, object] = {},
               objective: str = "loss", sampler: Sampler | None = None,
               extra_seeds: Sequence[tuple[str, Sequence[float]]] = ()) -> SearchOutcome:
    """Run (or resume, or join) the study until it holds `trials` COMPLETE trials, seeds included.

    `evaluate(weights) -> loss` is called once per trial (for a metric `objective`, the metric: the study
    then maximizes, and `Trial.loss` holds the metric); a NaN/inf value is recorded as a failed trial
    and does not count toward the budget. `on_trial(trial, complete, budget)` is called after each trial
    this process ran (a failed one with a NaN loss), e.g. to show progress in a UI. Several processes with
    the same storage and study name share the budget (see `hf_bomerge.searching.workers`). `extra_seeds`
    (label, weights) are evaluated after the baselines when the study is created (e.g. `hf-bomerge watch`'s
    warm start from the previous round); one outside the space or equal to a baseline is left out.

    `storage`: an SQLAlchemy URL (opened with heartbeats, so a dead worker's trial is run again) or an
    Optuna storage object (e.g. `optuna.storages.InMemoryStorage()` for one process). `sampler`: None for
    the GP (`gp_sampler`), an Optuna sampler, or a factory `(seed, n_seeds) -> sampler` (`n_seeds`: the
    enqueued baselines; a worker joining a study gets a seed of its own).

    >>> run_search(lambda w: (w[1] - 0.3) ** 2, make_space("pairwise", 2), ["a", "b"], trials=6,
    ...            storage=optuna.storages.InMemoryStorage(), study_name="doc", inputs={}, progress=False,
    ...            sampler=lambda seed, n: optuna.samplers.RandomSampler(seed=0)).best.number < 6
    True
    """
    seeds = space.seeds(labels, ema_alpha)
    for label, w in extra_seeds:
        if space.params_for(list(w)) is not None and not any(same_weights(w, s) for _, s in seeds):
            seeds.append((label, list(w)))
    enqueued = [(label, w, space.params_for(w)) for label, w in seeds]
    if trials < 1:
        raise StudyError("--trials must be at least 1.")
    optuna.logging.set_verbosity(logging.ERROR)  # failed trials are reported by us, without tracebacks
    study = open_study(storage, study_name, inputs, space, seed,
                       [(label, p) for label, _, p in enqueued if p is not None], attrs, objective, sampler)
    _refuse_other_parameters(study, space)
    rdb = study._storage

    ran: list[Trial] = []
    current: dict = {}

    points = interrupts.SafePoints()

    def run_trial(trial: optuna.Trial) -> float:
        current.update(number=trial.number, set_aside=None)
        with points.inside():
            return _run_trial(trial)

    def _run_trial(trial: optuna.Trial) -> float:
        if not workers.within_budget(study, trial.number, trials):
            _set_aside(trial, "over the budget")
        trial.set_user_attr(workers.STARTED, {"trial": trial.number, "worker": workers.worker_id()})
        w = space.suggest(trial)  # an enqueued seed or a retried trial gets its fixed parameters here
        layered = w.as_dict() if isinstance(w, LayerWeights) else None
        plain = space.plain(w) if layered is not None else w
        trial.set_user_attr("weights", plain)
        if layered is not None:
            trial.set_user_attr("layer_weights", layered)
        twin = workers.twin_of(study, trial.number, plain, layered)
        if twin is not None and twin.state != optuna.trial.TrialState.COMPLETE:
            _set_aside(trial, f"duplicate of trial {twin.number}")
        if twin is not None:  # a point already evaluated: its value is known, the objective is deterministic
            trial.set_user_attr(workers.COPY_OF, twin.number)
        loss = evaluate(w) if twin is None else float(twin.value)
        ran.append(Trial(trial.number, plain, loss if math.isfinite(loss) else float("nan"),
                         trial.user_attrs.get("seed"), layered))
        return ran[-1].loss

    def _set_aside(trial: optuna.Trial, reason: str):
        current["set_aside"] = reason
        trial.set_user_attr(workers.SET_ASIDE, reason)
        raise workers.SetAside(reason)

    bar = _bar(trials, progress)
    failures, waited = 0, False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        workers.fail_orphans(study, rdb)
        state = workers.counts(study)
        bar.n = done = state[optuna.trial.TrialState.COMPLETE]
        bar.refresh()
        if done >= trials:
            break
        if done + state[optuna.trial.TrialState.RUNNING] >= trials:  # the rest of the budget runs elsewhere
            if not waited:
                logger.info("waiting for %d running trials of other workers (a dead worker's trial is re-run "
                            "after %d s)", state[optuna.trial.TrialState.RUNNING], GRACE_S)
            waited = True
            time.sleep(POLL_S)
            continue
        current.clear()
        try:
            with points.installed():
                study.optimize(run_trial, n_trials=1, catch=(workers.SetAside,))
        except KeyboardInterrupt:  # Ctrl-C/SIGTERM: Optuna failed the trial; queue it again for the resume
            if "number" in current:
                workers.requeue_set_aside(study, current["number"])
            raise
        if current.get("set_aside") == "over the budget":
            workers.requeue_set_aside(study, current["number"])
        if current.get("set_aside"):
            continue
        if ran and not math.isfinite(ran[-1].loss):
            failures += 1
            if failures > max(3, trials):
                raise StudyError(f"{failures} trials failed (NaN/inf loss); the checkpoints or the data are "
                                 "broken. Check for NaN/inf in the weights.")
        if (best := _best(study, objective)):
            bar.set_postfix(best=f"{best.loss:.4f}")
        if on_trial is not None and ran:
            on_trial(ran.pop(), _complete(study), trials)
    bar.close()
    extra = {label: evaluate(w) for label, w, p in enqueued if p is None}
    if extra and study.user_attrs.get("extra_baselines") != extra:
        study.set_user_attr("extra_baselines", extra)
    return study_outcome(study, labels, objective)


def study_outcome(study: optuna.Study, labels: Sequence[str], objective: str = "loss") -> SearchOutcome:
    """The finished trials of `study`, its baselines (revisions oldest first, then the averages) and best."""
    found = [_to_trial(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not found:
        raise StudyError(f"Study {study.study_name!r} has no finished trial yet.")
    extra = study.user_attrs.get("extra_baselines", {})
    baselines = {**{t.seed: t.loss for t in found if t.seed}, **extra}
    order = [*labels, "uniform", "ema"]
    ranked = sorted(baselines, key=lambda k: order.index(k) if k in order else len(labels) - 0.5)
    best = best_of(found, key=lambda t: t.loss, objective=objective)
    return SearchOutcome(found, {k: baselines[k] for k in ranked}, best, extra)


def load_study(storage: str, study_name: str | None = None,
               rdb: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """An existing study; without a name, the only study in `storage`."""
    rdb = rdb or open_storage(storage)
    names = [n for n in optuna.get_all_study_names(rdb) if not workers.is_export_lock(n)]
    if not names:
        raise StudyError(f"{safe_url(storage)} holds no study. Check --storage (and --cache-dir: the default "
                         "storage is studies.db there); a search writes its study where its --storage says.")
    if study_name is None:
        if len(names) != 1:
            raise StudyError(f"{safe_url(storage)} holds {len(names)} studies ({', '.join(names)}); pass "
                             "--study-name (hf-bomerge show --storage URL lists them).")
        study_name = names[0]
    if study_name not in names:
        raise StudyError(f"No study {study_name!r} in {safe_url(storage)} (it holds: {', '.join(names)}); "
                         "check --storage and --study-name (the default storage is studies.db in the cache dir).")
    return optuna.load_study(study_name=study_name, storage=rdb)


def show_study(storage: str | None = None, study_name: str | None = None, cache_dir=None) -> dict:
    """What `hf-bomerge show` prints: a study's trials, counts and exports, or a storage's studies.

    >>> show_study("sqlite:///studies.db")["studies"][0]["best"]   # doctest: +SKIP
    """
    url = storage or default_storage(cache_dir)
    rdb = open_storage(url)
    every = optuna.get_all_study_names(rdb)
    names = [n for n in every if not workers.is_export_lock(n)]
    if study_name is None and len(names) != 1:
        studies = []
        for name in names:
            study = optuna.load_study(study_name=name, storage=rdb)
            done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            studies.append({"study": name, "complete": len(done), "source": _recipe(study).get("source"),
                            "best": best_of(done, key=lambda t: t.value, objective=_objective(study)).value
                            if done else None})
        return {"storage": safe_url(url), "studies": studies}
    study = load_study(url, study_name, rdb)
    trials = [{"number": t.number, "state": t.state.name.lower(), "loss": t.value,
               "weights": t.user_attrs.get("weights"), "seed": t.user_attrs.get("seed"),
               "worker": (t.user_attrs.get(workers.STARTED) or {}).get("worker")}
              for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(workers.SET_ASIDE)]
    counts = {k: sum(1 for t in trials if t["state"] == state)
              for k, state in (("complete", "complete"), ("running", "running"), ("waiting", "waiting"),
                               ("failed", "fail"))}
    done = [t for t in trials if t["state"] == "complete"]
    budgets = [int(n.rsplit("@", 1)[1]) for n in every
               if workers.is_export_lock(n) and n.rsplit(":export@", 1)[0] == study.study_name]
    exports = [{"budget": b, **(workers.export_status(rdb, study.study_name, b) or {})} for b in budgets]
    recipe, objective = _recipe(study), _objective(study)
    return {"storage": safe_url(url), "study": study.study_name, "source": recipe.get("source"),
            "search": (study.user_attrs.get("search") or {}).get("space"),
            "revisions": [r["name"] for r in recipe.get("revisions") or []], "counts": counts,
            "objective": objective, "trials": trials, "exports": exports,
            "best": best_of(done, key=lambda t: t["loss"], objective=objective) if done else None}


def _recipe(study: optuna.Study) -> dict:
    return study.user_attrs.get("recipe") or {}


def _objective(study: optuna.Study) -> str:
    """The objective's display name (a metric's name, not the path it was loaded from)."""
    recorded = (study.user_attrs.get("evaluation") or {}).get("objective")
    return recorded or ("loss" if study.direction.name == "MINIMIZE" else "metric")


def set_study_attr(storage: str, study_name: str, key: str, value) -> None:
    optuna.load_study(study_name=study_name, storage=open_storage(storage)).set_user_attr(key, value)


def _refuse_other_parameters(study: optuna.Study, space: SearchSpace) -> None:
    """A study whose trials have other parameters (one an older hf-bomerge made, e.g. the simplex's former
    stick-breaking z0..z{N-2}) cannot be resumed: the GP would only see the parameters all trials share."""
    names = set(space.param_names())
    other = sorted({p for t in study.get_trials(deepcopy=False) for p in t.params} - names)
    if other:
        raise StudyError(f"Study {study.study_name!r} has trials with parameters {', '.join(other)} that the "
                         f"{space.kind} space no longer uses (it was made by another version of hf-bomerge); "
                         "resuming it would mix incomparable trials. Use another --study-name.")


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _best(study: optuna.Study, objective: str) -> Trial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return _to_trial(best_of(done, key=lambda t: t.value, objective=objective)) if done else None


def _to_trial(t: optuna.trial.FrozenTrial) -> Trial:
    return Trial(t.number, list(t.user_attrs["weights"]), float(t.value), t.user_attrs.get("seed"),
                 t.user_attrs.get("layer_weights"))


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="trials", unit="trial", disable=not enabled)
