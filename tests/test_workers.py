"""Several workers on one study: a real PostgreSQL server, real `hf-bomerge` processes, a real SIGKILL."""

from __future__ import annotations

import gc
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from hf_bomerge.searching import workers
from hf_bomerge.searching.study import open_storage

BUDGET = 10
# The unit tests below ask for trials outside Study.optimize, which Optuna warns about with heartbeats on.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


@pytest.fixture()
def worker(trajectory: Path, tmp_path: Path, postgres_url: str, request):
    """`worker(name)` starts `hf-bomerge` on the last 3 demo checkpoints, sharing one study in PostgreSQL;
    ~1 s per trial (65k held-out tokens), so that the workers overlap."""
    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    src = tmp_path / "run"
    for s in steps:
        shutil.copytree(trajectory / s, src / s)
    study_name = f"shared-{request.node.name}"

    def start(name: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "hf_bomerge.cli", str(src), "--revisions", "last:3",
                "--dataset", str(trajectory / "heldout" / "validation.jsonl"), "--max-eval-tokens", "65536",
                "--trials", str(BUDGET), "--storage", postgres_url, "--study-name", study_name,
                "--output", str(tmp_path / name), "--quiet", "--json", "--cache-dir", str(tmp_path / "cache")]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    start.steps, start.tmp, start.study_name, start.url = steps, tmp_path, study_name, postgres_url
    return start


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _trials(url: str, name: str, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials(states=states or None)


@pytest.mark.e2e
def test_a_long_lived_process_opening_the_storage_again_and_again_holds_a_few_connections(postgres_url):
    """The Space, `watch` or a notebook opens the study storage for every search, export and query. With the
    garbage collector idle (a process with a large heap rarely runs a full collection), 150 opens must not run
    the server (100 connections by default) out of connections."""
    optuna.create_study(study_name="opened-often", storage=open_storage(postgres_url))
    gc.disable()
    try:
        for _ in range(150):
            optuna.load_study(study_name="opened-often", storage=open_storage(postgres_url)).get_trials()
        with sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool).connect() as admin:
            held = admin.execute(sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")).scalar() - 1
    finally:
        gc.enable()
    assert held <= 5, f"{held} connections held by one process"


@pytest.mark.e2e
def test_two_workers_share_one_budget_and_export_once(worker, capsys):
    a, b = worker("out-a"), worker("out-b")
    results = [_finish(a), _finish(b)]
    complete = _trials(worker.url, worker.study_name, TrialState.COMPLETE)
    assert len(complete) == BUDGET  # the shared budget, not BUDGET per worker, and not overshot
    params = [json.dumps(t.params, sort_keys=True) for t in complete if workers.COPY_OF not in t.user_attrs]
    assert len(set(params)) == len(params)  # no trial ran twice (a GP re-proposal reuses the known value)
    seeds = [t.user_attrs["seed"] for t in complete if t.user_attrs.get("seed")]
    assert sorted(seeds) == sorted([*worker.steps, "uniform", "ema"])  # each baseline enqueued and run once
    ran_by = {t.user_attrs[workers.STARTED]["worker"] for t in complete}
    assert len(ran_by) == 2  # both workers took trials
    set_aside = [t for t in _trials(worker.url, worker.study_name, TrialState.FAIL)]
    assert all(t.user_attrs.get(workers.SET_ASIDE) for t in set_aside)  # nothing else failed

    written = [p for p in (worker.tmp / "out-a", worker.tmp / "out-b") if p.exists()]
    assert len(written) == 1  # exported exactly once
    assert results[0]["output"] == results[1]["output"] == str(written[0])
    assert results[0]["weights"] == results[1]["weights"] and results[0]["trials"] == BUDGET

    from hf_bomerge.cli import main

    assert main(["show", "--storage", worker.url, "--study-name", worker.study_name, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["counts"]["complete"] == BUDGET and shown["counts"]["running"] == 0
    assert [(e["budget"], e["output"], bool(e["done"])) for e in shown["exports"]] == [(BUDGET, str(written[0]), True)]
    assert main(["export", "--storage", worker.url, "--study-name", worker.study_name, "--quiet",
                 "--output", str(worker.tmp / "again"), "--cache-dir", str(worker.tmp / "cache")]) == 0
    assert (worker.tmp / "again" / "model.safetensors").read_bytes() == (written[0] / "model.safetensors").read_bytes()


@pytest.mark.e2e
def test_a_killed_workers_trial_is_retried_by_another(worker):
    a = worker("out-a")
    deadline = time.time() + 300
    while time.time() < deadline and a.poll() is None:
        try:
            done = len(_trials(worker.url, worker.study_name, TrialState.COMPLETE))
        except KeyError:  # not created yet
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    assert a.poll() is None, a.stderr.read()[-2000:]
    time.sleep(0.4)  # into the next trial (~1 s), past its first heartbeat
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed = _trials(worker.url, worker.study_name, TrialState.RUNNING)
    assert len(killed) == 1
    summary = _finish(worker("out-b"))  # waits for the dead trial's heartbeat to go stale, then re-runs it

    complete = _trials(worker.url, worker.study_name, TrialState.COMPLETE)
    assert len(complete) == summary["trials"] == BUDGET
    dead = next(t for t in _trials(worker.url, worker.study_name) if t.number == killed[0].number)
    assert dead.state == TrialState.FAIL
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params
    assert not (worker.tmp / "out-a").exists() and (worker.tmp / "out-b" / "model.safetensors").is_file()


# The protocol's pieces, one at a time, on a real SQLite storage (no processes needed).


def _study(tmp_path: Path) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(storage=storage, study_name="s"), storage


def test_two_asks_for_the_last_slot_give_it_to_one(tmp_path):
    study, _ = _study(tmp_path)
    study.enqueue_trial({"x": 0.5}, user_attrs={"seed": "uniform"})
    first, second = study.ask(), study.ask()  # two workers asking at once, before either reports
    assert workers.within_budget(study, first.number, budget=1)
    assert not workers.within_budget(study, second.number, budget=1)
    assert workers.within_budget(study, second.number, budget=2)


def test_a_seed_set_aside_over_the_budget_is_queued_again(tmp_path):
    study, _ = _study(tmp_path)
    study.enqueue_trial({"x": 0.25}, user_attrs={"seed": "ema"})
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    workers.requeue_set_aside(study, trial.number)
    again = study.ask()
    assert again.suggest_float("x", 0, 1) == 0.25 and again.user_attrs["seed"] == "ema"


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_requeued(tmp_path, monkeypatch):
    study, storage = _study(tmp_path)
    study.enqueue_trial({"x": 0.75}, user_attrs={"seed": "uniform"})
    orphan = study.ask()  # its worker dies here: RUNNING, no heartbeat, never started
    running = study.ask()
    running.set_user_attr(workers.STARTED, {"trial": running.number, "worker": "alive"})
    assert workers.fail_orphans(study, storage) == []  # not old enough yet
    monkeypatch.setattr(workers, "ORPHAN_S", -1)
    assert workers.fail_orphans(study, storage) == [orphan.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[orphan.number] == TrialState.FAIL and states[running.number] == TrialState.RUNNING
    assert study.ask().suggest_float("x", 0, 1) == 0.75


def test_the_export_is_claimed_once(tmp_path):
    _, storage = _study(tmp_path)
    assert workers.claim_export(storage, "s", 10, {"output": "/a"}) is None
    winner = workers.claim_export(storage, "s", 10, {"output": "/b"})
    assert winner["output"] == "/a" and winner["done"] is None
    workers.finish_export(storage, "s", 10)
    assert workers.export_status(storage, "s", 10)["done"]
    assert workers.claim_export(storage, "s", 20, {"output": "/b"}) is None  # a larger budget exports again


def test_a_re_proposed_finished_point_reuses_its_value_without_evaluating(tmp_path):
    from hf_bomerge.searching.study import make_space, run_search

    calls = []

    def loss(w):
        calls.append(w)
        return (w[1] - 0.3) ** 2

    space, storage = make_space("pairwise", 2), f"sqlite:///{tmp_path / 's.db'}"
    kw = dict(storage=storage, study_name="s", inputs={"x": 1}, progress=False)
    run_search(loss, space, ["a", "b"], trials=4, **kw)  # the four baselines
    evaluated = len(calls)
    optuna.load_study(study_name="s", storage=storage).enqueue_trial({"lambda": 1.0})  # as the GP might
    run_search(loss, space, ["a", "b"], trials=5, **kw)
    assert len(calls) == evaluated  # not evaluated again
    copies = [t for t in optuna.load_study(study_name="s", storage=storage).trials if workers.COPY_OF in t.user_attrs]
    assert len(copies) == 1 and copies[0].value == loss([0.0, 1.0]) and copies[0].state == TrialState.COMPLETE
