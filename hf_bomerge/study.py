"""The Optuna study: a GP (`optuna.samplers.GPSampler`) proposes weight vectors, seeded with the baselines.

A search space only maps the GP's parameters to a weight vector over the checkpoints (oldest first):
- `pairwise`: θ = λ·θ_t + (1−λ)·θ_{t−1}, λ ∈ [λ_min, 1]; both bounds are evaluated first.
- `simplex`: N coordinates xᵢ ∈ [ε, 1] on a log scale, wᵢ ∝ xᵢ − ε: every single checkpoint is an exact
  corner and no face of the box collapses to one weight vector (benchmarks/README.md, "search").
- `family`: the last `window` checkpoints weighted ∝ (1−decay)^age: two dimensions for any N.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import optuna

from . import weights as W
from .errors import StudyError

SEARCHES = ("auto", "pairwise", "simplex", "family")
MAX_SIMPLEX = 8
# The simplex coordinates' floor: xᵢ = ε drops checkpoint i; the box spans weight ratios up to 1/ε ≈ e⁶ on a
# log scale, as softmax logits in [−3, 3] would, but with exact corners.
SIMPLEX_FLOOR = math.exp(-6.0)
# A running trial writes a heartbeat every HEARTBEAT_S; one silent for GRACE_S belonged to a dead process:
# it is marked failed and its parameters are queued again (nothing finished is lost).
HEARTBEAT_S, GRACE_S = 2, 10


@dataclass
class Space:
    """A search space over N checkpoints."""

    kind: str
    n: int
    lambda_min: float = 0.0

    def suggest(self, trial: optuna.Trial) -> list[float]:
        if self.kind == "pairwise":
            return W.pairwise(trial.suggest_float("lambda", self.lambda_min, 1.0))
        if self.kind == "simplex":
            return self.weights({name: trial.suggest_float(name, SIMPLEX_FLOOR, 1.0, log=True)
                                 for name in self.param_names()})
        return W.window_decay(self.n, trial.suggest_int("window", 1, self.n, log=True),
                              trial.suggest_float("decay", 0.0, 1.0))

    def params_for(self, weights: Sequence[float]) -> dict | None:
        """The parameters that give `weights`, or None when the space does not contain them."""
        if self.kind == "pairwise":
            params = {"lambda": weights[1]} if weights[1] >= self.lambda_min - 1e-12 else None
        elif self.kind == "simplex":
            params = dict(zip(self.param_names(), W.to_ratio_coords(weights, SIMPLEX_FLOOR)))
        else:
            used = [w for w in weights if w > 0]
            params = {"window": len(used), "decay": 0.0}
        if params is None or not _close(self.weights(params), weights):
            return None
        return params

    def weights(self, params: dict) -> list[float]:
        if self.kind == "pairwise":
            return W.pairwise(params["lambda"])
        if self.kind == "simplex":
            return W.from_ratio_coords([params[name] for name in self.param_names()], SIMPLEX_FLOOR)
        return W.window_decay(self.n, params["window"], params["decay"])

    def param_names(self) -> list[str]:
        if self.kind == "pairwise":
            return ["lambda"]
        if self.kind == "simplex":
            return [f"x{i}" for i in range(self.n)]
        return ["window", "decay"]

    def seeds(self, labels: Sequence[str], ema_alpha: float = 0.2) -> list[tuple[str, list[float]]]:
        """The baselines, in the order they are evaluated: single checkpoints (pairwise: both bounds of
        λ first), then the uniform average and EMA."""
        n = self.n
        if self.kind == "pairwise":
            singles = [(labels[1], W.one_hot(2, 1)), (f"λ={self.lambda_min:g}" if self.lambda_min > 0 else labels[0],
                                                      W.pairwise(self.lambda_min))]
        elif self.kind == "simplex":
            singles = [(labels[i], W.one_hot(n, i)) for i in reversed(range(n))]
        else:
            singles = [(labels[-1], W.one_hot(n, n - 1))]
        return singles + [("uniform", W.uniform(n)), ("ema", W.ema(n, ema_alpha))]


def make_space(search: str, n: int, lambda_min: float = 0.0) -> Space:
    """`auto` picks pairwise for 2 checkpoints, simplex up to 8, the 2-D family beyond."""
    if search not in SEARCHES:
        raise StudyError(f"Unknown --search {search!r}; choose one of {', '.join(SEARCHES)}.")
    if n < 2:
        raise StudyError(f"A merge needs at least 2 checkpoints, got {n}; widen --revisions.")
    if search == "auto":
        search = "pairwise" if n == 2 else "simplex" if n <= MAX_SIMPLEX else "family"
    if search == "pairwise" and n != 2:
        raise StudyError(f"--search pairwise merges two adjacent checkpoints, but {n} were selected; "
                         "select two (e.g. --revisions last:2) or use --search simplex/family.")
    if not 0.0 <= lambda_min < 1.0:
        raise StudyError(f"--lambda-min must be in [0, 1), got {lambda_min}.")
    return Space(search, n, lambda_min)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) < 1e-9 for x, y in zip(a, b))


@dataclass
class Trial:
    """One evaluated weight vector."""

    number: int
    weights: list[float]
    loss: float
    seed: str | None = None  # the baseline it is, if it is one


@dataclass
class SearchOutcome:
    trials: list[Trial]
    baselines: dict[str, float]
    best: Trial
    study_name: str
    storage: str
    extra: dict[str, float] = field(default_factory=dict)


def default_study_name(inputs: dict) -> str:
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    name = str(inputs.get("source", "merge")).rstrip("/").split("/")[-1]
    return f"bomerge-{name}-{digest}"


def open_study(storage: str, study_name: str, inputs: dict, space: Space, seed: int | None,
               n_seeds: int) -> optuna.Study:
    """Create or resume the study; a study made from different inputs is refused."""
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "experimental" in Optuna, and exactly what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_seeds, deterministic_objective=True)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                         heartbeat_stale_trial_callback=retry)
    study = optuna.create_study(storage=rdb, study_name=study_name, sampler=sampler, direction="minimize",
                                load_if_exists=True)
    stored = study.user_attrs.get("inputs")
    if stored is None:
        study.set_user_attr("inputs", inputs)
    elif stored != inputs:
        changed = sorted(k for k in set(stored) | set(inputs) if stored.get(k) != inputs.get(k))
        raise StudyError(f"Study {study_name!r} in {storage} was made from different inputs ({', '.join(changed)} "
                         "differ); resuming it would mix incomparable trials. Use another --study-name, or "
                         "drop --study-name to get one derived from the inputs.")
    return study


def run_search(evaluate: Callable[[list[float]], float], space: Space, labels: Sequence[str], *, trials: int,
               storage: str, study_name: str, inputs: dict, seed: int | None = None, ema_alpha: float = 0.2,
               progress: bool = True, on_trial: Callable[[Trial, int, int], None] | None = None) -> SearchOutcome:
    """Run (or resume) the study until it holds `trials` COMPLETE trials, seeds included.

    `evaluate(weights) -> loss` is called once per trial; a NaN/inf loss is recorded as a failed trial
    and does not count toward the budget. `on_trial(trial, complete, budget)` is called after each trial
    this process ran (a failed one with a NaN loss), e.g. to show progress in a UI.
    """
    seeds = space.seeds(labels, ema_alpha)
    enqueued = [(label, w, space.params_for(w)) for label, w in seeds]
    enqueued_seeds = [(label, w, p) for label, w, p in enqueued if p is not None]
    if trials < 1:
        raise StudyError("--trials must be at least 1.")
    optuna.logging.set_verbosity(logging.ERROR)  # failed trials are reported by us, without tracebacks
    study = open_study(storage, study_name, inputs, space, seed, len(enqueued_seeds))
    _refuse_other_parameters(study, space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    _enqueue_missing_seeds(study, enqueued_seeds[:trials])

    ran: list[Trial] = []

    def objective(trial: optuna.Trial) -> float:
        w = space.suggest(trial)  # an enqueued seed gets its fixed parameters here
        trial.set_user_attr("weights", w)
        loss = evaluate(w)
        ran.append(Trial(trial.number, w, loss if math.isfinite(loss) else float("nan"), trial.user_attrs.get("seed")))
        return ran[-1].loss

    bar = _bar(trials, progress)
    failures = 0
    while (done := _complete(study)) < trials:
        bar.n = done
        bar.refresh()
        before = len(study.trials)
        study.optimize(objective, n_trials=1, catch=())
        if study.trials[before:] and study.trials[-1].state == optuna.trial.TrialState.FAIL:
            failures += 1
            if failures > max(3, trials):
                raise StudyError(f"{failures} trials failed (NaN/inf loss); the checkpoints or the data are "
                                 "broken. Check for NaN/inf in the weights.")
        if done and (best := _best(study)):
            bar.set_postfix(best=f"{best.loss:.4f}")
        if on_trial is not None and ran:
            on_trial(ran.pop(), _complete(study), trials)
    bar.n = _complete(study)
    bar.close()
    found = [_to_trial(t) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    seeded = {t.seed: t.loss for t in found if t.seed}
    extra = {label: evaluate(w) for label, w, p in enqueued if p is None}
    order = [*labels, *(label for label, _ in seeds)]  # oldest first, then uniform and ema
    baselines = {k: v for k, v in sorted({**seeded, **extra}.items(), key=lambda kv: order.index(kv[0]))}
    return SearchOutcome(found, baselines, min(found, key=lambda t: t.loss), study_name, storage, extra)


def _refuse_other_parameters(study: optuna.Study, space: Space) -> None:
    """A study whose trials have other parameters (one an older hf-bomerge made, e.g. the simplex's former
    stick-breaking z0..z{N-2}) cannot be resumed: the GP would only see the parameters all trials share."""
    names = set(space.param_names())
    other = sorted({p for t in study.get_trials(deepcopy=False) for p in t.params} - names)
    if other:
        raise StudyError(f"Study {study.study_name!r} has trials with parameters {', '.join(other)} that the "
                         f"{space.kind} space no longer uses (it was made by another version of hf-bomerge); "
                         "resuming it would mix incomparable trials. Use another --study-name.")


def _enqueue_missing_seeds(study: optuna.Study, seeds) -> None:
    """Enqueue each baseline that has no finished, queued or running trial yet: a new study gets them all,
    a resumed one gets back a seed whose trial was interrupted."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    have = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False, states=states)}
    for label, _, params in seeds:
        if label not in have:
            study.enqueue_trial(params, user_attrs={"seed": label})


def _complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _best(study: optuna.Study) -> Trial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return _to_trial(min(done, key=lambda t: t.value)) if done else None


def _to_trial(t: optuna.trial.FrozenTrial) -> Trial:
    return Trial(t.number, list(t.user_attrs["weights"]), float(t.value), t.user_attrs.get("seed"))


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="trials", unit="trial", disable=not enabled)
