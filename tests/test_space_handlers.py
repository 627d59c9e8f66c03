"""The Space's handlers (spaces/hf-bomerge/handlers.py) called directly, without a browser, a server or a search:
input checks, the dict outputs, progress pushed by the search process, Stop/death/time limit, publishing.
The full path (a real search against the test Hub, in a browser) is tests/test_space.py."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import types
from pathlib import Path

import pytest

SPACE = Path(__file__).resolve().parents[1] / "spaces" / "hf-bomerge"
if str(SPACE) not in sys.path:
    sys.path.insert(0, str(SPACE))

gr = pytest.importorskip("gradio", reason='the Space needs gradio: pip install -e ".[test]"')
import handlers as H  # noqa: E402
import space_worker  # noqa: E402

from hf_bomerge.errors import BOMergeError  # noqa: E402
from hf_bomerge.objectives.confirm import Confirmation  # noqa: E402
from hf_bomerge.plan import Plan  # noqa: E402
from hf_bomerge.searching.study import Trial  # noqa: E402

REVS = ["step3000", "step4000"]


@pytest.fixture()
def ctx(tmp_path):
    return H.Context(H.Limits(max_trials=10, max_minutes=1), tmp_path, oauth=False)


def _run_args(**change):
    args = dict(model_id="org/model", spec="last:2", dataset="org/data", dataset_config="", split="validation",
                text_column="text", eval_sets="", search_mode="auto", trials=3, token_text="", previous=None,
                oauth_token=None)
    args.update(change)
    return args


class Pipe:
    """The receiving end of the search process's pipe: the messages it will send, one per poll."""

    def __init__(self, messages):
        self.messages, self.closed = list(messages), False

    def poll(self, timeout=0.0):
        return bool(self.messages)

    def recv(self):
        message = self.messages.pop(0)
        if isinstance(message, BaseException):
            raise message
        return message

    def close(self):
        self.closed = True


class Proc:
    def __init__(self, alive=True, exitcode=None):
        self.alive, self.exitcode = alive, exitcode

    def is_alive(self):
        return self.alive

    def terminate(self):
        self.alive, self.exitcode = False, -15

    kill = terminate

    def join(self, timeout=None):
        pass


def _row(number, loss, seed=None, complete=0, budget=3):
    return space_worker.trial_row(Trial(number, [0.5, 0.5], loss, seed), complete, budget)


def _result(folder: Path):
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nbase_model: org/model\n---\n# merged\n![plot](bomerge_search.png)\nweights\n")
    summary = {"schema": 1, "loss": 2.0}
    return types.SimpleNamespace(output=str(folder), loss=2.0, baselines={"step3000": 2.5, "step4000": 2.25,
                                                                          "uniform": 2.1}, revisions=REVS,
                                 weights=[0.4, 0.6], search="pairwise", trials=3, dataset="org/data",
                                 generalization={}, summary=lambda: summary, objective="loss", confirm=None)


def test_tokens_come_from_sign_in_first():
    signed_in = gr.OAuthToken(token="hf_oauth_user", scope="openid", expires_at=0)
    assert H.token_for(" hf_box ", signed_in) == "hf_oauth_user"
    assert H.token_for(" hf_box ", None) == "hf_box" and H.token_for("", None) is None


def test_picked_revisions_become_a_spec_oldest_first():
    assert H.picked_to_spec(["step4000", "step300", "step3000"]) == "step300,step3000,step4000"
    assert H.picked_to_spec([]) == gr.skip()


@pytest.mark.parametrize("change, message", [
    ({"trials": 0}, "between 1 and 10"), ({"trials": 11}, "between 1 and 10"),
    ({"search_mode": "grid"}, "Search mode must be one of"),
    ({"dataset": "."}, "Hub datasets only"), ({"eval_sets": "org/a\n."}, "Eval set '.'"),
])
def test_run_refuses_bad_inputs_before_any_plan(ctx, monkeypatch, change, message):
    monkeypatch.setattr(H, "plan_run", lambda *a: pytest.fail("planned despite a bad input"))
    with pytest.raises(gr.Error, match=message):
        next(H.run(ctx, **_run_args(**change)))


def test_list_revisions_refuses_what_is_not_a_repo_id(ctx):
    for text in ("just-a-name", "nowhere/..", "~/models", "/etc/x", "file:///etc/x", "org/a/../b", "org--x/y"):
        with pytest.raises(gr.Error, match="not a Hub model id"):
            H.list_revisions(ctx, text, "", None)


def _local_names(tmp_path) -> list[str]:
    """Inputs that name this machine, not the Hub: what HeldOutSpec.parse reads as a path, and ids with `..`."""
    notes = tmp_path / "notes:v1.jsonl"  # parsed whole as a path; cut at ':' the old check saw "notes"
    notes.write_text('{"text": "a file of the machine"}\n')
    return [str(notes), "nowhere/..", "nowhere/../x@validation", "~/data", "file:///etc/hostname", "/etc/hostname",
            "../data:cfg@split"]


def test_local_paths_are_refused_as_the_search_would_parse_them(ctx, monkeypatch, tmp_path):
    monkeypatch.setattr(H, "plan_run", lambda *a: pytest.fail("planned despite a local path"))
    for name in _local_names(tmp_path):
        with pytest.raises(gr.Error, match="Hub datasets only"):
            next(H.run(ctx, **_run_args(dataset=name)))
        with pytest.raises(gr.Error, match="Hub datasets only"):
            next(H.run(ctx, **_run_args(eval_sets=f"org/a\n{name}")))
    assert H._hub_dataset("Salesforce/wikitext:wikitext-2-raw-v1@validation", "Dataset")


def test_eval_sets_are_capped(ctx, monkeypatch):
    monkeypatch.setattr(H, "plan_run", lambda *a: pytest.fail("planned despite too many eval sets"))
    with pytest.raises(gr.Error, match=r"4 generalization sets .* at most 3 \(BOMERGE_SPACE_MAX_EVAL_SETS\)"):
        next(H.run(ctx, **_run_args(eval_sets="org/a\norg/b, org/c\norg/d")))
    monkeypatch.setenv("BOMERGE_SPACE_MAX_EVAL_SETS", "1")
    limits = H.Limits.from_env()
    assert limits.max_eval_sets == 1 and "at most 1 generalization sets" in limits.markdown()


def test_an_explicit_list_of_revisions_is_capped_before_any_hub_call(tmp_path):
    limits = H.Limits(max_revisions=3)
    for spec in ("s1,s2,s3,s4", "step1,step2,step3,step4,step5,step6"):
        with pytest.raises(H.PlanRefused, match=r"selects \d revisions; this Space merges at most 3"):
            H.plan_run("org/model", spec, None, limits, tmp_path)  # no Hub runs here: refused before asking


def test_run_shows_each_pushed_trial_then_the_result(ctx, monkeypatch, tmp_path):
    plan = Plan(REVS, 1000, 500, 2000, 2000, 100, "cpu", 10**9, 10**12, source="org/model", shas=["a", "b"])
    monkeypatch.setattr(H, "plan_run", lambda model_id, spec, token, limits, cache: plan)
    result = _result(tmp_path / "outputs" / "r1" / "model-bomerge")
    pipe = Pipe([("trial", _row(0, 2.25, "step4000", 1)), ("trial", _row(1, 2.5, "step3000", 2)),
                 ("trial", _row(2, 2.0, None, 3)), ("ok", result)])
    started = {}

    def start(run_id, kwargs, output):
        started.update(kwargs=kwargs, output=output, proc=Proc())
        H.WORKERS[run_id] = started["proc"]
        return started["proc"], pipe

    monkeypatch.setattr(H, "start", start)
    progress = []
    outputs = list(H.run(ctx, **_run_args(), progress=lambda *a, **k: progress.append((a, k))))
    first, *live, last = outputs
    assert "2 revisions of `org/model`" in first["plan_md"] and first["result_state"] is None
    assert started["kwargs"]["revisions"] == "step3000,step4000" and started["kwargs"]["max_checkpoints"] == 0
    assert started["kwargs"]["token"] is False and started["kwargs"]["progress"] is False
    assert len(live) == 3 and all(set(o) == {"status_md", "trials_df", "loss_plot"} for o in live)
    assert live[0]["status_md"] == "Trial 2 of 3 running; best loss so far 2.25000"
    assert live[-1]["status_md"].startswith("3/3 trials done")
    assert list(live[-1]["trials_df"]["kind"]) == ["step4000", "step3000", "GP"]
    assert [a for a, k in progress[1:]] == [((1, 3),), ((2, 3),), ((3, 3),)]
    assert set(last) == set(first)  # the last yield is an API client's result: every output, none skipped
    assert last["status_md"].startswith("Done in") and last["result_state"] is result
    assert "Merged held-out loss 2.00000" in last["summary_md"]  # and how it compares, against step4000's 2.25
    assert "better than the best single checkpoint (step4000) by 0.25000 nats/token" in last["summary_md"]
    assert list(last["baselines_df"]["model"]) == ["this merge", "step3000", "step4000", "uniform"]
    assert "base_model: org/model" in last["card_md"] and "bomerge_search.png" not in last["card_md"]
    assert last["result_json"] == {"schema": 1, "loss": 2.0} and last["search_plot"] is None
    assert pipe.closed and not H.WORKERS and started["proc"].exitcode == -15  # the search process is ended


def test_outputs_are_keyed_by_component_once_the_app_registers_them(ctx):
    status = object()
    ctx.ui["status_md"] = status
    assert ctx.out(status_md="x", summary_md="y") == {status: "x", "summary_md": "y"}


def test_a_search_error_reaches_the_user(ctx, monkeypatch):
    plan = Plan(REVS, 1000, 500, 0, 2000, 100, "cpu", 10**9, 10**12, source="org/model")
    monkeypatch.setattr(H, "plan_run", lambda *a: plan)
    monkeypatch.setattr(H, "start", lambda *a: (Proc(), Pipe([("error", "No dataset org/nope")])))
    with pytest.raises(gr.Error, match="No dataset org/nope"):
        list(H.run(ctx, **_run_args()))


def test_messages_report_a_dead_process_and_the_time_limit():
    limits = H.Limits(max_minutes=1)
    with pytest.raises(gr.Error, match="exit code -9"):
        list(H.messages(Proc(alive=False, exitcode=-9), Pipe([]), limits, time.monotonic()))
    with pytest.raises(gr.Error, match="exit code 1"):  # the pipe closed without a result
        list(H.messages(Proc(alive=False, exitcode=1), Pipe([EOFError()]), limits, time.monotonic()))
    with pytest.raises(gr.Error, match="longer than this Space's 1 minutes"):
        list(H.messages(Proc(), Pipe([]), limits, time.monotonic() - 61))
    quiet = H.messages(Proc(), Pipe([]), limits, time.monotonic())
    assert next(quiet) == (None, None)  # silence: a yield point, so that Stop can cancel the run


def test_trial_table_marks_failed_trials_and_the_curve_skips_them():
    rows = [_row(2, 2.0), _row(0, 2.5, "step4000"), _row(1, math.nan, "step3000")]
    table = H.trial_table(rows)
    assert list(table["trial"]) == [0, 1, 2] and list(table["state"]) == ["complete", "fail", "complete"]
    assert table["loss"].isna().tolist() == [False, True, False]
    curve = H.loss_curve(table)
    assert list(curve[curve["series"] == "best so far"]["loss"]) == [2.5, 2.0]
    assert H.loss_curve(H.trial_table([])) is None


def test_publish_checks_before_pushing_and_never_shows_the_token(ctx, tmp_path):
    with pytest.raises(gr.Error, match="Run a search first"):
        H.publish(ctx, None, "me/m", True, "hf_x", None)
    result = _result(tmp_path / "out")
    with pytest.raises(gr.Error, match="Paste a Hub token"):
        H.publish(ctx, result, "me/m", True, "", None)
    with pytest.raises(gr.Error, match="Sign in"):
        H.publish(H.Context(ctx.limits, ctx.cache, oauth=True), result, "me/m", True, "", None)
    with pytest.raises(gr.Error, match="not a repo id"):
        H.publish(ctx, result, "me/bad repo", True, "hf_secret", None)

    def refused(repo_id, token, private):
        raise BOMergeError(f"push of {repo_id} refused for token {token}")

    result.push_to_hub = refused
    with pytest.raises(gr.Error) as err:
        H.publish(ctx, result, "me/m", True, "hf_secret", None)
    assert "hf_secret" not in str(err.value) and "***" in str(err.value)
    result.push_to_hub = lambda repo_id, token, private: f"http://hub/{repo_id}"
    out = H.publish(ctx, result, "me/m", False, "hf_secret", None)
    assert out["push_md"] == "Published to **me/m** (public): http://hub/me/m" and out["result_state"] is result


def test_forget_deletes_only_a_runs_output(tmp_path):
    run = tmp_path / "outputs" / "r1" / "model-bomerge"
    run.mkdir(parents=True)
    H.forget(types.SimpleNamespace(output=str(run)))
    assert not (tmp_path / "outputs" / "r1").exists()
    elsewhere = tmp_path / "mine" / "model"
    elsewhere.mkdir(parents=True)
    H.forget(types.SimpleNamespace(output=str(elsewhere)))
    assert elsewhere.is_dir()


def test_the_worker_sends_trials_as_plain_data():
    assert space_worker.trial_row(Trial(3, [0.25, 0.75], 2.5, None), 4, 10) == {
        "number": 3, "weights": [0.25, 0.75], "loss": 2.5, "seed": None, "complete": 4, "budget": 10}


def test_the_summary_says_every_comparison_both_ways(tmp_path):
    """A loss to a baseline is said in the words a win is said in (on the search part and the confirm part)."""
    result = _result(tmp_path / "out")
    assert H.confirm_summary(result) == ""  # no confirm part (turned off): nothing claimed
    text = H.summary(result)  # 2.0 against the best single 2.25 and uniform 2.1, on every document
    assert "On org/data, every document: the merge is better than the best single checkpoint (step4000) by " \
           "0.25000 nats/token and better than the uniform average by 0.10000 nats/token." in text
    confirmed = Confirmation(2.2, {"step4000": 2.15, "uniform": 2.18}, "step4000", (0.01, 0.09), 32,
                             unit="documents", max_eval_tokens=16384)
    result = types.SimpleNamespace(**{**vars(result), "confirm": confirmed})
    text = H.summary(result)
    assert "every document" not in text and "org/data, search part" in text
    assert ("On the confirm part (32 documents the search never saw): the merge is worse than the best baseline "
            "(step4000) by 0.05000 nats/token; its paired bootstrap 95% interval over documents [+0.01000, "
            "+0.09000] excludes 0; it is worse than the uniform average by 0.02000 nats/token.") in text
    result.confirm = dataclasses.replace(confirmed, loss=2.1, interval=(-0.09, 0.02))
    assert ("the merge is better than the best baseline (step4000) by 0.05000 nats/token; its paired bootstrap 95% "
            "interval over documents [-0.09000, +0.02000] includes 0; it is better than the uniform average by "
            "0.08000 nats/token.") in H.summary(result)
    result.confirm = dataclasses.replace(confirmed, loss=2.1, interval=None, units=8)
    assert ("better than the best baseline (step4000) by 0.05000 nats/token; not enough held-out data for an "
            "interval (8 documents, 20 needed): raise --max-eval-tokens (now 16384) to about") in H.summary(result)
    result.confirm = dataclasses.replace(confirmed, exported="step4000")  # --fallback kept the baseline
    assert "The output holds `step4000` (fallback), not the searched merge." in H.summary(result)
