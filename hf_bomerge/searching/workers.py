"""Several workers on one study: a budget shared without overshoot, dead workers' trials re-run, and one export.

Everything here is decided by the storage (an Optuna RDB: SQLite, PostgreSQL, MySQL), not by timing:
- A trial may run only if fewer than `budget` trials numbered before it are finished or still in flight
  (COMPLETE, RUNNING or WAITING): trial numbers are handed out under a lock on the study row, so two
  workers that ask at once can never both take the last slot. A trial over the budget is set aside (failed,
  marked `bomerge_set_aside`) and its parameters queued again.
- Two workers that ask at the same moment see the same history; the GP (which accounts for running trials
  only once their parameters are stored) could propose the same point to both. Joining workers use their own
  sampler seed, and a trial whose weights equal those of an earlier-numbered running trial is set aside.
  A proposal equal to a finished trial (the GP may pick a corner it has seen) reuses that trial's value
  instead of evaluating it again (the objective is deterministic); it still counts toward the budget.
- A worker that dies mid-trial stops its heartbeat; its trial is failed after the grace period and retried
  (Optuna's heartbeat + RetryHeartbeatStaleTrialCallback). One that dies between Optuna's `ask` and its
  first heartbeat leaves a RUNNING trial that nothing would ever fail: it is failed here after ORPHAN_S.
- The export is claimed by creating a study named `<study>:export@<budget>`: study names are unique in
  the storage, so exactly one worker wins, whatever the timing. The claim records its worker (host, pid)
  and a heartbeat renewed while it exports; a claim whose exporter died (its pid is gone on this host, or
  no heartbeat for CLAIM_STALE_S) is taken over by the next run. A lone re-run of a finished study (one that
  ran none of its trials) writes the merge again when its output folder does not exist.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import threading

import optuna
from optuna.trial import TrialState

SET_ASIDE = "bomerge_set_aside"  # user attr: why a trial was not run (over the budget, a duplicate)
COPY_OF = "bomerge_copy_of"  # user attr: the finished trial whose value a re-proposed point reused
STARTED = "bomerge_started"  # user attr set by the process that runs a trial: {"trial": number, "worker": ...}
ORPHAN_S = 60
CLAIM_BEAT_S = 10  # an exporter renews its claim's heartbeat this often
CLAIM_STALE_S = 120  # a claim not renewed for this long (and not done) belongs to a dead exporter
LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class SetAside(Exception):
    """Raised inside the objective for a trial not to run (handed out over the budget, or a duplicate)."""


def worker_seed(seed: int | None) -> int | None:
    """The sampler seed of a worker that joins an existing study: its own, so that workers asking at the
    same moment do not propose the same point."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{worker_id()}".encode()).digest()[:4], "little")


def within_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether trial `number` is among the first `budget` trials that finished or are in flight."""
    ahead = study.get_trials(deepcopy=False, states=LIVE)
    return sum(1 for t in ahead if t.number < number) < budget


def twin_of(study: optuna.Study, number: int, weights: list[float],
            layer_weights: dict[str, list[float]] | None = None) -> optuna.trial.FrozenTrial | None:
    """A finished trial with the same weights (and the same per-group weights of a layered merge), or an
    earlier-numbered one in flight, if there is one."""
    point = _point(weights, layer_weights)
    for t in study.get_trials(deepcopy=False, states=LIVE):
        other = t.user_attrs.get("weights")
        if (t.state == TrialState.COMPLETE or t.number < number) and t.number != number and other \
                and _same_point(_point(other, t.user_attrs.get("layer_weights")), point):
            return t
    return None


def _point(weights: list[float], layer_weights: dict[str, list[float]] | None) -> tuple:
    """A trial's weights as (group names, one flat vector): the global vector, then each group's."""
    groups = layer_weights or {}
    return tuple(groups), [*weights, *(w for vector in groups.values() for w in vector)]


def _same_point(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(abs(x - y) < 1e-12 for x, y in zip(a[1], b[1]))


def counts(study: optuna.Study) -> dict[TrialState, int]:
    found = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        found[t.state] += 1
    return found


def requeue_set_aside(study: optuna.Study, number: int) -> None:
    """Queue again the parameters of the failed trial `number` (set aside over the budget, orphaned, or
    interrupted by Ctrl-C): a baseline seed or a retried trial carries fixed parameters that must not be lost."""
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if t.state != TrialState.FAIL:
        return
    system = dict(t.system_attrs)
    user = {k: v for k, v in t.user_attrs.items() if k not in (STARTED, SET_ASIDE)}
    if t.params or "fixed_params" in system:
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=t.params,
                                                  distributions=t.distributions, user_attrs=user,
                                                  system_attrs=system))


def fail_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail RUNNING trials that no process started running for ORPHAN_S (their worker died between `ask`
    and the first heartbeat), and queue their parameters again. Returns their numbers."""
    now = datetime.datetime.now()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.user_attrs.get(STARTED) or {}
        if started.get("trial") == t.number or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > ORPHAN_S:
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
    for number in failed:
        requeue_set_aside(study, number)
    return failed


def claim_export(storage: optuna.storages.BaseStorage, study_name: str, budget: int, claim: dict) -> dict | None:
    """Claim the export of `study_name` at `budget` trials. Returns None if this caller won the claim, else
    the winner's claim (who, where to, when)."""
    name = export_lock(study_name, budget)
    try:
        lock = optuna.create_study(storage=storage, study_name=name)
    except optuna.exceptions.DuplicatedStudyError:
        held = export_status(storage, study_name, budget) or {}
        if not is_stale(held):
            return held
        again = export_status(storage, study_name, budget) or {}
        if again.get("worker") != held.get("worker") or again.get("beat") != held.get("beat"):
            return again  # someone else took it over meanwhile
        release_export(storage, study_name, budget)  # its exporter died: the claim is free again
        return claim_export(storage, study_name, budget, claim)
    lock.set_user_attr("claim", {**claim, "worker": worker_id(), "host": socket.gethostname(), "pid": os.getpid(),
                                 "at": _now()})
    lock.set_user_attr("beat", _now())
    return None


def is_stale(held: dict) -> bool:
    """Whether an unfinished claim's exporter is dead: its process is gone (same host), or its heartbeat is
    older than CLAIM_STALE_S. A claim made before heartbeats existed (no `beat`) counts from `at`."""
    if not held or held.get("done"):
        return False
    if held.get("host") == socket.gethostname() and held.get("pid") and not _alive(int(held["pid"])):
        return True
    beat = held.get("beat") or held.get("at")
    if not beat:
        return False
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(beat)
    return age.total_seconds() > CLAIM_STALE_S


def ran_trials_here(study: optuna.Study) -> bool:
    """Whether this process ran any trial of `study` (a worker that took part, not a lone re-run)."""
    me = worker_id()
    return any((t.user_attrs.get(STARTED) or {}).get("worker") == me for t in study.get_trials(deepcopy=False))


@contextlib.contextmanager
def claim_heartbeat(storage: optuna.storages.BaseStorage, study_name: str, budget: int):
    """Renew the export claim's heartbeat every CLAIM_BEAT_S while the block runs (the export)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(CLAIM_BEAT_S):
            try:
                optuna.load_study(study_name=export_lock(study_name, budget), storage=storage).set_user_attr(
                    "beat", _now())
            except Exception:
                pass

    thread = threading.Thread(target=beat, name="bomerge-claim-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def release_export(storage: optuna.storages.BaseStorage, study_name: str, budget: int) -> None:
    """Give the claim back (the export failed), so that a re-run can export."""
    optuna.delete_study(study_name=export_lock(study_name, budget), storage=storage)


def finish_export(storage: optuna.storages.BaseStorage, study_name: str, budget: int) -> None:
    lock = optuna.load_study(study_name=export_lock(study_name, budget), storage=storage)
    lock.set_user_attr("done", _now())


def export_status(storage: optuna.storages.BaseStorage, study_name: str, budget: int) -> dict | None:
    try:
        lock = optuna.load_study(study_name=export_lock(study_name, budget), storage=storage)
    except KeyError:
        return None
    return {"worker": "?", **lock.user_attrs.get("claim", {}), "done": lock.user_attrs.get("done"),
            "beat": lock.user_attrs.get("beat")}


def export_lock(study_name: str, budget: int) -> str:
    """The name of the study whose creation claims the export of `study_name` at `budget`."""
    return f"{study_name}:export@{budget}"


def is_export_lock(study_name: str) -> bool:
    return ":export@" in study_name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
